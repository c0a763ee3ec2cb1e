"""``mambabyte convert SRC OUT_DIR``: any checkpoint we read -> our config.json + model.safetensors."""

from __future__ import annotations

from .common import ArgumentParser, cli_entry, parse_dtype


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="mambabyte convert", description=__doc__)
    p.add_argument("src", help="mamba_ssm folder, MambaByte .pt, our folder, or a shipped name")
    p.add_argument("out_dir", help="folder to write config.json + model.safetensors into")
    p.add_argument("--model_id", default=None, help="preset to use when the checkpoint has no config")
    p.add_argument("--dtype", default=None, help="store weights as fp32, bf16 or fp16 (A_log and D stay fp32)")
    args = p.parse_args(argv)
    from ..io import load_pretrained, save_pretrained

    dtype = parse_dtype(args.dtype)
    model = load_pretrained(args.src, device="cpu", model_id=args.model_id)
    save_pretrained(model, args.out_dir, dtype=dtype)
    n = model.num_parameters()
    print(f"wrote {args.out_dir}/model.safetensors + config.json ({n / 1e6:.2f}M parameters, "
          f"read as {getattr(model, 'source_layout', '?')}, fingerprint {model.fingerprint()})")
    return 0

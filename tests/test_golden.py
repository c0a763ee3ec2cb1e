"""Golden tests of the shipped default model: exact greedy output and a stored bits-per-byte figure (CPU)."""

import math
import os

import pytest
import torch

from mambabyte import MambaByteLM
from mambabyte.io import list_shipped_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXCERPT = os.path.join(ROOT, "tests", "data", "corpus", "val", "shakespeare_tempest_excerpt.txt")

# Recorded on CPU (fp32 compute from the shipped bf16 weights) when the model was shipped.
GOLDEN_PROMPT = "First Citizen:\n"
GOLDEN_OUTPUT = b"The state is come to the sea, and the state of the sea\nWhich is "
GOLDEN_BPB_4096 = 2.2827  # first 4,096 bytes of the committed Tempest excerpt, one pass from the zero state


@pytest.fixture(scope="module")
def small():
    assert "mambabyte-small" in list_shipped_models(), "the shipped default model is missing from pretrained_models/"
    return MambaByteLM.from_pretrained("mambabyte-small", device="cpu")


def test_shipped_model_greedy_output_is_stable(small):
    out = small.generate(GOLDEN_PROMPT, max_new_bytes=len(GOLDEN_OUTPUT), temperature=0)
    assert out.bytes == GOLDEN_OUTPUT


def test_shipped_model_bpb_on_committed_excerpt(small):
    with open(EXCERPT, "rb") as f:
        data = f.read()[:4096]
    x = torch.tensor([list(data)])
    with torch.no_grad():
        logp = torch.log_softmax(small(x[:, :-1]).logits.float(), -1)
    nll = -logp[0].gather(-1, x[0, 1:, None]).sum().item()
    bpb = nll / math.log(2) / (len(data) - 1)
    assert bpb == pytest.approx(GOLDEN_BPB_4096, abs=2e-3)


def test_shipped_models_load_by_name():
    assert {"mambabyte-small", "mambabyte-draft", "mambabyte-subword-draft"} <= set(list_shipped_models())
    draft = MambaByteLM.from_pretrained("mambabyte-draft")
    assert (draft.config.d_model, draft.config.n_layer) == (192, 2)
    for name in ("mambabyte-small", "mambabyte-draft", "mambabyte-subword-draft"):
        size = os.path.getsize(os.path.join(ROOT, "pretrained_models", name, "model.safetensors"))
        assert size <= {"mambabyte-small": 16, "mambabyte-draft": 2, "mambabyte-subword-draft": 8}[name] * 1024**2

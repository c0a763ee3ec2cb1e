"""Packaging: light imports, the command dispatcher, doctor, and the shipped files."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_is_light():
    code = (
        "import sys, mambabyte\n"
        "heavy = [m for m in ('torch', 'matplotlib', 'datasets', 'huggingface_hub', 'tokenizers', 'triton', 'yaml',"
        " 'mambabyte._C', 'mambabyte.training', 'mambabyte.generation', 'mambabyte.analysis') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""
    # the lazy names resolve
    r = subprocess.run([sys.executable, "-c", "from mambabyte import MambaByteLM, MambaState, load_state; print('ok')"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_dispatcher_help_and_unknown_command(capsys):
    from mambabyte.cli.main import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    try:
        main(["frobnicate"])
    except SystemExit as e:
        assert e.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command" in err


def test_doctor_names_backends(capsys):
    from mambabyte.cli.doctor import main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert "selective_scan" in out and ("reference" in out or "cuda" in out)


def test_pg19_samples_shipped():
    names = sorted(os.listdir(os.path.join(ROOT, "pg19_samples")))
    assert names == ["3247.txt", "4128.txt", "860.txt"]
    for n in names:
        assert os.path.getsize(os.path.join(ROOT, "pg19_samples", n)) > 5000

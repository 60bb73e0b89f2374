"""Start-up: a config mistake is reported before torch and the model libraries are imported (they take seconds)."""

import subprocess
import sys

import pytest
from conftest import ROOT

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "gradio", "scipy")
# the CLI as `python SCRIPT ARGS` runs it, then the heavy modules it had imported when it exited
PROBE = f"""
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    print("exit", e.code, "imported", sorted(m for m in {HEAVY!r} if m in sys.modules))
"""


@pytest.mark.parametrize(("setting", "message"), [
    ("training.lr_unet=-1", "training.lr_unet: -1 is out of range"),  # a single key's bounds
    ("run.name=a/b", 'run.name: "a/b" is not a plain folder name'),  # a rule across keys
    ("eval.sampler_name=eular", "did you mean 'euler'"),  # a sampler name (sampler_names.py, not sampling.py)
    ("training.lr_unetx=1", "training.lr_unetx"),  # a typo
])
@pytest.mark.parametrize("script", ["train_sdxl_ff.py", "demo_training_flow.py"])
def test_config_error_before_heavy_imports(script, setting, message):
    proc = subprocess.run([sys.executable, "-c", PROBE, script, "--set", setting], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert "exit 2 imported []" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert message in proc.stderr and proc.stderr.startswith("error: ")

"""Start-up: a config mistake is reported before torch and the model libraries are imported (they take seconds)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT
from helpers import PROBE


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


@pytest.mark.parametrize(("variable", "engine"), [("ACCELERATE_USE_FSDP", "FSDP"),
                                                  ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_sharding_launch_refused_before_heavy_imports(variable, engine):
    """What `accelerate launch --use_fsdp` (or DeepSpeed) puts in each process's environment: refused at once."""
    proc = subprocess.run([sys.executable, "-c", PROBE, "train_sdxl_ff.py", "--set", "run.name=x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, variable: "true"})
    assert "exit 2 imported []" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: accelerate launch: {engine} is not supported"), proc.stderr[-2000:]

"""Helpers that tests of several rooms share: comparing trained folders and states, launching two processes,
reading TensorBoard event files, a changed tiny model for the inspector."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import ROOT, free_port
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sdxl_ff.model import parts as models
from sdxl_ff.parallel.processes import SHUTDOWN_TIMEOUT_ENV, WAIT_TIMEOUT_ENV

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "gradio", "scipy")
# the CLI as `python SCRIPT ARGS` runs it, then the heavy modules it had imported when it exited
PROBE = f"""
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # the script's folder, as `python SCRIPT` has it
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    # one write(2) of the whole line: two processes launched together share one pipe (print writes in pieces)
    os.write(1, f"exit {{e.code}} imported {{sorted(m for m in {HEAVY!r} if m in sys.modules)}}\\n".encode())
"""


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        for file in sorted((folder / part).glob("*.safetensors")):
            out.update({f"{part}.{k}": v for k, v in load_file(file).items()})
    return out


def assert_same_tree(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_folder(a: Path, b: Path, step: int, unlike: tuple[str, ...] = ()):
    """Same weights and the same trainer state, every entry of it (but the `unlike` ones), bit for bit."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{a.name}: {key}"
    sa, sb = load(a), load(b)
    assert sa["global_step"] == sb["global_step"] == step
    assert sa["losses"] == sb["losses"] and len(sa["losses"]) == step
    assert learning_rates(sa["optimizer"]) == learning_rates(sb["optimizer"])
    assert_same_tree(sa["optimizer"], sb["optimizer"], "optimizer")
    assert_same_tree(sa["ema"], sb["ema"], "ema")
    assert torch.equal(sa["noise_generator"], sb["noise_generator"])
    assert_same_tree({k: v for k, v in sa.items() if k not in unlike}, {k: v for k, v in sb.items() if k not in unlike},
                     f"{a.name}/trainer_state")


def write_config(tmp_path, image_dir=ROOT / "data" / "images", use_bf16: bool = False) -> str:
    path = tmp_path / "inspect.json"
    path.write_text(json.dumps({
        "device": "cpu", "model": {"id": models.TINY_ID, "use_bf16": use_bf16, "train_text_encoder_1": False},
        "run": {"name": "inspect", "output_root": str(tmp_path / "out")},
        "training": {"num_steps": 1, "seed": 7}, "data": {"image_dir": str(image_dir), "size": 128}}))
    return str(path)


def write_changed_tiny_model(folder) -> None:
    """The tiny SDXL with a perturbed UNet: same VAE and encoders, different predictions."""
    parts = models.build_tiny_sdxl()
    with torch.no_grad():
        parts.unet.conv_out.weight.add_(0.05)
    models.save_pipeline(parts, folder)


def events(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def texts(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def launch_two(*args: str, timeout: int, engine: str = "--multi_gpu",
               script: Path = ROOT / "train_sdxl_ff.py") -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu` (or `engine`) with two CPU processes (gloo) of train_sdxl_ff.py (or `script`)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", engine, "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(script)]
    env = {k: v for k, v in os.environ.items() if k not in (SHUTDOWN_TIMEOUT_ENV, WAIT_TIMEOUT_ENV)}
    return subprocess.run(launch + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """|a - b| / |a - base| over all tensors: how far two trainings differ compared to how far they moved."""
    update = sum(((a[k].float() - base[k].float()) ** 2).sum() for k in a) ** 0.5
    diff = sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a) ** 0.5
    assert update > 0
    return float(diff / update)


def load(folder: Path) -> dict:
    return torch.load(folder / "trainer_state.pt", weights_only=False)


def learning_rates(optimizer_state: dict) -> list[float]:
    """Every group's lr, of one optimizer's state or of the per-parameter one's (a state per tensor name)."""
    states = [optimizer_state] if "param_groups" in optimizer_state else list(optimizer_state.values())
    return [g["lr"] for state in states for g in state["param_groups"]]

"""The console of a real run holds our own lines and progress bars, none of the libraries' noise."""

import re

from conftest import ROOT, run_cli, tiny_overrides

OURS = re.compile(r"\d\d:\d\d:\d\d (INFO|WARNING) |  |training: |step \d+/\d+ |INFO wrote .*\.safetensors: ")
NOISE = ("Writing model shards", "Loading weights", "FutureWarning", "gradient_checkpointing_enable", "kernels",
         "pkg_resources", "Warning:", "it/s]")


def test_a_run_shows_only_our_lines(tmp_path, tiny_dir):
    """Everything that used to speak: saves (checkpoint + final), loading a Diffusers folder, gradient
    checkpointing of a text encoder, TensorBoard, a k-diffusion eval and the converter (bitsandbytes)."""
    proc = run_cli(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=2, **{
        "model.id": str(tiny_dir), "training.checkpoint_every": "1", "model.train_text_encoder_1": "true",
        "training.lr_text_encoder_1": "1e-4", "model.use_gradient_checkpointing": "true",
        "training.tensorboard.enabled": "true", "training.tensorboard.base_dir": str(tmp_path / "tb"),
        "export.save_single_file": "true", "eval.final.enabled": "true", "eval.backend": "kdiffusion",
        "eval.height": "64", "eval.width": "64", "eval.num_inference_steps": "2"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint: " in proc.stderr and "eval/final" in proc.stderr and "export: wrote" in proc.stderr
    console = proc.stderr + proc.stdout
    assert not [word for word in NOISE if word in console], console[-3000:]
    foreign = [line for line in re.split(r"[\r\n]+", console) if line and not OURS.match(line)]
    assert not foreign, foreign

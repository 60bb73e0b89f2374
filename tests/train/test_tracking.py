"""Evals and TensorBoard in a real CLI run: identical losses with evals on, event files read back with TensorBoard."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, run_in_process, tiny_overrides
from helpers import events, texts

from sdxl_ff.config.load import load_config
from sdxl_ff.model.parts import build_tiny_sdxl
from sdxl_ff.optim.per_param import PerParamOptimizer
from sdxl_ff.train.tracking import Tracker

STEPS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4-step run twice: plain, and with live evals every 2 steps, a final eval and TensorBoard."""
    tmp = tmp_path_factory.mktemp("tracked")
    prompts = tmp / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "a red circle", "seed": 1},
                                   {"prompt": "a blue square", "seed": 2, "resolution": "96x64"}]))
    common = {"optimizer.type": "adamw", "model.train_text_encoder_1": "true", "training.lr_text_encoder_1": "1e-4"}
    plain = run_in_process(*tiny_overrides(tmp / "plain", ROOT / "data" / "images", steps=STEPS, **common))
    assert plain.returncode == 0, plain.stderr[-3000:]
    evals = run_in_process(*tiny_overrides(tmp / "evals", ROOT / "data" / "images", steps=STEPS, **common, **{
        "eval.prompts_path": str(prompts), "eval.height": "64", "eval.width": "64",
        "eval.num_inference_steps": "2", "eval.backend": "kdiffusion", "eval.sampler_name": "euler_ancestral",
        "eval.live.enabled": "true", "eval.live.every_n_steps": "2", "eval.live.max_batches": "1",
        "eval.final.enabled": "true", "training.tensorboard.enabled": "true",
        "training.tensorboard.base_dir": str(tmp / "tb")}))
    assert evals.returncode == 0, evals.stderr[-3000:]
    return tmp, tmp / "tb" / "test"


def losses(folder):
    return torch.load(folder / "out" / "test" / "trainer_state.pt", weights_only=False)["losses"]


def test_losses_identical_with_evals(runs):
    tmp, _ = runs
    assert len(losses(tmp / "plain")) == STEPS
    assert losses(tmp / "evals") == losses(tmp / "plain")  # bit-identical floats


def test_eval_folders(runs):
    tmp, _ = runs
    eval_dir = tmp / "evals" / "out" / "test" / "eval"
    for step in (2, 4):
        assert sorted(p.name for p in (eval_dir / "live" / f"step_{step}").iterdir()) == ["000_seed1.png", "grid.png"]
    assert sorted(p.name for p in (eval_dir / "final").iterdir()) == ["000_seed1.png", "001_seed2.png", "grid.png"]
    assert not (tmp / "plain" / "out" / "test" / "eval").exists()


def test_event_file_tags_and_values(runs):
    tmp, log_dir = runs
    acc = events(log_dir)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx(losses(tmp / "evals"), rel=1e-6)
    assert [e.value for e in acc.Scalars("lr/unet")] == pytest.approx([1e-3] * STEPS)
    assert [e.value for e in acc.Scalars("lr/text_encoder")] == pytest.approx([1e-4] * STEPS)
    assert all(e.value > 0 and np.isfinite(e.value) for e in acc.Scalars("train/grad_norm"))
    assert [e.value for e in acc.Scalars("data/bucket_128x128")] == [12]
    (step, metadata), = texts(acc, "run/metadata")
    assert "effective batch size: 4" in metadata and "samples: 12" in metadata
    assert '"lr_unet": 0.001' in texts(acc, "run/config")[0][1]
    assert [e.step for e in acc.Images("eval/live/grid")] == [2, 4]
    final, = acc.Images("eval/final/grid")
    assert (final.step, final.width, final.height) == (4, 192, 64)  # two cells of 96x64
    assert [s for s, _ in texts(acc, "eval/live")] == [2, 4] and "1 image(s)" in texts(acc, "eval/live")[0][1]
    assert "2 image(s)" in texts(acc, "eval/final")[0][1]


def test_amp_scale_and_disabled_tracker(tmp_path):
    cfg = load_config(None, ["training.num_steps=1", "run.name=amp", "model.train_text_encoder_1=false",
                             "training.tensorboard.enabled=true",
                             f"training.tensorboard.base_dir={tmp_path}"])
    tracker = Tracker(cfg, main_process=True)
    optimizer = torch.optim.SGD([{"name": "unet", "params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.5}])
    tracker.log_step(3, 0.25, optimizer, grad_norm=1.5, scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    tracker.close()
    acc = events(tmp_path / "amp")
    assert [(e.step, e.value) for e in acc.Scalars("train/amp_scale")] == [(3, 1024.0)]
    assert [e.value for e in acc.Scalars("train/grad_norm")] == [1.5]
    assert [e.value for e in acc.Scalars("lr/unet")] == [0.5]
    off = Tracker(cfg, main_process=False)  # other processes never write
    assert not off.enabled and not off.wants_grad_norm


def test_per_parameter_optimizer_logs_one_lr_per_module(tmp_path):
    """full_bf16 / fused_backward: one param group per tensor, still one lr/<module> value per step."""
    cfg = load_config(None, ["training.num_steps=1", "run.name=perparam", "model.train_text_encoder_1=false",
                             "training.tensorboard.enabled=true",
                             f"training.tensorboard.base_dir={tmp_path}"])
    parts = build_tiny_sdxl(0)
    named = [(group, f"{group}.{name}", p) for group, module in (("unet", parts.unet),
                                                                  ("text_encoder", parts.text_encoder))
             for name, p in module.named_parameters()]
    optimizer = PerParamOptimizer(named, {"unet": 0.5, "text_encoder": 0.25}, torch.optim.AdamW,
                                  stochastic_rounding=False)
    assert len(optimizer.param_groups) == len(named) > 100
    tracker = Tracker(cfg, main_process=True)
    for step in (1, 2):
        tracker.log_step(step, 0.25, optimizer, grad_norm=None, scaler=None)
    tracker.close()
    acc = events(tmp_path / "perparam")
    assert sorted(t for t in acc.Tags()["scalars"] if t.startswith("lr/")) == ["lr/text_encoder", "lr/unet"]
    assert [(e.step, e.value) for e in acc.Scalars("lr/unet")] == [(1, 0.5), (2, 0.5)]
    assert [(e.step, e.value) for e in acc.Scalars("lr/text_encoder")] == [(1, 0.25), (2, 0.25)]


def test_resume_after_a_crash_keeps_one_curve(tmp_path):
    """A run logged steps 1-5 but its newest checkpoint is step 2 (as if it crashed after step 5); the resume
    from step 2 (at another learning rate) relogs 3-5: TensorBoard shows each step once, the resumed values."""
    from conftest import tiny_config

    from train_sdxl_ff import train
    extra = {"training.tensorboard.enabled": "true", "training.tensorboard.base_dir": str(tmp_path / "tb"),
             "training.checkpoint_every": "2", "training.batch_size": "2"}
    crashed = train(tiny_config(tmp_path, ROOT / "data" / "images", steps=5, **extra))
    checkpoint = tmp_path / "out" / "test" / "checkpoints" / "step-0000002"
    resumed = train(tiny_config(tmp_path, ROOT / "data" / "images", steps=5, **extra, **{
        "training.resume_from": str(checkpoint), "training.lr_unet": "3e-3"}))
    assert resumed["losses"][:3] == crashed["losses"][:3] and resumed["losses"][3:] != crashed["losses"][3:]
    acc = events(tmp_path / "tb" / "test")
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5]
    assert [e.value for e in loss] == pytest.approx(resumed["losses"], rel=1e-6)
    assert [e.value for e in acc.Scalars("lr/unet")] == pytest.approx([1e-3, 1e-3, 3e-3, 3e-3, 3e-3])
    assert [e.step for e in acc.Scalars("data/bucket_128x128")] == [0, 2]  # each segment's data, where it starts

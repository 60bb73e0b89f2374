"""Adafactor (transformers) as optimizer.type: per parameter and fused equal the plain optimizer, and a run with
logit-normal timesteps, Huber loss, EMA warmup and bf16 weights resumes bit for bit; other types are refused."""

import pytest
import torch
from conftest import ROOT, run_in_process, tiny_overrides, unet_weights
from transformers.optimization import Adafactor

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import load_config
from sdxl_ff.model.trainables import Trainables
from sdxl_ff.optim.optimizers import build_optimizer
from sdxl_ff.optim.per_param import PerParamOptimizer

SETTINGS = dict(scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=0.01)


def model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    return model, torch.randn(5, 8), torch.randn(5, 4)


@pytest.mark.parametrize("fused", [False, True])
def test_per_param_and_fused_adafactor_equal_plain_adafactor_exactly(fused):
    ref, x, y = model_and_batch()
    plain = Adafactor(ref.parameters(), lr=1e-2, **SETTINGS)
    for _ in range(3):
        torch.nn.functional.mse_loss(ref(x), y).backward()
        plain.step()
        plain.zero_grad(set_to_none=True)
    model, _, _ = model_and_batch()
    cfg = load_config(None, ["training.num_steps=1", "run.name=x", "model.train_text_encoder_1=false",
                             "optimizer.type=adafactor", "optimizer.weight_decay=0.01", "training.lr_unet=1e-2",
                             f"training.fused_backward={str(fused).lower()}"])
    opt, name = build_optimizer(cfg, Trainables({"unet": model}))
    assert isinstance(opt, PerParamOptimizer) == fused and name.startswith("Adafactor")
    group = opt.param_groups[0]
    assert (group["relative_step"], group["scale_parameter"], group["warmup_init"], group["lr"]) == \
        (False, False, False, 1e-2)
    for _ in range(3):
        torch.nn.functional.mse_loss(model(x), y).backward()  # fused: the hooks step and free each gradient
        if not fused:
            opt.step()
        opt.zero_grad(set_to_none=True)
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_adamw_settings_are_refused_with_adafactor():
    with pytest.raises(ConfigError, match='optimizer.betas: \\[0.9, 0.99\\] is an AdamW setting, but optimizer.type '
                                          'is "adafactor"'):
        load_config(None, ["training.num_steps=1", "run.name=x", "model.train_text_encoder_1=false",
                           "optimizer.type=adafactor", "optimizer.betas=[0.9, 0.99]"])


STEPS = 4
OBJECTIVE = {"optimizer.type": "adafactor", "training.timestep_sampling": "logit_normal", "training.logit_mean": "-0.3",
             "training.loss_type": "huber", "training.huber_schedule": "exponential", "training.huber_c": "0.2",
             "training.debiased_estimation": "true", "training.input_perturbation": "0.1",
             "training.timestep_shift": "resolution", "model.use_ema": "true", "training.ema_update_every": "1",
             "model.ema_warmup": '{"inv_gamma": 1.0, "power": 0.75}', "model.use_bf16": "true",
             "model.full_bf16": "true", "training.max_grad_norm": "null"}


def test_resume_is_bit_exact_and_other_optimizers_are_refused(tmp_path):
    def run(name, **extra):
        return run_in_process(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=STEPS,
                                       **{**OBJECTIVE, "run.name": name, **extra}))

    straight = run("straight", **{"training.checkpoint_every": "2"})
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "optimizer: Adafactor (transformers" in straight.stderr
    assert "precision: bf16 autocast" in straight.stderr  # in-process runs get accelerate's state afresh
    assert "loss: huber (huber_c 0.2, exponential schedule)" in straight.stderr
    assert "timesteps: logit-normal (mean -0.3, std 1) in [0, T), shift resolution" in straight.stderr
    checkpoint = tmp_path / "out" / "straight" / "checkpoints" / "step-0000002"
    resumed = run("resumed", **{"training.resume_from": str(checkpoint)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "precision: bf16 autocast" in resumed.stderr
    states = [torch.load(tmp_path / "out" / name / "trainer_state.pt", weights_only=False)
              for name in ("straight", "resumed")]
    assert states[0]["losses"] == states[1]["losses"] and len(states[0]["losses"]) == STEPS
    a, b = unet_weights(tmp_path / "out" / "straight"), unet_weights(tmp_path / "out" / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    shadows = [state["ema"]["shadow"] for state in states]
    assert shadows[0].keys() == shadows[1].keys() and all(torch.equal(shadows[0][k], shadows[1][k]) for k in shadows[0])
    other = run("other", **{"training.resume_from": str(checkpoint), "optimizer.type": "adamw"})
    assert other.returncode == 2
    assert ("optimizer differs: the state used adafactor per parameter, this config uses adamw (optimizer.type)"
            in other.stderr)

"""Learning-rate factors at chosen steps for every schedule, their config rules, and the PNG of the curve."""

import json
import math

import pytest
import torch
from PIL import Image

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import load_config
from sdxl_ff.config.schema import LRSchedulerConfig, TrainingConfig
from sdxl_ff.train.lr_plot import BOTTOM, HEIGHT, LEFT, RIGHT, TOP, WIDTH, write_planned_curve
from sdxl_ff.train.lr_schedule import cosine_restart_progress, lr_factor, set_learning_rates


def training(scheduler=None, **kw):
    return TrainingConfig(lr_scheduler=LRSchedulerConfig(**scheduler) if scheduler else None, **kw)


def cos_shape(p):
    return 0.5 * (1 + math.cos(math.pi * p))


def test_legacy_linear_warmup_then_constant():
    t = training(lr_warmup_steps=10)
    assert [lr_factor(s, t, 100) for s in (1, 5, 10, 11, 100)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])
    assert lr_factor(1, training(), 100) == 1.0  # no warmup, no block: the base rate throughout


def test_constant_with_warmup():
    t = training({"type": "constant", "warmup_steps": 5, "min_factor": 0.5})
    assert [lr_factor(s, t, 50) for s in (3, 5, 6, 50)] == pytest.approx([0.6, 1.0, 1.0, 1.0])


def test_linear_decay():
    t = training({"type": "linear_decay", "warmup_steps": 10, "min_factor": 0.2})
    assert lr_factor(10, t, 110) == 1.0  # warmup end
    assert lr_factor(60, t, 110) == pytest.approx(0.2 + 0.8 * 0.5)  # mid-decay
    assert lr_factor(110, t, 110) == pytest.approx(0.2)  # the last step reaches min_factor


def test_cosine_decay():
    t = training({"type": "cosine_decay", "warmup_steps": 10, "min_factor": 0.2})
    assert lr_factor(5, t, 110) == pytest.approx(0.5)
    assert lr_factor(10, t, 110) == 1.0
    assert lr_factor(35, t, 110) == pytest.approx(0.2 + 0.8 * cos_shape(0.25))
    assert lr_factor(60, t, 110) == pytest.approx(0.6)
    assert lr_factor(110, t, 110) == pytest.approx(0.2)


@pytest.mark.parametrize("kind", ["linear_decay", "cosine_decay", "cosine_restarts"])
def test_min_factor_is_a_floor(kind):
    t = training({"type": kind, "warmup_steps": 7, "min_factor": 0.3, "cycle_steps": 13, "cycle_mult": 1.5})
    after_warmup = [lr_factor(s, t, 100) for s in range(8, 130)]  # also past the planned end
    assert min(after_warmup) == pytest.approx(0.3) and all(f >= 0.3 - 1e-12 for f in after_warmup)
    assert max(after_warmup) <= 1.0


def test_cosine_restarts_cycle_mult_1():
    t = training({"type": "cosine_restarts", "warmup_steps": 10, "min_factor": 0.1, "cycle_steps": 20})
    assert lr_factor(10, t, 1000) == 1.0
    assert lr_factor(20, t, 1000) == pytest.approx(0.1 + 0.9 * cos_shape(0.5))  # mid-cycle
    assert lr_factor(30, t, 1000) == pytest.approx(0.1)  # end of cycle 1
    assert lr_factor(31, t, 1000) == pytest.approx(0.1 + 0.9 * cos_shape(1 / 20))  # restart
    assert lr_factor(50, t, 1000) == pytest.approx(0.1)  # end of cycle 2: same length
    assert lr_factor(51, t, 1000) == lr_factor(31, t, 1000)


def test_cosine_restarts_cycle_mult_2():
    t = training({"type": "cosine_restarts", "warmup_steps": 10, "min_factor": 0.1, "cycle_steps": 20,
                  "cycle_mult": 2.0})
    assert lr_factor(30, t, 1000) == pytest.approx(0.1)  # cycle 1: 20 steps
    assert lr_factor(31, t, 1000) == pytest.approx(0.1 + 0.9 * cos_shape(1 / 40))  # cycle 2: 40 steps
    assert lr_factor(50, t, 1000) == pytest.approx(0.55)
    assert lr_factor(70, t, 1000) == pytest.approx(0.1)  # end of cycle 2
    assert lr_factor(71, t, 1000) == pytest.approx(0.1 + 0.9 * cos_shape(1 / 80))  # cycle 3: 80 steps
    assert lr_factor(150, t, 1000) == pytest.approx(0.1)
    assert [cosine_restart_progress(i, 20, 2.0) for i in (1, 20, 21, 60, 61, 140, 141)] == \
        pytest.approx([1 / 20, 1, 1 / 40, 1, 1 / 80, 1, 1 / 160])


def test_cosine_restarts_long_run_closed_form():
    """A million steps with short cycles: the same as counting the cycles one by one."""
    for mult in (1.0, 1.5):
        lengths, start, index = [7.0], 0.0, 1_000_000
        while index - 1 >= start + lengths[-1]:
            start += lengths[-1]
            lengths.append(lengths[-1] * mult)
        assert cosine_restart_progress(index, 7, mult) == pytest.approx((index - start) / lengths[-1])


def test_factor_applies_to_every_group_with_its_own_base_rate():
    unet, te = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([{"name": "unet", "params": unet.parameters(), "lr": 1e-3},
                             {"name": "text_encoder", "params": te.parameters(), "lr": 1e-4}])
    base = [g["lr"] for g in opt.param_groups]
    set_learning_rates(opt, base, 0.5)
    set_learning_rates(opt, base, 0.25)  # from the base rates, not compounding
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-4, 2.5e-5])


def test_png_of_planned_curve(tmp_path):
    t = training({"type": "linear_decay", "warmup_steps": 0, "min_factor": 0.0}, output_dir=str(tmp_path / "out"))
    path = write_planned_curve(t, 100)
    assert path == tmp_path / "out" / "lr_schedule.png"
    image = Image.open(path).convert("RGB")
    assert image.size == (WIDTH, HEIGHT)
    blue = [(x, y) for x in (LEFT + 1, WIDTH - RIGHT - 1) for y in range(HEIGHT)
            if image.getpixel((x, y)) == (30, 90, 200)]
    first = min(y for x, y in blue if x == LEFT + 1)
    last = max(y for x, y in blue if x == WIDTH - RIGHT - 1)
    assert abs(first - TOP) <= 3  # factor 0.99 at the first step: the top of the plot
    assert abs(last - (HEIGHT - BOTTOM)) <= 3  # factor 0 at the last step: the x axis
    assert [p.name for p in path.parent.iterdir()] == ["lr_schedule.png"]  # no temporary leftovers


def write(tmp_path, data):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"run": {"name": "r"}, **data}))
    return path


@pytest.mark.parametrize("data, expected", [
    ({"training": {"num_steps": 5, "lr_scheduler": {"type": "cosine_restarts"}}},
     'training.lr_scheduler.cycle_steps: null, but type "cosine_restarts" needs'),
    ({"training": {"num_steps": 5, "lr_scheduler": {"type": "cosine"}}},
     'training.lr_scheduler.type: expected one of "constant", "linear_decay", "cosine_decay", "cosine_restarts"'),
    ({"training": {"num_steps": 5, "lr_scheduler": {"min_factor": 1.5}}},
     "training.lr_scheduler.min_factor: 1.5 is out of range"),
    ({"training": {"num_steps": 5, "lr_scheduler": {"cycle_mult": 0.5}}},
     "training.lr_scheduler.cycle_mult: 0.5 is out of range; allowed: >= 1"),
    ({"training": {"num_steps": 5, "zero_terminal_snr": True, "prediction_type": "epsilon"}},
     'training.zero_terminal_snr: true needs training.prediction_type "v_prediction"'),
    ({"training": {"num_steps": 5}, "eval": {"use_ema": True}}, "eval.use_ema is true but model.use_ema is false"),
    ({"training": {"num_steps": 5}, "model": {"torch_compile_kwargs": {"mod": "max-autotune"}}},
     "model.torch_compile_kwargs: unknown argument(s) mod; torch.compile takes fullgraph"),
    ({"training": {"num_steps": 5, "snr_gamma": 0}},
     "training.snr_gamma: 0 is out of range; allowed: >= 0.0001 and <= 10000"),
])
def test_objective_config_errors(tmp_path, data, expected):
    data.setdefault("model", {})["train_text_encoder_1"] = False
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data))
    assert expected in str(info.value)


def test_objective_keys_accepted(tmp_path):
    data = {"model": {"train_text_encoder_1": False, "use_ema": True, "ema_on_cpu": True,
                      "use_torch_compile": True, "torch_compile_kwargs": {"mode": "max-autotune"}},
            "training": {"num_steps": 5, "noise_offset": 0.1, "min_sigma": 0.4, "min_sigma_warmup_steps": 500,
                         "prediction_type": "v_prediction", "zero_terminal_snr": True, "snr_gamma": 5.0,
                         "detect_anomaly": True, "lr_warmup_steps": 100,
                         "lr_scheduler": {"type": "cosine_restarts", "warmup_steps": 200, "min_factor": 0.3,
                                          "cycle_steps": 400, "cycle_mult": 1.0}}}
    cfg = load_config(write(tmp_path, data))
    assert cfg.training.lr_scheduler.cycle_steps == 400 and cfg.model.ema_on_cpu

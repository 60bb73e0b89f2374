"""model.memory_mode "auto": the rungs in speed order, the choice for several card sizes against the planner's own
numbers, keys written in the config winning, the log line, config.json; the planner's CUDA activation factor."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import ROOT, run_in_process, tiny_overrides

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import load_config
from sdxl_ff.model.parts import build_tiny_sdxl
from sdxl_ff.plan import auto, report
from sdxl_ff.plan.planner import CUDA_ACTIVATION_FACTOR, GiB, plan_memory

TINY = ["model.id=builtin:tiny-sdxl", "data.size=128", "run.name=x"]


def tiny_auto(*extra: str):
    return load_config(ROOT / "config.json", [*TINY, "training.max_grad_norm=null", *extra])


def test_config_json_asks_for_auto_and_leaves_the_chosen_keys_unwritten():
    cfg = load_config(ROOT / "config.json")
    assert cfg.model.memory_mode == "auto" and cfg.training.effective_batch_size == 4
    assert not any(cfg.is_explicit(key) for key in auto.CHOSEN)
    assert cfg.is_explicit("training.max_grad_norm") and cfg.is_explicit("model") and cfg.is_explicit("model.id")
    assert load_config(ROOT / "config.json", ["training.batch_size=2"]).is_explicit("training.batch_size")  # --set


def test_rungs_in_speed_order_keep_the_effective_batch():
    R = auto.Rung
    assert auto.rungs(tiny_auto(), processes=1, on_cuda=True) == [
        R(4, 1), R(4, 1, True), R(4, 1, True, True), R(4, 1, True, True, True),
        R(2, 2), R(2, 2, True), R(2, 2, True, False, True),  # fused_backward cannot accumulate
        R(1, 4), R(1, 4, True), R(1, 4, True, False, True)]
    # config.json clips the gradient norm: no fused_backward; several processes: neither
    assert R(4, 1, True, True) not in auto.rungs(load_config(ROOT / "config.json", TINY), 1, True)
    assert all(not r.fused_backward for r in auto.rungs(tiny_auto(), processes=2, on_cuda=True))
    six = auto.rungs(tiny_auto("training.effective_batch_size=6"), 1, True)
    assert [r for r in six if r == R(r.batch, r.accumulation)] == [R(6, 1), R(3, 2), R(2, 3), R(1, 6)]


def test_keys_written_in_the_config_win():
    cfg = tiny_auto("model.use_gradient_checkpointing=true", "model.full_bf16=false", "training.batch_size=2")
    rungs = auto.rungs(cfg, 1, True)
    assert rungs == [auto.Rung(2, 2, False, False, True)]  # batch written: accumulation 4 / 2; the rest pinned
    choice = auto.choose(cfg, GiB // 2)  # nothing is left to choose: it does not fit, and says so
    assert choice.rung == rungs[0] and not choice.fits and choice.kept == [
        "training.batch_size", "model.full_bf16", "model.use_gradient_checkpointing"]
    accum = auto.rungs(tiny_auto("training.grad_accum_steps=2"), 1, True)
    assert {(r.batch, r.accumulation) for r in accum} == {(2, 2)}


def small_ladder():
    """5 rungs over 4 traces (a trace costs seconds): batch 2 x 1 plain, full_bf16, + fused_backward; 1 x 2 plain,
    full_bf16 (checkpointing written as false)."""
    return tiny_auto("training.effective_batch_size=2", "model.use_gradient_checkpointing=false")


def test_the_choice_for_each_card_is_the_first_rung_that_fits(monkeypatch):
    cfg = small_ladder()
    rungs = auto.rungs(cfg, 1, True)
    assert rungs == [auto.Rung(2, 1), auto.Rung(2, 1, True), auto.Rung(2, 1, True, True), auto.Rung(1, 2),
                     auto.Rung(1, 2, True)]
    configs = report.model_configs(cfg)
    # each card below plans the rungs again: the same plans, kept (a plan depends on the settings, not the card)
    plans, plan_settings = {}, report.plan_settings
    monkeypatch.setattr(report, "model_configs", lambda cfg: configs)
    monkeypatch.setattr(report, "plan_settings", lambda cfg, configs, s, processes=1: plans.setdefault(
        (s, processes), plan_settings(cfg, configs, s, processes)))
    needs = []
    for rung in rungs:
        changed = auto.with_rung(cfg, rung)
        needs.append(report.plan_settings(changed, configs, report.settings_of(changed)).required_bytes)
    assert needs[0] == max(needs)  # the largest micro-batch in fp32 needs the most
    for card in sorted({*needs, max(needs) + GiB}):
        first = next(i for i, need in enumerate(needs) if need <= card)  # closed form: the first that fits
        choice = auto.choose(cfg, card)
        assert (choice.rung, choice.fits, [r for r, _ in choice.tried]) == (rungs[first], True, rungs[:first + 1])
        assert f"rung {first + 1} of {len(rungs)}, the fastest that fits the {card / GiB:.1f} GiB card" in choice.reason
    too_small = auto.choose(cfg, min(needs) - 1)
    assert too_small.rung == rungs[-1] and not too_small.fits and "no rung fits" in too_small.reason


def test_on_a_card_it_sets_the_keys_and_logs_the_reason(monkeypatch, caplog):
    cfg = small_ladder()
    rungs = auto.rungs(cfg, 1, True)
    second = auto.with_rung(cfg, rungs[1])
    card = report.plan_settings(second, report.model_configs(cfg), report.settings_of(second)).required_bytes

    class Props:
        total_memory = card

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    with caplog.at_level(logging.INFO, logger="sdxl_ff"):
        choice = auto.resolve_memory_mode(cfg, torch.device("cuda"), processes=1)
    assert choice.rung == rungs[1] == auto.Rung(2, 1, full_bf16=True)
    assert (cfg.training.batch_size, cfg.training.grad_accum_steps, cfg.model.full_bf16, cfg.training.fused_backward,
            cfg.model.use_gradient_checkpointing) == (2, 1, True, False, False)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("memory_mode auto:"))
    assert line.startswith("memory_mode auto: batch 2 x accumulation 1, full_bf16 on, fused_backward off, gradient "
                           f"checkpointing off (effective batch 2): rung 2 of 5, the fastest that fits the "
                           f"{card / GiB:.1f} GiB card: needs {card / GiB:.1f} GiB with the planner's margin; batch 2 "
                           f"x accumulation 1, full_bf16 off, fused_backward off, gradient checkpointing off needs ")
    assert "; kept as written: model.use_gradient_checkpointing (" in line


def test_without_cuda_the_fastest_rung_is_taken_and_logged(caplog):
    cfg = load_config(ROOT / "config.json", TINY)
    with caplog.at_level(logging.INFO, logger="sdxl_ff"):
        auto.resolve_memory_mode(cfg, torch.device("cpu"))
    assert (cfg.training.batch_size, cfg.training.grad_accum_steps, cfg.model.full_bf16,
            cfg.model.use_gradient_checkpointing) == (4, 1, False, False)
    assert ("memory_mode auto: batch 4 x accumulation 1, full_bf16 off, fused_backward off, gradient checkpointing "
            "off (effective batch 4): no CUDA device (cpu): no card to fit, so the fastest rung") in caplog.text
    manual = load_config(ROOT / "config.json", [*TINY, "model.memory_mode=manual",
                                                 "training.effective_batch_size=null"])
    assert auto.resolve_memory_mode(manual, torch.device("cpu")) is None and manual.training.batch_size == 1


def test_an_effective_batch_that_cannot_be_split_is_refused():
    with pytest.raises(ConfigError, match="training.effective_batch_size 4 is not divisible by training.batch_size 3; "
                                          "give a divisor of it, or remove training.batch_size"):
        load_config(ROOT / "config.json", [*TINY, "training.batch_size=3"])


@pytest.mark.parametrize("extra, why", [
    (["model.memory_mode=manual"], 'model.memory_mode is "manual": training.batch_size × grad_accum_steps is the '
                                    'effective batch'),
    (["training.batch_size=2", "training.grad_accum_steps=1"],
     "training.batch_size and training.grad_accum_steps are both set (2 × 1)"),
    (["data.bucket.enabled=true", "data.bucket.batch_size=2"],
     "data.bucket.batch_size / per_resolution_batch_sizes fix the micro-batch"),
])
def test_an_unused_effective_batch_is_a_warning(extra, why, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = load_config(ROOT / "config.json", [*TINY, *extra])
    assert f"training.effective_batch_size is 4 but {why}; it is not used" in caplog.text
    assert {(r.batch, r.accumulation) for r in auto.rungs(cfg, 1, True)} == {
        (cfg.training.batch_size, cfg.training.grad_accum_steps)}


def test_a_training_run_uses_the_choice_and_saves_it(tmp_path, sample_dir):
    values = tiny_overrides(tmp_path, sample_dir, steps=1)
    written = {"training.batch_size", "training.grad_accum_steps", "model.use_gradient_checkpointing"}
    args = [a for i, a in enumerate(values) if not (a == "--set" and values[i + 1].split("=")[0] in written)
            and a.split("=")[0] not in written]
    proc = run_in_process("--config", str(ROOT / "config.json"), *args, "--set", "training.effective_batch_size=2",
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory_mode auto: batch 2 x accumulation 1" in proc.stderr + proc.stdout
    saved = json.loads((tmp_path / "out" / "test" / "sdxl_ff_config.json").read_text())
    assert (saved["training"]["batch_size"], saved["training"]["grad_accum_steps"]) == (2, 1)


def test_plan_of_an_auto_config_shows_the_choice_first(tmp_path):
    proc = run_in_process("--config", str(ROOT / "config.json"), "--set", "model.id=builtin:tiny-sdxl",
                          "--set", "data.size=128", "--set", "run.name=x", "--plan", "--gpu-memory", "1000",
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("model.memory_mode auto chooses batch 4 x accumulation 1, full_bf16 off, fused_backward"
                               " off, gradient checkpointing off: rung 1 of ")
    assert "memory plan for one optimizer step at 128x128, batch 4, fp32, gradient checkpointing off" in proc.stdout
    assert lines[-1].startswith("fits: needs")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_cuda_plans_scale_the_traced_activations_without_checkpointing(checkpointing):
    unet = dict(build_tiny_sdxl(0).unet.config)
    cpu, cuda = (plan_memory(unet, resolution=128, batch=2, gradient_checkpointing=checkpointing, cuda=on)
                 for on in (False, True))
    factor = CUDA_ACTIVATION_FACTOR if not checkpointing else 1.0
    for (what, n_cpu, _), (_, n_cuda, _) in zip(cpu.rows, cuda.rows, strict=True):
        expected = int(factor * n_cpu) if what.startswith("activations") else n_cpu
        assert n_cuda == expected, what
    assert cuda.peak_bytes - cpu.peak_bytes == sum(n for _, n, _ in cuda.rows) - sum(n for _, n, _ in cpu.rows)
    assert ("traced x 1.33 (CUDA, measured)" in [how for _, _, how in cuda.rows]) != checkpointing

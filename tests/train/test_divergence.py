"""Silent divergence (issue 28.13): the rule over closed-form sequences, its state across a resume, and a real run
whose learning rate diverges the tiny model: one warning and a TensorBoard entry, or a stop that names the
checkpoint to go back to."""

import math
import re
from pathlib import Path

import pytest
from conftest import ROOT, run_in_process, tiny_overrides
from helpers import events, texts

from sdxl_ff.train.divergence import FACTOR, WINDOW, DivergenceError, DivergenceWatch, checkpoint_before


def feed(watch: DivergenceWatch, values: list[float], first_step: int = 10, every: int = 10) -> list:
    """Observe `values` logged at first_step, first_step + every, ...; what each observation returned."""
    return [watch.observe(first_step + i * every, v) for i, v in enumerate(values)]


def test_a_jump_that_stays_fires_once_at_the_end_of_the_window():
    watch = DivergenceWatch("train/loss")
    out = feed(watch, [0.1] * 5 + [1.0] * WINDOW + [1.0] * 3)
    assert [i for i, found in enumerate(out) if found is not None] == [5 + WINDOW - 1]  # once, at step 100
    found = out[5 + WINDOW - 1]
    assert (found.series, found.began_at, found.last_good_step, found.detected_at) == ("train/loss", 60, 50, 100)
    assert (found.best, found.best_step, found.last_value) == (0.1, 10, 1.0)  # a constant's running mean is itself
    assert found.describe() == ("train/loss diverged: 5 logged values in a row (since step 60; the last 1) are above "
                                "3 x its best running mean 0.1 (step 10)")


def test_the_bar_is_factor_times_the_best_running_mean_strictly():
    at_bar = DivergenceWatch("train/loss")
    assert not any(feed(at_bar, [0.1] * 5 + [0.3] * 20))  # 0.3 is not above 3 x 0.1 (0.30000000000000004)
    above = DivergenceWatch("train/loss")
    assert feed(above, [0.1] * 5 + [0.3001] * WINDOW)[-1] is not None
    assert FACTOR == 3.0


def test_a_short_spike_does_not_fire_a_second_one_that_stays_does():
    watch = DivergenceWatch("train/loss")
    spike = [0.1] * 5 + [50.0] * (WINDOW - 1) + [0.1]
    assert not any(feed(watch, spike))
    out = feed(watch, [50.0] * WINDOW, first_step=10 * len(spike) + 10)
    assert out[-1] is not None and out[-1].began_at == 10 * len(spike) + 10
    assert out[-1].last_good_step == 10 * len(spike)
    assert out[-1].best == 0.1  # the spike raised the running mean, not its minimum


def test_the_running_mean_not_one_lucky_value_sets_the_bar():
    """One value at a tenth of the others lowers the running mean by 0.3 x 0.9 = 27 %: the usual values stay below
    3 x that, where a bar of the lowest value (0.1) would have called all of them far."""
    watch = DivergenceWatch("train/loss")
    assert not any(feed(watch, [1.0] * 5 + [0.1] + [1.0] * 30))
    assert watch.best == pytest.approx(1.0 - 0.3 * 0.9)


def test_non_finite_values_count_as_far_and_do_not_move_the_mean():
    watch = DivergenceWatch("val/loss")
    out = feed(watch, [0.2, 0.2] + [math.nan, math.inf] * 3)
    fired = [found for found in out if found is not None]
    assert len(fired) == 1 and fired[0].began_at == 30 and fired[0].detected_at == 30 + 10 * (WINDOW - 1)
    assert watch.ema == 0.2 and watch.best == 0.2


def test_the_state_continues_where_it_stopped():
    """A run resumed from a state in the middle of a streak fires where the uninterrupted one does."""
    values = [0.5, 0.4, 0.2, 0.2] + [1.0] * (WINDOW + 2)
    whole = feed(DivergenceWatch("train/loss"), values)
    first = DivergenceWatch("train/loss")
    feed(first, values[:6])
    resumed = DivergenceWatch("train/loss")
    resumed.load_state_dict(first.state_dict())
    assert feed(resumed, values[6:], first_step=70) == whole[6:]
    assert sum(found is not None for found in whole) == 1


def test_the_checkpoint_before_the_onset(tmp_path):
    checkpoints = [tmp_path / f"step-{n:07d}" for n in (10, 50, 100)]
    assert checkpoint_before(checkpoints, 60) == checkpoints[1]
    assert checkpoint_before(checkpoints, 50) == checkpoints[1]
    assert checkpoint_before(checkpoints, 5) is None and checkpoint_before(checkpoints, None) is None


# AdamW at lr 0.1 throws the tiny model's loss from 1.04 (step 1) to 4.6, 4.8, 4.1, 11.6, 54.7 (steps 2-6), all
# finite: a divergence the rule sees at step 6 (5 values above 3 x 1.04), before any NaN (step 10).
DIVERGING = {"optimizer.type": "adamw", "training.lr_unet": "0.1", "training.log_every": "1",
             "training.detect_anomaly": "false"}


def test_a_diverging_run_warns_once_in_the_log_and_tensorboard(tmp_path):
    proc = run_in_process(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=7, **DIVERGING, **{
        "training.tensorboard.enabled": "true", "training.tensorboard.base_dir": str(tmp_path / "tb")}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "diverged" in line]
    assert len(warnings) == 1 and " WARNING train/loss diverged: 5 logged values in a row (since step 2; " in \
        warnings[0]
    assert ("it began after step 1, and no checkpoint of this run was saved before it (training.checkpoint_every "
            "saves them). Training goes on (training.stop_on_divergence: true stops here)") in warnings[0]
    [(step, text)] = texts(events(tmp_path / "tb" / "test"), "divergence")
    assert step == 6 and text == warnings[0].split(" WARNING ", 1)[1]
    import torch
    state = torch.load(tmp_path / "out" / "test" / "trainer_state.pt", weights_only=False)["divergence"]
    assert state["train/loss"]["fired"] is True and state["train/loss"]["best_step"] == 1
    assert state["val/loss"]["fired"] is False


def test_stop_on_divergence_stops_and_names_the_checkpoint_to_go_back_to(tmp_path):
    proc = run_in_process(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=8, **DIVERGING, **{
        "training.stop_on_divergence": "true", "training.checkpoint_every": "1"}))
    assert proc.returncode == DivergenceError.exit_code == 3
    checkpoints = Path(tmp_path / "out" / "test" / "checkpoints")
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"step-{n:07d}" for n in range(1, 6)]  # not step 6
    assert not (tmp_path / "out" / "test" / "model_index.json").exists()  # stopped without saving
    error = proc.stderr[proc.stderr.index("error: "):]
    assert error.startswith("error: training.stop_on_divergence: train/loss diverged: 5 logged values in a row "
                            "(since step 2; ")
    assert (f"it began after step 1, and the last checkpoint before it is {checkpoints / 'step-0000001'}. Stopped at "
            f"step 6 without saving, so that no better weights are overwritten: resume from it with a lower learning "
            f"rate or training.max_grad_norm (e.g. 1.0). Resume with:\n  ") in error
    command = error.split("Resume with:\n  ", 1)[1].splitlines()[0]
    assert f"training.resume_from={checkpoints / 'step-0000001'}" in command
    assert re.search(r"training\.lr_unet=0\.05\b", command)

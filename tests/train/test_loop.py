"""The loop's parts: TrainProgress saved and restored, the one per-step reduction, losses read only when needed."""

import math
import random
import types

import numpy as np
import torch

from sdxl_ff.checkpoint.checkpointer import StopRequest
from sdxl_ff.checkpoint.progress import TrainProgress
from sdxl_ff.train.step import step_signals

ONE_PROCESS = types.SimpleNamespace(num_processes=1)


def progress(seed: int = 7) -> TrainProgress:
    return TrainProgress(seed, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1))


def test_progress_round_trip_continues_every_stream():
    saved = progress()
    saved.global_step, saved.epoch, saved.batch_in_epoch = 5, 1, 3
    saved.add_loss(torch.tensor(0.5))
    saved.add_loss(0.25)
    torch.randn(3, generator=saved.noise_generator)
    state = saved.state_dict()
    expected = (torch.randn(4, generator=saved.noise_generator), torch.randn(4, generator=saved.rounding_generator),
                random.random(), np.random.rand(), torch.rand(2))
    restored = progress(seed=99)
    restored.load_state_dict(state)
    assert (restored.global_step, restored.epoch, restored.batch_in_epoch, restored.seed) == (5, 1, 3, 7)
    assert restored.losses == [0.5, 0.25]
    again = (torch.randn(4, generator=restored.noise_generator), torch.randn(4, generator=restored.rounding_generator),
             random.random(), np.random.rand(), torch.rand(2))
    assert all(torch.equal(a, b) for a, b in zip(expected[:2] + expected[4:], again[:2] + again[4:], strict=True))
    assert expected[2:4] == again[2:4]


def test_losses_stay_tensors_until_read():
    p = progress()
    for value in (1.0, 2.0, 4.0):
        p.add_loss(torch.tensor(value))
    assert len(p._unread) == 3 and all(isinstance(x, torch.Tensor) for x in p._unread)
    assert p.recent_loss(2) == 3.0 and p._unread == []  # one read for all, in order
    assert p.losses == [1.0, 2.0, 4.0]


def test_one_process_reads_nothing_unless_checking_finiteness():
    loss = torch.tensor(0.75)
    with StopRequest() as stop:
        result, bad, stopping = step_signals(ONE_PROCESS, loss, torch.tensor(0), stop, check_finite=False)
        assert result is loss and not bad and not stopping  # the loss stays on the device
        stop.signal_name = "SIGTERM"
        assert step_signals(ONE_PROCESS, loss, torch.tensor(0), stop, check_finite=False)[2]
    nan_loss = torch.tensor(math.nan)
    result, bad, _ = step_signals(ONE_PROCESS, nan_loss, torch.tensor(1), StopRequest(), check_finite=True)
    assert bad and result is nan_loss
    assert not step_signals(ONE_PROCESS, nan_loss, torch.tensor(1), StopRequest(), check_finite=False)[1]


def test_anomaly_watch_reads_a_step_one_step_late_and_names_it():
    import pytest

    from sdxl_ff.config.errors import AnomalyError
    from sdxl_ff.train.stability import AnomalyWatch
    watch = AnomalyWatch(enabled=True)
    watch.watch(4, torch.tensor([0.5, 0.25]), [["a.png"], ["b.png"]])
    watch.check(lambda: None)  # finite: nothing happens, and the pending step is consumed
    watch.watch(5, torch.tensor([0.5, math.inf]), [["c.png"], ["d.png", "e.png"]])
    with pytest.raises(AnomalyError) as raised:
        watch.check(lambda: "/runs/x/checkpoint-4")
    message = str(raised.value)
    assert "the loss became inf at optimizer step 5" in message and "checkpoint-4 (left untouched)" in message
    assert message.split("batch files:")[1].split("Try")[0].split() == ["-", "d.png", "-", "e.png"]
    watch.check(lambda: None)  # read once only
    off = AnomalyWatch(enabled=False)
    off.watch(1, torch.tensor([math.nan]), [["f.png"]])
    off.check(lambda: None)


def test_the_bar_ends_on_the_last_logged_loss(tmp_path):
    """issue 28.11: a run faster than the bar's half-second redraw ended showing step 1's loss. The bar now shows the
    loss each log line reads (the mean of steps 3-4 here), and reads none itself."""
    import re

    from conftest import ROOT, run_in_process, tiny_overrides
    proc = run_in_process(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=4,
                                          **{"training.log_every": "2"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = torch.load(tmp_path / "out" / "test" / "trainer_state.pt", weights_only=False)["losses"]
    logged = re.findall(r"step (\d)/4  loss ([0-9.]+)", proc.stdout)  # tqdm.write prints to stdout
    assert logged == [("2", f"{(losses[0] + losses[1]) / 2:.4f}"), ("4", f"{(losses[2] + losses[3]) / 2:.4f}")]
    shown = re.findall(r"loss=([0-9.]+)", proc.stderr)
    assert shown[-1] == logged[-1][1]
    assert set(shown) <= {value for _, value in logged}  # no other loss was read for the bar

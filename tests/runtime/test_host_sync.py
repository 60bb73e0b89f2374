"""The host-sync counter against known reads, and the real trainer's step: no read of the device outside logging."""

import torch
from conftest import ROOT, run_in_process, tiny_overrides

from sdxl_ff.runtime.host_sync import HostSyncCounter, optimizer_step_counters


def test_counter_counts_each_kind_of_read_once_and_every_op():
    x = torch.arange(4.0)
    with HostSyncCounter() as counter:
        y = x * 2  # 1 op
        assert float(y.sum()) == 12.0  # sum + _local_scalar_dense
        assert y.tolist() == [0.0, 2.0, 4.0, 6.0]  # one read, not two
        assert torch.nonzero(y).shape == (3, 1)
        with counter.paused():
            y.tolist()
            _ = (y + 1).sum().item()  # neither counted
    assert dict(counter.syncs) == {"item": 1, "tolist": 1, "nonzero": 1}
    assert counter.ops == 4 and counter.total_syncs == 3


def test_optimizer_step_counters_are_host_side():
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([p], lr=0.1, foreach=False)
    p.grad = torch.ones(3)
    optimizer.step()  # creates the state
    counters = optimizer_step_counters(optimizer)
    assert len(counters) == 1 and counters[0].item() == 1.0
    with HostSyncCounter(counters) as counter:
        optimizer.step()  # reads its step counter with .item(): a host tensor on CUDA too
    assert counter.total_syncs == 0 and counter.ops > 0
    with HostSyncCounter() as counter:
        optimizer.step()
    assert counter.syncs["item"] == 1


def test_a_non_logging_training_step_reads_nothing_from_the_device(tmp_path, monkeypatch):
    """train_step + Run.after_step of the real trainer, counted per optimizer step (the data loader's host work apart):
    every read of a device value (.item(), float(), .tolist(), nonzero, cuda syncs) waits for the device."""
    import train_sdxl_ff
    counts: dict[int, int] = {}
    from sdxl_ff.train.run import Run
    real_step, real_after = train_sdxl_ff.train_step, Run.after_step
    counter = None

    class HostLoader:  # the loader's own work runs on the host on every device
        def __init__(self, batches):
            self.batches = batches

        def __next__(self):
            with counter.paused():
                return next(self.batches)

    def counted_step(run, batches, stop):
        nonlocal counter
        counter = HostSyncCounter(optimizer_step_counters(run.optimizer))
        with counter:
            return real_step(run, HostLoader(batches), stop)

    def counted_after(run, result, *args):
        counter.host_side(optimizer_step_counters(run.optimizer))  # created by the first step
        with counter:
            outcome = real_after(run, result, *args)
        counts[run.progress.global_step] = counter.total_syncs
        return outcome

    monkeypatch.setattr(train_sdxl_ff, "train_step", counted_step)
    monkeypatch.setattr(Run, "after_step", counted_after)
    proc = run_in_process(*tiny_overrides(
        tmp_path, ROOT / "data" / "images", steps=6, **{
            "training.log_every": "3", "training.detect_anomaly": "true", "training.max_grad_norm": "1.0",
            "model.use_ema": "true", "training.ema_update_every": "1", "training.noise_offset": "0.1",
            "training.input_perturbation": "0.1", "training.batch_size": "2"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert counts.keys() == {1, 2, 3, 4, 5, 6}
    assert {step: counts[step] for step in (1, 2, 4, 5)} == {1: 0, 2: 0, 4: 0, 5: 0}
    assert counts[3] > 0 and counts[6] > 0  # the log lines read the losses: the counter sees reads

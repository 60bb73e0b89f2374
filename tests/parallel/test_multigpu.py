"""Several processes through accelerate (gloo on the CPU): the same result as one process with the same global batch."""

import re

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import ROOT, run_in_process, tiny_overrides
from helpers import PROBE, launch_two, relative_difference
from safetensors.torch import load_file
from two_process_runs import IMAGES, SEEDED, TWO

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.data.batch_sampler import SameSizeBatchSampler
from sdxl_ff.model.parts import build_tiny_sdxl
from sdxl_ff.objective.diffusion import Shard
from sdxl_ff.parallel.processes import (
    DEFAULT_WAIT_TIMEOUT,
    SHUTDOWN_TIMEOUT_ENV,
    WAIT_TIMEOUT_ENV,
    check_launch_engine,
    shutdown_advice,
    wait_timeout,
)


def test_shards_partition_each_global_batch():
    sizes = [(64, 64)] * 9 + [(64, 128)] * 6
    one = SameSizeBatchSampler(sizes, batch_size=4, seed=7, drop_last=True)
    ranks = [SameSizeBatchSampler(sizes, batch_size=2, seed=7, num_replicas=2, rank=r) for r in (0, 1)]
    expected = [[(0, i) for i in batch] for batch in one.batches(0)]
    got = [a + b for a, b in zip(*(list(r) for r in ranks), strict=True)]
    assert got == expected  # rank 0 takes the first half of each global batch, rank 1 the second
    assert len(ranks[0]) == len(ranks[1]) == len(one) == 3  # 9 -> 2 global batches (1 image left), 6 -> 1


def test_shard_draws_equal_the_single_process_draws():
    single = torch.randn((6, 4, 2, 2), generator=torch.Generator().manual_seed(3))
    halves = [Shard(r, 2).randn((3, 4, 2, 2), torch.Generator().manual_seed(3)) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), single)
    steps = [Shard(r, 3).randint(1000, 2, torch.Generator().manual_seed(5)) for r in range(3)]
    assert torch.equal(torch.cat(steps), torch.randint(0, 1000, (6,), generator=torch.Generator().manual_seed(5)))


def test_two_processes_match_one_and_write_once(tmp_path, two_process_runs):
    one = run_in_process(*tiny_overrides(tmp_path / "one", IMAGES, steps=4, **{**TWO, "training.batch_size": "4"}))
    assert one.returncode == 0, one.stderr[-3000:]
    log = two_process_runs.log("ddp")
    assert two_process_runs.codes("ddp") == [0, 0], log[-3000:]
    assert "effective batch 4" in log and "batch 2 per process" in log
    assert log.count("INFO saved ") == 1 and log.count("INFO checkpoint: ") == 1  # only the main process writes
    assert log.count("step 1/4 ") == 1  # the progress lines come from the main process only
    out_one, out_two = tmp_path / "one" / "out" / "test", two_process_runs.output("ddp")
    assert sorted(p.name for p in (out_two / "checkpoints").iterdir()) == ["step-0000002"]
    assert not [p for p in out_two.rglob(".*")]  # no temporary leftovers
    for part, file in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        a, b = load_file(out_one / part / file), load_file(out_two / part / file)
        difference = relative_difference(a, b, getattr(build_tiny_sdxl(0), part).state_dict())
        assert difference < 1e-3, (part, difference)  # summation order only
    la = torch.load(out_one / "trainer_state.pt", weights_only=False)["losses"]
    lb = torch.load(out_two / "trainer_state.pt", weights_only=False)["losses"]
    assert len(la) == len(lb) == 4
    assert all(abs(x - y) < 1e-5 for x, y in zip(la, lb, strict=True))  # the logged loss is the global mean


def test_full_bf16_replicas_stay_identical(two_process_runs):
    """bf16 weights with stochastic rounding on two processes: every step all-reduces, every rank rounds alike."""
    log = two_process_runs.log("full-bf16")
    assert two_process_runs.codes("full-bf16") == [0, 0], log[-3000:]
    assert "bf16 weights with stochastic rounding" in log and "effective batch 4" in log
    rank0, rank1 = (load_file(two_process_runs.folder / f"full-bf16.rank{r}.safetensors") for r in (0, 1))
    saved = load_file(two_process_runs.output("full-bf16") / "unet" / "diffusion_pytorch_model.safetensors")
    base = build_tiny_sdxl(0).unet.state_dict()
    assert rank0.keys() == rank1.keys() == saved.keys()
    assert all(v.dtype == torch.bfloat16 for v in rank0.values())
    assert any(not torch.equal(rank0[k].float(), base[k].to(torch.bfloat16).float()) for k in rank0)  # it trained
    differing = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not differing, f"{len(differing)} of {len(rank0)} tensors differ between the ranks, e.g. {differing[0]}"
    assert all(torch.equal(rank0[k].float(), saved[k].float()) for k in rank0)


def test_fused_backward_refused_on_several_processes(two_process_runs):
    assert all(code != 0 for code in two_process_runs.codes("fused"))
    assert "training.fused_backward cannot run on several processes" in two_process_runs.log("fused")


def test_sharding_engines_are_refused_by_name():
    for kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        check_launch_engine({"ACCELERATE_USE_FSDP": "false"}, kind)
    for environ, kind, name in [({"ACCELERATE_USE_FSDP": "true"}, None, "FSDP"),
                                ({"ACCELERATE_USE_DEEPSPEED": "1"}, None, "DeepSpeed"),
                                ({}, DistributedType.DEEPSPEED, "DEEPSPEED"), ({}, DistributedType.XLA, "XLA")]:
        with pytest.raises(ConfigError, match=f"{name} is not supported.*--multi_gpu"):
            check_launch_engine(environ, kind)


def test_fsdp_launch_stops_before_anything_is_written(tmp_path):
    """`accelerate launch --use_fsdp` (an FSDP `accelerate config`) gets our error, not accelerate's traceback."""
    probe = tmp_path / "probe.py"  # the trainer as accelerate runs it, then the heavy modules it had imported
    probe.write_text(f"import sys\nsys.argv = ['-c', {str(ROOT / 'train_sdxl_ff.py')!r}, *sys.argv[1:]]\n"
                     f"{PROBE}    raise\n")  # PROBE as `python -c PROBE train_sdxl_ff.py ARGS` runs it, exit code kept
    proc = launch_two(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=1), timeout=300, engine="--use_fsdp",
                      script=probe)
    assert proc.returncode != 0
    assert proc.stdout.count("exit 2 imported []") == 2, proc.stdout + proc.stderr[-3000:]  # refused before torch
    assert proc.stderr.count("error: accelerate launch: FSDP is not supported") == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("error: accelerate launch")[0]
    assert not (tmp_path / "out").exists()


def test_random_seed_text_encoder_2_and_ema_on_two_processes_match_one(tmp_path, two_process_runs):
    """seed null: the main process draws it for all; a DDP-wrapped text encoder 2 trains; the EMA is the main's."""
    log = two_process_runs.log("seed")
    assert two_process_runs.codes("seed") == [0, 0], log[-3000:]
    seeds = re.findall(r"seed: (\d+) \(random", log)
    assert len(seeds) == 1, log[-3000:]  # drawn once and logged by the main process
    assert log.count(f"a wait for the main process times out after {DEFAULT_WAIT_TIMEOUT}") == 1  # torch's own value
    assert log.count(f"{SHUTDOWN_TIMEOUT_ENV}=900 accelerate launch") == 1
    out_two = two_process_runs.output("seed")
    state_two = torch.load(out_two / "trainer_state.pt", weights_only=False)
    assert state_two["seed"] == int(seeds[0]) and state_two["ema_in_weights"]
    checkpoint = out_two / "checkpoints" / "step-0000002"
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=False)["ema"]["num_updates"] == 2
    # one process, the same seed, the same global batch: if rank 1 had drawn another seed, it would have
    # trained on other images (another order) with other noise, and the results would differ
    one = run_in_process(*tiny_overrides(tmp_path / "one", IMAGES, steps=3, **{
        **SEEDED, "training.batch_size": "4", "training.seed": seeds[0]}))
    assert one.returncode == 0, one.stderr[-3000:]
    out_one = tmp_path / "one" / "out" / "test"
    state_one = torch.load(out_one / "trainer_state.pt", weights_only=False)
    assert all(abs(x - y) < 1e-5 for x, y in zip(state_one["losses"], state_two["losses"], strict=True))
    base = build_tiny_sdxl(0)
    for part, file in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder_2", "model.safetensors")):
        a, b = load_file(out_one / part / file), load_file(out_two / part / file)  # the EMA weights (final save)
        difference = relative_difference(a, b, getattr(base, part).state_dict())
        assert difference < 1e-3, (part, difference)
    ema_one, ema_two = state_one["ema"]["shadow"], state_two["ema"]["shadow"]
    assert sorted(ema_one) == sorted(ema_two) and any(k.startswith("text_encoder_2.") for k in ema_two)
    plain = {f"{n}.{k}": v.detach() for n in ("unet", "text_encoder_2") for k, v in getattr(base, n).named_parameters()}
    difference = relative_difference(ema_one, ema_two, plain)
    assert difference < 1e-3, difference

    # "seed-resumed": two processes from the step-2 checkpoint, which the main process had renamed to
    # .step-0000002.old before that run (caught between the two renames of a folder swap): the main process
    # puts it back while the other waits; the main process alone loads the EMA
    resumed = two_process_runs.log("seed-resumed")
    assert two_process_runs.codes("seed-resumed") == [0, 0], resumed[-3000:]
    assert checkpoint.is_dir() and not checkpoint.with_name(".step-0000002.old").exists()
    state_resumed = torch.load(two_process_runs.output("seed-resumed") / "trainer_state.pt", weights_only=False)
    assert state_resumed["seed"] == state_two["seed"] and state_resumed["ema"]["num_updates"] == 3
    assert all(abs(x - y) < 1e-6 for x, y in zip(state_resumed["losses"], state_two["losses"], strict=True))
    difference = relative_difference(state_resumed["ema"]["shadow"], ema_two, plain)
    assert difference < 1e-5, difference


def test_wait_timeout_and_shutdown_advice():
    assert wait_timeout({}) == DEFAULT_WAIT_TIMEOUT
    assert wait_timeout({WAIT_TIMEOUT_ENV: "300"}).total_seconds() == 300 * 60
    for bad in ("0", "-5", "soon"):
        with pytest.raises(ConfigError, match=f"{WAIT_TIMEOUT_ENV}='{bad}'.*minutes"):
            wait_timeout({WAIT_TIMEOUT_ENV: bad})
    assert shutdown_advice({}, 1) is None  # one process: no torchrun agent kills it
    assert "is 30 s" in shutdown_advice({}, 2) and "is 60 s" in shutdown_advice({SHUTDOWN_TIMEOUT_ENV: "60"}, 2)
    assert shutdown_advice({SHUTDOWN_TIMEOUT_ENV: "900"}, 4) is None

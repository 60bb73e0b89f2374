"""The CUDA tier: the paths a CPU never runs (CUDA autocast and GradScaler, bitsandbytes' CUDA kernels,
flash-attn, CUDA RNG in resume, NCCL). Marked `cuda`: skipped without a GPU, failed instead when
SDXL_FF_REQUIRE_CUDA=1 (tests/conftest.py). `benchmarks/gpu_acceptance.py` runs this file after its rows.

SDXL_FF_CUDA_TIER_DEVICE=cpu runs the same tests on the CPU, to check the tests' own code without a GPU
(comparisons between the CPU and CUDA then compare the CPU with itself).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cuda_tier_device, run_cli, run_in_process, tiny_overrides
from helpers import assert_same_tree
from safetensors.torch import load_file

pytestmark = pytest.mark.cuda
DEVICE = cuda_tier_device() or "cuda"
STEPS, K = 24, 6

PRECISIONS = {  # the precisions a config can ask for on a GPU (use_bf16: false means fp16 autocast there)
    "bf16 autocast": ({"model.use_bf16": "true"}, "precision: bf16 autocast"),
    "fp16 autocast + GradScaler": ({"model.use_bf16": "false"}, "precision: fp16 autocast + GradScaler"),
    "full_bf16": ({"model.use_bf16": "true", "model.full_bf16": "true"}, "bf16 weights with stochastic rounding"),
    "fused_backward": ({"model.use_bf16": "true", "training.fused_backward": "true",
                        "training.max_grad_norm": "null"}, "fused backward pass"),
}
if DEVICE == "cpu":  # what the CPU runs instead: fp32 (use_bf16: false means fp32 there)
    PRECISIONS["fp16 autocast + GradScaler"] = ({"model.use_bf16": "false"}, "precision: fp32")


def cuda_args(tmp: Path, steps: int = STEPS, **extra: str) -> list[str]:
    return tiny_overrides(tmp, ROOT / "data" / "images", steps=steps,
                          **{"device": DEVICE, "training.max_grad_norm": "1.0", **extra})


def trainer_state(folder: Path) -> dict:
    return torch.load(folder / "trainer_state.pt", weights_only=False)


def all_weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("unet", "text_encoder"):
        for file in sorted((folder / part).glob("*.safetensors")):
            out.update({f"{part}.{k}": v for k, v in load_file(file).items()})
    return out


# --------------------------------------------------------------------------- attention

@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_attn_matches_sdpa(dtype):
    from flash_attn import flash_attn_func
    g = torch.Generator(DEVICE).manual_seed(0)
    q, k, v = (torch.randn(2, 1024, 10, 64, device=DEVICE, dtype=dtype, generator=g) for _ in range(3))
    flash = flash_attn_func(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert (flash.float() - sdpa.float()).abs().max() < (2e-3 if dtype == torch.float16 else 1.6e-2)


# --------------------------------------------------------------------------- the trainer in each precision

@pytest.fixture(scope="module", params=list(PRECISIONS))
def precision_run(request, tmp_path_factory):
    overrides, expected = PRECISIONS[request.param]
    tmp = tmp_path_factory.mktemp("cuda_run")
    proc = run_cli(*cuda_args(tmp, **overrides))
    return request.param, expected, tmp / "out" / "test", proc


def test_each_precision_trains_and_says_so(precision_run):
    name, expected, out, proc = precision_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stderr, name
    assert f"device: {DEVICE}" in proc.stderr
    kernel = "flash-attn" if importlib.util.find_spec("flash_attn") else "attention: PyTorch SDPA"
    assert kernel in proc.stderr  # the log line names the attention kernel it chose
    losses = trainer_state(out)["losses"]
    assert len(losses) == STEPS and np.isfinite(losses).all(), losses
    first, last = sum(losses[:K]) / K, sum(losses[-K:]) / K
    assert last < 0.75 * first, (name, first, last)
    assert all(torch.isfinite(t).all() for t in all_weights(out).values())


def test_each_precision_saves_a_folder_diffusers_loads_and_samples(precision_run):
    from diffusers import StableDiffusionXLPipeline
    name, _, out, proc = precision_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True).to(DEVICE)
    image = pipe("a red circle on a green background", num_inference_steps=4, height=128, width=128,
                 output_type="np", generator=torch.Generator(DEVICE).manual_seed(0)).images
    assert image.shape == (1, 128, 128, 3) and np.isfinite(image).all() and float(image.std()) > 0, name


def test_fp16_run_keeps_its_grad_scaler_state(precision_run):
    name, _, out, proc = precision_run
    if name != "fp16 autocast + GradScaler" or DEVICE == "cpu":
        pytest.skip("the GradScaler exists in the fp16 run on a GPU only")
    scaler = trainer_state(out)["scaler"]
    assert scaler is not None and scaler["scale"] > 0


# --------------------------------------------------------------------------- bitsandbytes' CUDA kernels

def test_adamw8bit_on_cuda_matches_the_cpu_within_8bit_tolerance():
    import bitsandbytes as bnb
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(256, 64, generator=g) * 0.05, torch.randn(4096 * 3, generator=g) * 0.05]
    grads = [[torch.randn(t.shape, generator=g) * 0.01 for t in init] for _ in range(10)]
    results, states = {}, {}
    for device in ("cpu", DEVICE):
        params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
        optimizer = bnb.optim.AdamW8bit(params, lr=1e-3, weight_decay=0.01)
        for step in grads:
            for p, grad in zip(params, step, strict=True):
                p.grad = grad.to(device)
            optimizer.step()
        results[device] = [p.detach().cpu() for p in params]
        states[device] = optimizer.state[params[0]]
    assert states[DEVICE]["state1"].dtype == torch.uint8  # 8-bit state on the device too
    for before, cpu, dev in zip(init, results["cpu"], results[DEVICE], strict=True):
        update_cpu, update_dev = cpu - before, dev - before
        assert (update_dev - update_cpu).norm() / update_cpu.norm() < 0.02


# --------------------------------------------------------------------------- exact resume

# Deterministic kernels: without them two identical CUDA runs already differ in the last bits (atomics in
# convolution and attention backward passes), so nothing could be compared bit for bit.
DETERMINISTIC_MAIN = ("import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                      "from train_sdxl_ff import main; sys.exit(main(sys.argv[1:]))")


def run_deterministic(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    return subprocess.run([sys.executable, "-c", DETERMINISTIC_MAIN, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode", ["fp16 autocast + GradScaler", "full_bf16"])
def test_stop_and_resume_on_cuda_is_bit_exact(tmp_path, mode):
    """Straight N steps == N/2 steps, checkpoint, resume to N: weights, optimizer state, losses, CUDA RNG."""
    overrides, _ = PRECISIONS[mode]
    common = {**overrides, "model.cudnn_benchmark": "false", "training.checkpoint_every": "4",
              "model.train_text_encoder_1": "true", "training.lr_text_encoder_1": "1e-4"}
    straight = run_deterministic(*cuda_args(tmp_path, steps=8, **{**common, "run.name": "straight"}))
    assert straight.returncode == 0, straight.stderr[-3000:]
    again = run_deterministic(*cuda_args(tmp_path, steps=8, **{**common, "run.name": "again"}))
    assert again.returncode == 0, again.stderr[-3000:]
    out = tmp_path / "out"
    a, b = all_weights(out / "straight"), all_weights(out / "again")
    assert all(torch.equal(a[k], b[k]) for k in a), "two identical deterministic CUDA runs differ"
    checkpoint = out / "straight" / "checkpoints" / f"step-{4:07d}"
    assert checkpoint.is_dir(), sorted(p.name for p in (out / "straight").rglob("*"))[:20]
    resumed = run_deterministic(*cuda_args(tmp_path, steps=8, **{**common, "run.name": "resumed",
                                                                 "training.resume_from": str(checkpoint)}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    c = all_weights(out / "resumed")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    s, r = trainer_state(out / "straight"), trainer_state(out / "resumed")
    assert s["losses"] == r["losses"]
    assert torch.equal(s["rounding_generator"], r["rounding_generator"])  # the CUDA generator of the rounding
    for key in ("optimizer", "scaler"):
        assert_same_tree(s[key], r[key], key)


# --------------------------------------------------------------------------- no host sync outside logging

SYNC_FREE_MODES = {  # every optimizer implementation the trainer picks (sdxl_ff/optim/optimizers.py)
    "fp32 + AdamW8bit": {},
    "fp32 + AdamW": {"optimizer.type": "adamw"},
    "full_bf16": {"model.use_bf16": "true", "model.full_bf16": "true"},
    "full_bf16 + fused_backward": {"model.use_bf16": "true", "model.full_bf16": "true",
                                   "training.fused_backward": "true", "training.max_grad_norm": "null"},
}


@contextlib.contextmanager
def waits_refused(counter_for_cpu) -> Iterator[None]:
    """On CUDA, torch.cuda.set_sync_debug_mode("error"): any host-device sync (.item(), a blocking copy,
    torch.cuda.synchronize as bitsandbytes' step made per tensor) raises. SDXL_FF_CUDA_TIER_DEVICE=cpu: the
    CPU's counter of the reads that would wait on a GPU (sdxl_ff/runtime/host_sync.py) must stay at 0."""
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        with counter_for_cpu:
            yield
        assert counter_for_cpu.total_syncs == 0, dict(counter_for_cpu.syncs)


@pytest.mark.parametrize("mode", SYNC_FREE_MODES)
def test_non_logging_steps_never_wait_for_the_gpu(tmp_path, monkeypatch, mode):
    """train_step + after_step of the real trainer under the sync check, on every step that neither logs (every
    4th) nor is among the first 2 (which compile torchao's update, choose cuDNN algorithms, move the scheduler's
    tables to the GPU) nor the last (which saves)."""
    import train_sdxl_ff
    from sdxl_ff.runtime.host_sync import HostSyncCounter, optimizer_step_counters
    steps, log_every = 8, 4
    real_step, real_after = train_sdxl_ff.train_step, train_sdxl_ff.after_step
    checked: list[int] = []

    def quiet(step: int) -> bool:
        return step > 2 and step % log_every != 0 and step != steps

    def counter(run) -> HostSyncCounter:
        return HostSyncCounter(optimizer_step_counters(run.optimizer))

    def checked_step(run, batches, stop):
        step = run.progress.global_step + 1
        if not quiet(step):
            return real_step(run, batches, stop)
        checked.append(step)
        count = counter(run)
        with waits_refused(count):
            return real_step(run, batches if DEVICE == "cuda" else HostLoader(batches, count), stop)

    def checked_after(run, result, *args):
        if not quiet(run.progress.global_step):
            return real_after(run, result, *args)
        with waits_refused(counter(run)):
            return real_after(run, result, *args)

    class HostLoader:  # on the CPU the loader's own work stays on the host on every device: not counted
        def __init__(self, batches, count: HostSyncCounter):
            self.batches, self.count = batches, count

        def __next__(self):
            with self.count.paused():
                return next(self.batches)

    monkeypatch.setattr(train_sdxl_ff, "train_step", checked_step)
    monkeypatch.setattr(train_sdxl_ff, "after_step", checked_after)
    proc = run_in_process(*cuda_args(tmp_path, steps=steps, **{"training.log_every": str(log_every),
                                                                 **SYNC_FREE_MODES[mode]}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert checked == [3, 5, 6, 7]


# --------------------------------------------------------------------------- the fp32 VAE under fp16 autocast

def test_fp32_vae_gives_finite_latents_under_fp16_autocast_on_cuda():
    from sdxl_ff.eval.backends import decode
    from sdxl_ff.model.parts import build_tiny_sdxl
    from sdxl_ff.objective.predict import encode_latents
    vae = build_tiny_sdxl(0).vae.eval().to(DEVICE)
    with torch.no_grad():  # as SDXL's VAE does: activations beyond fp16's maximum (65504)
        vae.encoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.weight.mul_(1e5)
    pixels = torch.linspace(-1, 1, 3 * 64 * 64, device=DEVICE).reshape(1, 3, 64, 64)
    fp32 = encode_latents(vae, pixels, torch.Generator().manual_seed(0))  # the trainer draws noise on the CPU
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
        if DEVICE == "cuda":
            assert not torch.isfinite(vae.encode(pixels).latent_dist.mean).all()  # the overflow is real
        latents = encode_latents(vae, pixels, torch.Generator().manual_seed(0))
        image = decode(vae, fp32)
    assert torch.isfinite(latents).all() and torch.equal(latents, fp32)
    assert np.isfinite(image).all()


# --------------------------------------------------------------------------- several GPUs

@pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.device_count() < 2, reason="needs 2 or more GPUs")
def test_two_processes_over_nccl_match_one(tmp_path):
    if DEVICE != "cuda":
        pytest.skip("NCCL needs GPUs")
    common = {"model.use_bf16": "true", "training.batch_size": "4", "training.max_grad_norm": "null",
              "model.cudnn_benchmark": "false"}
    one = run_deterministic(*cuda_args(tmp_path, steps=4, **{**common, "run.name": "one"}))
    assert one.returncode == 0, one.stderr[-3000:]
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          str(ROOT / "train_sdxl_ff.py"), *cuda_args(tmp_path, steps=4, **{**common,
                                                                                           "run.name": "two"})],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = all_weights(tmp_path / "out" / "one"), all_weights(tmp_path / "out" / "two")
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-2, worst  # the same global batch; only the all-reduce's summation order differs

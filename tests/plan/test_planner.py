"""The memory planner: optimizer layouts against bitsandbytes itself, predictions against real CPU peaks,
`--plan` on SDXL base's configs without any weight file, and the CUDA run's plan-vs-measured helper."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from conftest import ROOT, run_in_process
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import load_config
from sdxl_ff.plan import report as plan_report
from sdxl_ff.plan.planner import GiB, MemoryPlan, adamw8bit_state_bytes, optimizer_state_bytes, parse_mode

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_planner  # noqa: E402

SDXL_CONFIGS = ROOT / "tests" / "reference" / "sdxl_base_configs"


def test_adamw8bit_layout_closed_form():
    assert adamw8bit_state_bytes(4095) == 2 * 4 * 4095  # below min_8bit_size: two fp32 moments
    assert adamw8bit_state_bytes(4096) == 2 * 4096 + 2 * 4 * 16  # uint8 moments + one fp32 absmax per 256
    assert adamw8bit_state_bytes(4097) == 2 * 4097 + 2 * 4 * 17


@pytest.mark.parametrize("per_param", [False, True])
def test_adamw8bit_state_equals_bitsandbytes(per_param):
    """The computed state equals the bytes of the distinct tensors bitsandbytes' AdamW8bit really keeps."""
    import bitsandbytes as bnb
    sizes = [100, 4095, 4096, 5000, 70_001]
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    optimizers = [bnb.optim.AdamW8bit([p]) for p in params] if per_param else [bnb.optim.AdamW8bit(params)]
    for p in params:
        p.grad = torch.randn_like(p)
    for opt in optimizers:
        opt.step()
    storages = {}
    for opt in optimizers:
        for state in opt.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    assert sum(storages.values()) == optimizer_state_bytes(sizes, "adamw8bit", per_param=per_param)


def test_adamw_state_equals_torch():
    params = [torch.nn.Parameter(torch.randn(n)) for n in (10, 3000)]
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    real = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert real == optimizer_state_bytes([10, 3000], "adamw", per_param=False)


def test_mode_names():
    assert parse_mode("fp32") == (False, False)
    assert parse_mode("full_bf16+fused_backward") == (True, True)
    assert parse_mode("fp32+fused_backward") == (False, True)
    for bad in ("bf16", "fp32+full_bf16", "fused_backward"):
        with pytest.raises(ValueError, match="expected one of fp32, full_bf16"):
            parse_mode(bad)


@pytest.mark.parametrize("kind", ["tiny", "mid"])
@pytest.mark.parametrize("mode", bench_planner.MODES)
def test_prediction_within_10_percent_of_the_real_cpu_peak(kind, mode):
    rows = bench_planner.compare(kind, mode)
    assert [row["checkpointing"] for row in rows] == [False, True]
    for row in rows:
        assert abs(row["error"]) <= 0.10, row


def test_module_sizes_are_built_once_per_config_and_equal_a_fresh_build():
    """Every plan of a ladder asks for the same modules' sizes: built once on the meta device, a fresh list each
    time (a caller's change cannot reach the next plan), and equal to the module's own parameters."""
    from sdxl_ff.model.parts import build_tiny_sdxl
    from sdxl_ff.plan import planner
    vae = dict(build_tiny_sdxl(0).vae.config)
    first = planner.module_sizes("vae", vae)
    builds = planner._sizes_cached.cache_info().misses
    first.append(-1)
    assert planner.module_sizes("vae", dict(reversed(vae.items()))) == first[:-1]  # the key ignores the order
    assert planner._sizes_cached.cache_info().misses == builds
    assert first[:-1] == [p.numel() for p in build_tiny_sdxl(0).vae.parameters()]
    assert planner.module_sizes("vae", {**vae, "latent_channels": 8}) != first[:-1]  # another config: built anew


def configs_only_folder(tmp_path):
    """SDXL base as fetched with --exclude "*.safetensors": configs, and a corrupt weight file as a trap."""
    folder = tmp_path / "sdxl-base"
    shutil.copytree(SDXL_CONFIGS, folder)
    for part in ("tokenizer", "tokenizer_2", "scheduler"):
        (folder / part).mkdir()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a weight file")
    return folder


def test_plan_on_sdxl_base_configs_prints_every_row(tmp_path):
    folder = configs_only_folder(tmp_path)
    proc = run_in_process("--config", str(ROOT / "config.json"), "--set", f"model.id={folder}",
                          "--set", "run.name=plan", "--set", "data.size=1024",
                          "--set", "training.batch_size=1", "--set", "model.use_gradient_checkpointing=false",
                          "--set", "model.train_text_encoder_1=false", "--set", "training.max_grad_norm=null",
                          "--set", "training.grad_accum_steps=1", "--set", "model.memory_mode=manual",
                          "--plan", "--gpu-memory", "24", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("weights (trained, fp32)", "gradients alive at the peak", "optimizer state (adamw8bit)",
                "activations + temporaries",
                "text_encoder (frozen, on the device)", "text_encoder_2 (frozen, on the device)",
                "vae (frozen, on the device)", "peak (max_memory_allocated)", "margin: CUDA context",
                "needed on the card", "traced: the UNet's forward and backward", "does not fit"):
        assert row in out, (row, out)
    assert "9.56 GiB  (computed)" in out  # 2,567.5 M fp32 weights
    ladder = [line.split()[1] for line in out.splitlines() if line.strip().startswith("--set")]
    assert ladder[:3] == ["data.text_embedding_cache.enabled=true", "data.latent_cache.enabled=true",
                          "model.full_bf16=true"]
    assert out.splitlines()[-1].rstrip().endswith(" fits")


def test_plan_of_the_tiny_model_without_a_card(tmp_path):
    proc = run_in_process("--config", str(ROOT / "configs" / "quickstart.json"), "--plan", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory plan for one optimizer step at 128x128" in proc.stdout
    assert "not checking whether it fits" in proc.stdout and "(traced)" in proc.stdout


@pytest.mark.parametrize("gb", [0.0, -24.0, float("nan"), float("inf")])
def test_gpu_memory_must_be_a_size(gb):
    cfg = load_config(ROOT / "configs" / "quickstart.json")
    with pytest.raises(ConfigError, match="--gpu-memory: .* is not a memory size; give the card's memory in GiB"):
        plan_report.plan_text(cfg, gb)


def test_plan_arguments_are_refused_when_they_cannot_be_read(tmp_path):
    """issue 28.7: `--plan --gpu-memory inf` ended in an OverflowError traceback; --gpu-memory without --plan was
    silently ignored."""
    quickstart = str(ROOT / "configs" / "quickstart.json")
    infinite = run_in_process("--config", quickstart, "--plan", "--gpu-memory", "inf", cwd=tmp_path)
    assert infinite.returncode == ConfigError.exit_code
    assert infinite.stderr.strip() == ("error: --gpu-memory: inf is not a memory size; give the card's memory in "
                                       "GiB, e.g. 24")
    for flag, value in (("--gpu-memory", "24"), ("--processes", "4")):
        alone = run_in_process("--config", quickstart, flag, value, cwd=tmp_path)
        assert alone.returncode == ConfigError.exit_code
        assert alone.stderr.strip() == (f"error: {flag} {value} is only read by --plan (a training run uses the card "
                                        f"and processes it runs on); add --plan, or remove {flag}")
        assert not (tmp_path / ".output").exists()  # refused before anything ran


def test_ladder_cheapest_in_speed_first():
    cfg = load_config(ROOT / "config.json", [
        "run.name=x", "model.use_ema=true", "model.use_gradient_checkpointing=false", "training.batch_size=4",
        "training.max_grad_norm=null", "training.grad_accum_steps=1"])
    steps = plan_report.ladder(cfg, plan_report.settings_of(cfg))
    assert [text for text, _ in steps] == [
        "data.text_embedding_cache.enabled=true", "data.latent_cache.enabled=true", "model.ema_on_cpu=true",
        "model.full_bf16=true", "training.fused_backward=true", "model.use_gradient_checkpointing=true",
        "training.batch_size=2", "training.batch_size=1"]
    last = steps[-1][1]
    assert (last.text_cache, last.latent_cache, last.ema_on_cpu, last.full_bf16, last.fused_backward,
            last.checkpointing, last.batch) == (True, True, True, True, True, True, 1)


def test_largest_step_takes_the_most_pixels_per_batch():
    cfg = load_config(ROOT / "config.json", [
        "run.name=x", "data.bucket.enabled=true", "data.bucket.batch_size=2",
        "data.bucket.resolutions=[[1024, 1024], [768, 1344]]",
        'data.bucket.per_resolution_batch_sizes={"768x1344": 3}'])
    assert plan_report.largest_step(cfg) == (1344, 768, 3)


def plan_of(peak: int) -> MemoryPlan:
    return MemoryPlan([("weights", peak, "computed")], peak, margin_bytes=GiB)


def test_fit_line_only_when_it_does_not_fit():
    assert plan_report.fit_line(plan_of(10 * GiB), 24 * GiB) is None
    line = plan_report.fit_line(plan_of(30 * GiB), 24 * GiB)
    assert "needs about 31.0 GiB but the card has 24.0 GiB" in line and "not refused" in line and "--plan" in line


class FakeCuda:
    """Stands in for torch.cuda's peak statistics, which need a GPU."""

    def __init__(self, peaks):
        self.peaks, self.resets = list(peaks), 0

    def reset_peak_memory_stats(self):
        self.resets += 1

    def max_memory_allocated(self):
        return self.peaks.pop(0)


def test_memory_check_reports_after_the_first_steps(tmp_path, caplog):
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(tmp_path))
    cuda = FakeCuda([int(21 * GiB)])
    check = plan_report.MemoryCheck(plan_of(20 * GiB), cuda)
    with caplog.at_level("INFO", logger="sdxl_ff"):
        for step in range(1, 7):
            check.after_step(step, last=step == 6, writer=writer)
    writer.close()
    assert cuda.resets == 1 and cuda.peaks == []  # reset after the warm-up step, read once after step 3
    assert "max allocated 21.00 GiB, planned 20.00 GiB (actual/planned 1.050)" in caplog.text
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    values = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert values == {"memory/planned_gib": [(3, 20.0)], "memory/max_allocated_gib": [(3, 21.0)],
                      "memory/actual_over_planned": [(3, pytest.approx(1.05))]}


def test_memory_check_on_a_one_step_run_reads_at_the_end():
    cuda = FakeCuda([5 * GiB])
    check = plan_report.MemoryCheck(plan_of(5 * GiB), cuda)
    check.after_step(1, last=True, writer=None)
    assert cuda.resets == 0 and cuda.peaks == []


def test_memory_check_is_off_without_cuda():
    cfg = load_config(ROOT / "config.json", ["run.name=x"])
    assert plan_report.MemoryCheck.start(cfg, torch.device("cpu"), main_process=True) is None

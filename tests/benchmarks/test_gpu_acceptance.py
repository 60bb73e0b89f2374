"""benchmarks/gpu_acceptance.py without a GPU: the FLOP count against the published figure, the dry run, the
small mode end to end (so the script cannot rot; its trainer row runs acceptance_trainer.py's in-process
trainer), and the cuda tier's skip / require switch."""

import gc
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_acceptance  # noqa: E402


def test_sdxl_unet_forward_flops_match_the_published_figure():
    """SDXL base's UNet at 1024x1024 (128x128 latent), batch 1: about 6.8 TFLOP per forward pass."""
    forward = gpu_acceptance.count_flops("full", batch=1, resolution=1024, backward=False)
    assert forward == pytest.approx(6.8e12, rel=0.05)
    tiny_step = gpu_acceptance.count_flops("tiny", batch=2, resolution=128)
    assert tiny_step == 2 * gpu_acceptance.count_flops("tiny", batch=1, resolution=128)  # linear in the batch


def test_peak_table_matches_specific_names_first():
    assert gpu_acceptance.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_acceptance.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_acceptance.peak_tflops("NVIDIA L40S") == 362.0
    assert gpu_acceptance.peak_tflops("NVIDIA GeForce RTX 4090") == 165.0
    assert gpu_acceptance.peak_tflops("Some Future GPU") is None


def test_rows_cover_every_mode_batch_and_setting_pair():
    rows = gpu_acceptance.plan_rows()
    modes = {(r.mode, r.batch) for r in rows}
    for mode in ("fp32 weights + AdamW8bit", "fp32 weights + AdamW8bit + checkpointing", "full_bf16 + AdamW8bit",
                 "full_bf16 + fused_backward", gpu_acceptance.RECIPE_24GB):
        assert {(mode, 1), (mode, 4)} <= modes
    recipe = [r for r in rows if r.mode == gpu_acceptance.RECIPE_24GB]
    assert all(r.bf16_weights and r.fused and r.checkpointing and r.plan for r in recipe)  # planned beside measured
    for setting in ("TF32", "channels_last", "cudnn.benchmark"):
        assert sum(setting in r.mode for r in rows) == 2, setting
    assert [r.compile for r in rows[:2]] == [True, True] and not any(r.compile for r in rows[2:])  # compile first
    assert [r.regional for r in rows[:2]] == [True, False]
    trainer = [r for r in rows if r.trainer]
    assert len(trainer) == 1 and (trainer[0].bf16_weights, trainer[0].batch) == (True, 1)  # beside its bare row
    assert ("full_bf16 + AdamW8bit", 1) in modes
    # the weights go from bf16 back to fp32 twice (a fresh UNet each time)
    switches = sum(a.bf16_weights and not b.bf16_weights for a, b in zip(rows, rows[1:], strict=False)
                   if not b.trainer)
    assert switches == 2  # after the compile rows, and for the fp32-compute pair at the end
    head = rows[:rows.index(trainer[0]) + 1]  # compile, the memory modes, the 24 GB recipe, the trainer
    assert sum(r.estimate_s for r in head) < 480 < sum(r.estimate_s for r in rows)  # --budget-s cuts only the tail


def test_small_mode_runs_every_row_and_writes_the_table(tmp_path, monkeypatch, capsys):
    out = tmp_path / "table.md"
    monkeypatch.chdir(tmp_path)  # main() in this process: a Python start-up with torch and diffusers less
    # the script frees memory with gc.collect() after every row: in this process, without freezing what pytest
    # and the other tests left, each call walks all of it (about half a second, 20 times)
    gc.freeze()
    try:
        assert gpu_acceptance.main(["--small", "--device", "cpu", "--skip-tests", "--out", str(out)]) == 0
    finally:
        gc.unfreeze()
    stdout = capsys.readouterr().out
    rows = [line for line in out.read_text().splitlines() if line.startswith("| CPU")]
    assert len(rows) == len(gpu_acceptance.plan_rows()) - 2  # all but the two torch.compile rows a CPU skips
    header = next(line for line in out.read_text().splitlines() if line.startswith("| card"))
    assert [c.strip() for c in header.strip("|").split("|")] == gpu_acceptance.HEADER
    by_mode = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        by_mode[(cells[1], cells[2])] = cells
        assert float(cells[4]) > 0 and float(cells[5]) > 0, line  # s/step and images/s measured
        assert cells[8] == "-" and cells[9] == "-"  # no MFU and no GPU-busy share for a CPU
    for batch in ("1", "4"):
        assert float(by_mode[(gpu_acceptance.RECIPE_24GB, batch)][11]) > 0  # the planner's peak beside it
    trainer = by_mode[(gpu_acceptance.TRAINER, "1")]
    bare_s = float(by_mode[("full_bf16 + AdamW8bit", "1")][4])
    ratio = float(trainer[13].split()[1])  # "trainer/bare R (bare step S s)"
    trainer_s = float(trainer[4])
    # R is printed to 2 decimals from the unrounded times, the table's times to 3 decimals
    rounding = 0.005 + 0.0005 * (1 + trainer_s / bare_s) / bare_s + 1e-9
    assert ratio > 0 and ratio == pytest.approx(trainer_s / bare_s, abs=rounding), trainer
    assert stdout.count("| CPU") == len(rows)  # the same table on stdout
    assert "training.sharding fsdp2: not measured, it needs 2 or more GPUs (0 visible)" in out.read_text()


def test_dry_run_fills_flops_and_leaves_timings_empty(tmp_path):
    out = tmp_path / "dry.md"
    assert gpu_acceptance.main(["--dry-run", "--small", "--rows", "fused", "--plan", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| - |")]
    assert len(rows) == 4  # full_bf16 + fused_backward and the 24 GB recipe, batch 1 and 4
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[3]) > 0 and cells[4:11] == ["", "", "", "", "", "", ""]
        assert float(cells[11]) > 0 and cells[12] == ""  # the memory planner's peak; no measured one to divide
    assert "| planned GiB | actual/planned |" in out.read_text()


@pytest.mark.parametrize("require", ["", "1"])
def test_cuda_tier_skips_without_a_gpu_or_fails_when_required(require, pytester, monkeypatch):
    """A real pytest run of one cuda-tier test, in this process (pytester): no second interpreter start-up."""
    if gpu_acceptance.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.delenv("SDXL_FF_CUDA_TIER_DEVICE", raising=False)
    monkeypatch.setenv("SDXL_FF_REQUIRE_CUDA", require)
    result = pytester.runpytest_inprocess(
        "-o", "addopts=", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
        str(ROOT / "tests" / "train" / "test_cuda.py")
        + "::test_adamw8bit_on_cuda_matches_the_cpu_within_8bit_tolerance")
    out = "\n".join(result.outlines)
    if require:
        assert result.ret != 0 and "SDXL_FF_REQUIRE_CUDA=1 but torch sees no CUDA device" in out, out[-2000:]
        result.assert_outcomes(errors=1)  # pytest.fail in the setup hook: the test errors, the run fails
    else:
        assert result.ret == 0, out[-2000:]
        result.assert_outcomes(skipped=1)


def test_rows_past_the_budget_are_printed_as_not_run(tmp_path):
    out = tmp_path / "budget.md"
    argv = ["--small", "--device", "cpu", "--skip-tests", "--budget-s", "0", "--rows", "24 GB", "--out", str(out)]
    assert gpu_acceptance.main(argv) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| CPU")]
    assert [r.split(" | ")[2] for r in rows] == ["1", "4"]  # only the rows --rows names, both batches
    assert all("not run (budget)" in r and r.split(" | ")[4] == "" for r in rows)  # nothing measured
    with pytest.raises(SystemExit):  # a --rows that matches nothing is refused, naming the rows
        gpu_acceptance.main(["--dry-run", "--rows", "no such row", "--out", str(out)])

"""Every benchmark script runs in a small mode and prints its table, so none can rot unnoticed.

SMALL_MODES lists each script of benchmarks/ explicitly with the arguments of its small mode; a script
added to benchmarks/ without an entry here fails test_every_benchmark_has_a_small_mode.
"""

import importlib
import re
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

SMALL_MODES = {
    "bench_data.py": ["--images-per-size", "1", "--steps", "2", "--workers", "0", "--cached-images", "1"],
    "bench_ema_swap.py": ["--params-m", "0.5", "--device", "cpu"],
    "bench_memory.py": ["--device", "cpu", "--resolution", "64", "--batch", "1", "--steps", "1",
                        "--modes", "checkpointing", "--trainer-steps", "3",
                        "--sharded", "2"],  # 2 processes: never 4 in a test
}
# a line of each script's table, as it prints it in the small mode
TABLE_LINE = {"bench_data.py": "| tiny SDXL 128 px, batch 4: both caches", "bench_ema_swap.py": "bit-exact",
              "bench_memory.py": "overhead ratio"}


# scripts whose small mode runs in a test file of their own (which must name the script)
TESTED_ELSEWHERE = {"gpu_acceptance.py": "test_gpu_acceptance.py", "acceptance_trainer.py": "test_gpu_acceptance.py",
                    "bench_planner.py": "test_planner.py",
                    "bench_loss_types.py": "test_bench_loss_types.py", "bench_startup.py": "test_bench_startup.py",
                    "bench_save_check.py": "test_outputs.py", "bench_overhead.py": "test_benchmarks.py"}


def test_every_benchmark_has_a_small_mode():
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))
    missing = [s for s in scripts if s not in SMALL_MODES and s not in TESTED_ELSEWHERE]
    assert not missing, f"add a small mode for {missing} to SMALL_MODES in tests/benchmarks/test_benchmarks.py"
    for script, test_file in TESTED_ELSEWHERE.items():
        assert script.removesuffix(".py") in next((ROOT / "tests").rglob(test_file)).read_text(), (script, test_file)


def small_mode(script: str, argv: list[str], tmp_path, monkeypatch, capsys) -> str:
    """The script's `main(argv)` in this process, run from `tmp_path`: what it prints to stdout. In-process: a
    Python start-up with torch and diffusers costs more CPU than most small modes (bench_memory's torchrun
    workers still start the script as a command)."""
    module = importlib.import_module(script.removesuffix(".py"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # for the processes a script starts
    capsys.readouterr()
    assert module.main(argv) in (None, 0)
    return capsys.readouterr().out


@pytest.mark.parametrize("script", list(SMALL_MODES))
def test_benchmark_runs_in_its_small_mode_and_prints_its_table(script, tmp_path, monkeypatch, capsys):
    out = small_mode(script, SMALL_MODES[script], tmp_path, monkeypatch, capsys)
    assert TABLE_LINE[script] in out, out[-3000:]


def test_bench_overhead_small_mode_prints_its_table_and_a_worst_line(tmp_path, monkeypatch, capsys):
    out = small_mode("bench_overhead.py", ["--small"], tmp_path, monkeypatch, capsys)
    assert "(1680 parameter tensors," in out  # SDXL base's UNet structure, narrow channels
    assert "regional compile with backend eager" in out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| mode")}
    modes = ["fp32 + AdamW8bit", "full_bf16 + fused_backward", "fp32 + AdamW8bit + EMA",
             "fp32 + AdamW8bit + regional compile"]  # regional: the eager backend in the small mode
    assert list(rows) == ["floor: bare step + fused AdamW", *modes]
    assert rows["floor: bare step + fused AdamW"][3:5] == ["1.00", "1.00 |"]
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(r"worst: (.+) ops/floor (\d+\.\d\d) ms/floor (\d+\.\d\d) syncs (\d+(\.\d+)?)", last)
    assert match, last
    assert match[1] in modes and float(match[2]) > 1.0 and float(match[3]) > 0  # more ops than the bare step
    assert rows[match[1]][3] == match[2]
    # on the CPU nothing in these modes reads the device outside logging (bitsandbytes' per-parameter
    # torch.cuda.synchronize happens on CUDA only)
    assert [row[1] for row in rows.values()] == ["0"] * 5 and match[4] == "0"

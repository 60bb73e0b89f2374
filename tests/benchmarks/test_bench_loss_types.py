"""The loss-type benchmark and the Adafactor rows of the memory benchmark run in small mode and print their tables."""

from benchmarks.bench_loss_types import VARIANTS, main
from benchmarks.bench_memory import main as memory_main


def test_loss_type_benchmark_small(capsys):
    main(["--small"])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line[:30].strip(): line[30:].split() for line in lines[2:]}
    assert list(rows) == list(VARIANTS)
    assert rows["mse"][1] == "1.000" and all(float(seconds) > 0 for seconds, _ in rows.values())


def test_memory_benchmark_adafactor_rows_small(capsys):
    # main(argv) in this process, as test_benchmarks.py's small modes: no Python start-up with torch and diffusers
    memory_main(["--modes", "Adafactor", "--skip-trainer", "--steps", "1", "--resolution", "64", "--batch", "1",
                 "--sharded", ""])
    rows = [line for line in capsys.readouterr().out.splitlines() if "Adafactor" in line]
    assert [row.split("  ")[0] for row in rows] == ["fp32 + Adafactor", "bf16 + Adafactor + fused backward"]
    assert all(float(row.split()[-1]) > 0 for row in rows)  # bytes per parameter

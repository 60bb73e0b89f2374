"""benchmarks/bench_startup.py in small mode: it runs, and its table says what the index saves."""

import re
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_startup  # noqa: E402


def test_bench_startup_small_mode(monkeypatch, capsys):
    # main() in this process (a Python start-up less); each start-up it times still runs in a fresh process
    monkeypatch.chdir(ROOT.parent)
    bench_startup.main(["--small"])
    stdout = capsys.readouterr().out
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
            for line in stdout.splitlines() if line.startswith("| 300 images") or "JPEGs" in line}
    loader = "loader, 4 JPEGs -> SDXL buckets"
    assert set(rows) == {("300 images", "first"), ("300 images", "second"), (loader, "masks off"), (loader, "masks on")}
    seconds = {k[1]: float(re.search(r"\| ([\d.]+) s +\|", v).group(1)) for k, v in rows.items()
               if k[0] == "300 images"}
    assert seconds["first"] > 0 and seconds["second"] > 0
    opened = {k[1]: int(v.split("|")[3]) for k, v in rows.items() if k[0] == "300 images"}
    assert opened == {"first": 300, "second": 0}  # the second start-up reads every size from the index

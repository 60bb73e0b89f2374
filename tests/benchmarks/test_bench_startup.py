"""benchmarks/bench_startup.py in small mode: it runs, and its table says what the index saves."""

import re
import subprocess
import sys

from conftest import ROOT


def test_bench_startup_small_mode():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_startup.py"), "--small"],
                            capture_output=True, text=True, timeout=900, cwd=ROOT.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
            for line in result.stdout.splitlines() if line.startswith("| 300 images") or "JPEGs" in line}
    loader = "loader, 4 JPEGs -> SDXL buckets"
    assert set(rows) == {("300 images", "first"), ("300 images", "second"), (loader, "masks off"), (loader, "masks on")}
    seconds = {k[1]: float(re.search(r"\| ([\d.]+) s +\|", v).group(1)) for k, v in rows.items()
               if k[0] == "300 images"}
    assert seconds["first"] > 0 and seconds["second"] > 0
    opened = {k[1]: int(v.split("|")[3]) for k, v in rows.items() if k[0] == "300 images"}
    assert opened == {"first": 300, "second": 0}  # the second start-up reads every size from the index

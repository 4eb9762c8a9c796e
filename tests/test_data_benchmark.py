"""benchmarks/data.py runs (a few hundred records) and prints the JSON its docstring describes."""

import json
import subprocess
import sys

import pytest
from fixtures_run import ROOT, tx_env


@pytest.mark.slow
def test_data_benchmark_json():
    pytest.importorskip("datasets")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "data.py"), "--records", "300", "--seq-len", "256"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tx_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    cases = ["tx_first", "tx_cached", "tx_old_in_memory", "datasets_first", "datasets_cached"]
    for case in cases:
        r = out[case]
        assert "error" not in r, r
        assert r["records"] == 300 and r["records_per_s"] > 0 and r["peak_rss_mb"] > 0
    first, cached, old = out["tx_first"], out["tx_cached"], out["tx_old_in_memory"]
    assert cached["tokens"] == first["tokens"] > 300 and cached["rows"] == first["rows"] == old["rows"]

"""CPU smoke run of bench/preprocess.py (tiny scan, one repeat)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.bench
def test_bench_preprocess_small(tmp_path):
    out = tmp_path / "preprocess.json"
    done = subprocess.run([sys.executable, "bench/preprocess.py", "--small", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| resample |" in done.stdout and "scipy.ndimage.zoom" in done.stdout
    res = json.loads(out.read_text())
    assert res["resolution"] == 128 and res["median_s"]["total"] > 0
    for stage in ("load", "resample", "normalize", "windows", "body_mask", "write"):
        assert res["median_s"][stage] >= 0, stage
    assert res["zoom_s"] > 0 and res["peak_rss_bytes"] > 0

"""CPU smoke runs of bench/preprocess.py (tiny scan, one repeat) and of bench/dataloader.py on both layouts."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.bench
def test_bench_preprocess_small(tmp_path, ct_data_dir):
    out = tmp_path / "preprocess.json"
    done = subprocess.run([sys.executable, "bench/preprocess.py", "--small", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| resample |" in done.stdout and "scipy.ndimage.zoom" in done.stdout
    res = json.loads(out.read_text())
    assert res["resolution"] == 128 and res["median_s"]["total"] > 0 and res["layout"] == "compact"
    for stage in ("load", "resample", "body_mask", "clip", "write"):
        assert res["median_s"][stage] > 0, stage
    assert res["zoom_s"] > 0 and res["peak_rss_bytes"] > 0
    assert len(res["sizes"]) == 5 and "guide / compact" in done.stdout
    for row in res["sizes"]:
        assert 0 < 8 * row["compact_bytes"] <= row["guide_bytes"], row


@pytest.mark.bench
@pytest.mark.parametrize("layout", ["compact", "guide"])
def test_bench_dataloader_layouts(tmp_path, layout):
    from bench import dataloader

    out = tmp_path / "dataloader.json"
    dataloader.main(["--small", "--device", "cpu", "--workers", "0", "--num-crops", "3", "--step-rate", "2",
                     "--cache", str(tmp_path / "cache"), "--resolution", "32", "--max-points", "1000",
                     "--layout", layout, "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["status"] == "ok" and rows[0]["crops"] >= 1 and rows[0]["mean_points"] <= 1000
    assert any((tmp_path / "cache").rglob("hu.chunks" if layout == "compact" else "windows/*.npy"))

"""Killing pipeline.preprocess mid-run and rerunning it leaves no duplicated or half-written case."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.processed import ProcessedCase, marker_is_valid

ROOT = Path(__file__).resolve().parents[1]
R = 160  # a case takes long enough to write for the kill to land in one


def _case_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*/processed/*") if p.is_dir())


def _started_writing(out: Path) -> bool:
    """A case folder exists (made once the scan is resampled) and is not complete yet."""
    return any(not (d / ".complete").exists() for d in _case_dirs(out))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_kill_mid_case_then_resume(ct_data_dir, tmp_path):
    raw = tmp_path / "raw"
    (raw / "ds").mkdir(parents=True)
    for rel in ("abdomen_nifti/example_ct.nii.gz", "abdomen_nifti/example_ct_sm.nii.gz",
                "abdomen_nifti/example_seg.nii.gz", "head_dicom_zip/philips_head_phantom_5mm.zip"):
        (raw / "ds" / Path(rel).name).symlink_to(ct_data_dir / rel)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.preprocess", str(raw), str(out), "-", "1",
           "--resolution", str(R), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not _started_writing(out):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no case started writing within 180 s"
        time.sleep(0.002)
    # Kill only the parent, hard: its worker must die with it (no orphan keeps writing).
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    deadline = time.time() + 20
    while _group_alive(proc.pid):
        assert time.time() < deadline, "a worker outlived the killed job"
        time.sleep(0.05)
    half = [d for d in _case_dirs(out) if not marker_is_valid(d)]
    assert half, "the kill did not interrupt a case"

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert "3 cases" in last and "0 failed" in last and "skipped" in last, last

    dirs = _case_dirs(out)
    assert sorted(d.name for d in dirs) == ["example_ct", "example_ct_sm", "philips_head_phantom_5mm"]
    for d in dirs:
        assert marker_is_valid(d), d
        marker = json.loads((d / ".complete").read_text())
        on_disk = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != ".complete")
        assert on_disk == sorted(marker["files"]), d  # no leftovers, no temporary files
        case = ProcessedCase(d)
        assert case.layout == "compact" and case.hu().shape == (R, R, R) and case.hu().dtype == np.int16
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    with open(out / "ds" / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ids = [r["case_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 3
    assert all(r["status"] == "ok" for r in rows)
    assert ProcessedCase(out / "ds" / "processed" / "example_ct_sm").labels().any()

    # other windows: compact cases hold HU, so nothing is redone; the dataset lists the new windows
    again = subprocess.run(cmd + ["--windows", "bone", "liver:150:60"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and "3 skipped" in again.stdout, again.stdout
    assert sorted(json.loads((out / "ds" / "dataset_config.json").read_text())["windows"]) == ["bone", "liver"]
    # markers written while compact keys still held the windows are kept for a run with those windows
    from pipeline.discovery import discover
    from pipeline.preprocess.config import PreprocessConfig, parse_windows
    from pipeline.preprocess.markers import case_key

    cfg = PreprocessConfig(resolution=R, windows=parse_windows(["bone"]))
    for case in discover(raw)[0].cases:
        marker = out / "ds" / "processed" / case.case_id / ".complete"
        old = json.loads(marker.read_text())
        marker.write_text(json.dumps({**old, "key": case_key(cfg, case, with_windows=True)}))
    legacy = subprocess.run(cmd + ["--windows", "bone"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert legacy.returncode == 0 and "3 skipped" in legacy.stdout, legacy.stdout
    marker.write_text(json.dumps({**old, "key": "another"}))  # a key of other settings: that case is redone
    redone = subprocess.run(cmd + ["--windows", "bone"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert redone.returncode == 0 and "2 skipped" in redone.stdout, redone.stdout


def test_interrupted_overwrite_keeps_the_rows_of_cases_still_on_disk(tmp_path):
    """--overwrite reprocesses every case; until a case's folder is cleared, its old row stays in
    metadata.csv (a kill there must not hide complete cases from check-data and training)."""
    from pipeline.preprocess.markers import METADATA_COLUMNS, MetadataFile
    from pipeline.io_utils import save_csv

    ds = tmp_path / "ds"
    for cid in ("kept", "cleared"):
        (ds / "processed" / cid).mkdir(parents=True)
    (ds / "processed" / "kept" / "hu.bin").write_bytes(b"12")
    (ds / "processed" / "kept" / ".complete").write_text(json.dumps({"key": "old", "files": {"hu.bin": 2}}))
    save_csv(ds / "metadata.csv", [{"case_id": c, "status": "ok"} for c in ("cleared", "kept")], METADATA_COLUMNS)
    meta = MetadataFile(ds, {"kept", "cleared", "new"}, {"kept", "cleared", "new"})
    meta.rows["new"] = {"case_id": "new", "status": "ok"}
    meta.write()
    with open(ds / "metadata.csv", newline="") as f:
        assert [r["case_id"] for r in csv.DictReader(f)] == ["kept", "new"]

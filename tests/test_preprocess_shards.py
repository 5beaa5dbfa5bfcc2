"""--shard K/N: shards started at once into one folder give what one run gives; a shard killed
with SIGKILL and rerun loses nothing; --dry-run writes nothing."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.preprocess.markers import shard_of
from pipeline.processed import ProcessedCase, marker_is_valid

ROOT = Path(__file__).resolve().parents[1]
R = 160  # large enough that a case takes a while to write (the kill must land in one)
TIMING = {"seconds"}  # metadata columns that measure the run, not the case


def _cmd(raw: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.preprocess", str(raw), str(out), "-", "1", "--resolution", str(R),
            "--no-progress", *extra]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _snapshot(out: Path) -> dict:
    """Every case's files, arrays and metadata row (without timings), every dataset's config."""
    snap = {}
    for meta in sorted(out.glob("*/metadata.csv")):
        with open(meta, newline="") as f:
            rows = [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]
        cfg = json.loads((meta.parent / "dataset_config.json").read_text())
        snap[meta.parent.name] = {"rows": rows, "config": {k: v for k, v in cfg.items() if k != "versions"}}
    for d in sorted(out.glob("*/processed/*")):
        files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
        pc = ProcessedCase(d)
        snap[f"{d.parent.parent.name}/{d.name}"] = {
            "valid": marker_is_valid(d), "files": files, "crop": pc.info.get("crop"),
            "hu": pc.hu().tobytes(), "mask": pc.body_mask().tobytes(),
            "labels": None if pc.labels() is None else pc.labels().tobytes()}
    return snap


@pytest.fixture(scope="module")
def raw(ct_data_dir, tmp_path_factory):
    """The shared scans that load without extra codecs, in two datasets (4 cases)."""
    raw = tmp_path_factory.mktemp("shard_raw")
    for rel in ("abdomen_nifti/example_ct.nii.gz", "abdomen_nifti/example_ct_sm.nii.gz",
                "abdomen_nifti/example_seg.nii.gz", "head_dicom_zip/philips_head_phantom_5mm.zip",
                "head_dicom_zip/ge_head_gantry_tilt.zip"):
        dst = raw / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(ct_data_dir / rel)
    return raw


@pytest.fixture(scope="module")
def single(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    done = subprocess.run(_cmd(raw, out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_shards_at_once_equal_one_run(raw, single, tmp_path):
    out = tmp_path / "out"
    ids = ["abdomen_nifti/example_ct", "abdomen_nifti/example_ct_sm", "head_dicom_zip/ge_head_gantry_tilt",
           "head_dicom_zip/philips_head_phantom_5mm"]
    assert set(shard_of([tuple(i.split("/")) for i in ids], 2).values()) == {1, 2}  # both shards have work
    procs = [subprocess.Popen(_cmd(raw, out, "--shard", f"{k}/2"), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-2000:]
        assert "(shard " in stdout.strip().splitlines()[-1]
    assert _snapshot(out) == _snapshot(single)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def _kill_shard_mid_case(raw, out) -> bool:
    """Starts shard 1/2 into ``out`` and SIGKILLs it (and its worker) while a case is being written;
    False when the case finished before the kill landed (a busy machine can deschedule the poller)."""
    proc = subprocess.Popen(_cmd(raw, out, "--shard", "1/2"), cwd=ROOT, env=_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not any(not (d / ".complete").exists() for d in out.glob("*/processed/*")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "shard 1 started no case within 180 s"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    while True:  # its worker dies with it
        try:
            os.killpg(proc.pid, 0)
            time.sleep(0.05)
        except ProcessLookupError:
            break
    return any(not marker_is_valid(d) for d in out.glob("*/processed/*"))


def test_shard_killed_then_rerun_loses_nothing(raw, single, tmp_path):
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        other = subprocess.run(_cmd(raw, out, "--shard", "2/2"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                               timeout=600)
        assert other.returncode == 0, other.stderr[-2000:]
        if _kill_shard_mid_case(raw, out):
            break
    else:
        pytest.fail("in 3 attempts the kill never interrupted a case")
    again = subprocess.run(_cmd(raw, out, "--shard", "1/2"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _snapshot(out) == _snapshot(single)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_dry_run_lists_and_writes_nothing(raw, single, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(_cmd(raw, out, "--dry-run", "--shard", "1/2"), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not out.exists()
    lines = done.stdout.strip().splitlines()
    mine = [i for i in ("example_ct", "example_ct_sm", "ge_head_gantry_tilt", "philips_head_phantom_5mm")
            if any(line.startswith("would process") and line.split()[2].endswith("/" + i) for line in lines)]
    assert mine and len(mine) < 4
    assert "in other shards" in lines[-1] and "nothing written" in lines[-1]
    done = subprocess.run(_cmd(raw, single, "--dry-run"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    lines = done.stdout.strip().splitlines()
    assert "0 to process, 4 to skip" in lines[-1]
    paired = [line for line in lines if "(labels: " in line]  # which scan each label map goes with
    assert len(paired) == 1 and "/example_ct_sm " in paired[0] and paired[0].endswith("example_seg.nii.gz)")


def test_bad_shard_is_one_line(raw, tmp_path):
    done = subprocess.run(_cmd(raw, tmp_path / "o", "--shard", "3/2"), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "K/N" in done.stderr and not (tmp_path / "o").exists()


def test_progress_line_in_batch_logs(tmp_path, capsys):
    """Without a terminal (a batch job's log) progress is a line with cases/s and the time left."""
    from pipeline import preprocess
    from pipeline.phantom import write_phantom_dataset

    write_phantom_dataset(tmp_path / "raw", seeds=[0, 1], shape=(40, 40, 30), spacing=8.0)
    s = preprocess.run(tmp_path / "raw", tmp_path / "out", None, 0, 32, ["lung"], progress=True)
    assert s["ok"] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("preprocess: 2/2 cases (2 ok, 0 failed), ") and "cases/s, ETA 00:00:00" in err[-1]


def test_dry_run_names_refused_cases(ct_data_dir, tmp_path):
    (tmp_path / "raw" / "ds" / "empty_case").mkdir(parents=True)
    (tmp_path / "raw" / "ds" / "example_ct_sm.nii.gz").symlink_to(ct_data_dir / "abdomen_nifti" / "example_ct_sm.nii.gz")
    done = subprocess.run(_cmd(tmp_path / "raw", tmp_path / "out", "--dry-run"), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("would refuse") and "ds/empty_case" in lines[0] and "empty folder" in lines[0]
    assert lines[1].startswith("would process") and "ds/example_ct_sm" in lines[1]
    assert "1 to process, 0 to skip, 1 to refuse" in lines[-1] and not (tmp_path / "out").exists()


def test_shard_with_other_settings_is_refused(raw, single):
    """A shard at another cube size than its OUT_DIR's would leave cases of two sizes in one dataset:
    refused in one line naming dataset_config.json and the setting, before anything is written."""
    before = _snapshot(single)
    other = str(R // 2)
    done = subprocess.run(_cmd(raw, single, "--shard", "2/2", "--resolution", other), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "dataset_config.json says resolution " + str(R) in line and f"would write {other}" in line, line
    assert f"pass --resolution {R}" in line
    assert _snapshot(single) == before

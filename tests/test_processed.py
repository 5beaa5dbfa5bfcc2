"""pipeline.chunked and pipeline.processed: chunked arrays read by box, compact cases read like
the cube they were cut from, and the usable-case rule."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.chunked import ChunkedArray, save_chunked
from pipeline.io_utils import DataFileError, save_json
from pipeline.processed import COMPACT_FILES, ProcessedCase, case_geometry, marker_is_valid, usable_cases
from transforms import apply_window, parse_window


@pytest.mark.parametrize("order", ["C", "F"])
def test_chunked_box_reads(tmp_path, order):
    rng = np.random.default_rng(0)
    full = np.asarray(rng.integers(-1000, 3000, (70, 130, 45)), dtype=np.int16, order=order)
    view = full[3:65, 2:129, 1:44]  # strided, in either memory order
    save_chunked(tmp_path / "a.chunks", view, chunk=16)
    arr = ChunkedArray(tmp_path / "a.chunks")
    assert arr.shape == view.shape and np.array_equal(arr.read(), view)
    expect = np.full((25, 40, 1), -7, np.int16)
    expect[5:, :27] = view[0:20, 100:127, 10:11]
    assert np.array_equal(arr.read([(-5, 20), (100, 140), (10, 11)], fill=-7), expect)  # partly outside
    assert (arr.read([(100, 102), (0, 1), (0, 1)], fill=3) == 3).all()  # wholly outside
    save_chunked(tmp_path / "empty.chunks", np.zeros((0, 0, 0), bool))
    assert not ChunkedArray(tmp_path / "empty.chunks").read([(0, 4), (0, 2), (0, 1)]).any()


def test_chunked_damage_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "x.chunks").write_bytes(b"not a chunked array")
    with pytest.raises(DataFileError, match="x.chunks: damaged .*rerun ./run.sh preprocess"):
        ChunkedArray(tmp_path / "x.chunks")
    save_chunked(tmp_path / "y.chunks", np.arange(4096, dtype=np.int16).reshape(16, 16, 16), chunk=8)
    data = bytearray((tmp_path / "y.chunks").read_bytes())
    data[-200:] = bytes(200)  # same size, the last chunk zeroed
    (tmp_path / "y.chunks").write_bytes(bytes(data))
    with pytest.raises(DataFileError, match="y.chunks: damaged"):
        ChunkedArray(tmp_path / "y.chunks").read()


def _compact_case(case_dir: Path, hu: np.ndarray, mask: np.ndarray, box) -> None:
    sl = tuple(slice(a, b) for a, b in box)
    files = {COMPACT_FILES["hu"]: save_chunked(case_dir / COMPACT_FILES["hu"], hu[sl], chunk=8),
             COMPACT_FILES["body_mask"]: save_chunked(case_dir / COMPACT_FILES["body_mask"], mask[sl], chunk=8)}
    save_json(case_dir / "case.json", {"layout": "compact", "resolution": hu.shape[0], "hu_min": -1024.0,
                                       "hu_max": 3071.0, "crop": {"offset": [a for a, _ in box],
                                                                  "shape": [b - a for a, b in box]}})
    files["case.json"] = (case_dir / "case.json").stat().st_size
    save_json(case_dir / ".complete", {"key": "k", "files": files})


def test_compact_case_reads_like_its_cube(tmp_path):
    rng = np.random.default_rng(1)
    r, box = 32, [(4, 27), (9, 30), (0, 17)]
    mask = np.zeros((r, r, r), bool)
    mask[tuple(slice(a, b) for a, b in box)] = rng.random([b - a for a, b in box]) > 0.3
    hu = np.where(mask, rng.integers(-900, 1500, (r, r, r)), -1024).astype(np.int16)
    _compact_case(tmp_path / "c", hu, mask, box)
    case = ProcessedCase(tmp_path / "c")
    assert case.layout == "compact" and case.shape == (r, r, r) and marker_is_valid(tmp_path / "c")
    assert np.array_equal(case.hu(), hu) and np.array_equal(case.body_mask(), mask)
    lung = parse_window("lung")
    region = [(0, 10), (20, 32), (8, 24)]
    sl = tuple(slice(a, b) for a, b in region)
    assert np.array_equal(case.window(lung, region), apply_window(hu[sl], lung.width, lung.level))
    assert np.array_equal(case.body_mask(region), mask[sl]) and case.labels() is None


def test_usable_case_rule(tmp_path):
    ds = tmp_path / "ds"
    r, box = 16, [(2, 14)] * 3
    mask = np.zeros((r, r, r), bool)
    mask[4:12, 4:12, 4:12] = True
    hu = np.where(mask, 40, -1024).astype(np.int16)
    for cid in ("good", "truncated", "no_marker"):
        _compact_case(ds / "processed" / cid, hu, mask, box)
    with open(ds / "processed" / "truncated" / COMPACT_FILES["hu"], "r+b") as f:
        f.truncate(100)
    (ds / "processed" / "no_marker" / ".complete").unlink()
    rows = [{"case_id": c, "status": "ok", "error": ""} for c in ("good", "truncated", "no_marker", "absent")]
    rows.append({"case_id": "bad", "status": "failed", "error": "CTLoadError: not a CT"})
    with open(ds / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", "status", "error"])
        w.writeheader()
        w.writerows(rows)
    (ds / "dataset_config.json").write_text(json.dumps({"resolution": r, "layout": "compact"}))
    found = usable_cases(ds, "soft_tissue")
    assert [c["case_id"] for c in found.cases] == ["good"]
    assert [f["case"] for f in found.failed] == ["ds/bad"]
    assert sorted(m["case"] for m in found.missing) == ["ds/absent", "ds/no_marker", "ds/truncated"]
    assert found.window.width == 400 and usable_cases(ds, "liver:150:60").window.level == 60
    with pytest.raises(KeyError, match="preset"):
        usable_cases(ds, "liver")


def test_case_geometry_reads_either_affine_name():
    """case.json names the cube affine affine_512; earlier files may hold it as affine_cube only."""
    aff = np.diag([0.7, 0.7, 0.7, 1.0])
    for key in ("affine_512", "affine_cube"):
        g = case_geometry({key: aff.tolist(), "source_shape": [4, 5, 6], "source": "s.nii.gz"})
        assert np.array_equal(g["cube_affine"], aff) and g["source_shape"] == [4, 5, 6] and g["source"] == "s.nii.gz"
    assert case_geometry({}) == {}


def test_unknown_window_name_says_how_to_give_it():
    """A window name that is neither a preset nor preprocessed: the message shows the NAME:W:L form,
    which a compact dataset computes without preprocessing again."""
    from pipeline.processed import resolve_window

    with pytest.raises(KeyError, match="give it as NAME:WIDTH:LEVEL \\(e.g. 'liver:150:60'"):
        resolve_window({"windows": {}}, "liver")
    spec, _ = resolve_window({"windows": {}}, "liver:150:60")
    assert (spec.name, spec.width, spec.level) == ("liver", 150.0, 60.0)

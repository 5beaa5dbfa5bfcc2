"""Discovery of datasets, cases and label maps under a raw CT folder."""
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.discovery import discover, sanitize_id
from pipeline.file_kinds import is_dicom_file, is_label_name, split_ext

_DICOM_HEAD = b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\0" * 32


def _nii(path: Path, shape=(4, 4, 3), dtype=np.int16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype), np.eye(4)), str(path))
    return path


def _dcm(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_DICOM_HEAD)
    return path


def _by_id(ds):
    return {c.case_id: c for c in ds.cases}


def test_file_tests(tmp_path):
    assert split_ext("a.b.nii.gz") == ("a.b", ".nii.gz")
    assert split_ext("scan.MHA") == ("scan", ".MHA")
    assert is_dicom_file(_dcm(tmp_path / "I10"))
    (tmp_path / "t.txt").write_text("hello")
    assert not is_dicom_file(tmp_path / "t.txt")
    for name in ["seg_totalseg_total.nii.gz", "example_seg.nii.gz", "case1_label.nrrd", "mask.mha", "liver_gt.nii"]:
        assert is_label_name(name), name
    for name in ["example_ct_sm.nii.gz", "segment_ct.nii", "case_001_0000.nii.gz", "image.nii.gz"]:
        assert not is_label_name(name), name
    assert sanitize_id(["my scan (1)", "a+b"]) == "my_scan_1__a_b"


def test_layouts(tmp_path):
    raw = tmp_path / "raw"
    # nnU-Net / MSD
    _nii(raw / "msd" / "imagesTr" / "la_003_0000.nii.gz")
    _nii(raw / "msd" / "imagesTr" / "la_004_0000.nii.gz")
    _nii(raw / "msd" / "labelsTr" / "la_003.nii.gz")
    _nii(raw / "msd" / "imagesTs" / "la_010_0000.nii.gz")
    # DICOM folders (no extensions) with a label beside, nested patients, a DICOM zip
    _dcm(raw / "dcm" / "patient1" / "series" / "IM0001")
    _dcm(raw / "dcm" / "patient1" / "series" / "IM0002")
    _nii(raw / "dcm" / "patient1" / "seg_total.nii.gz")
    (raw / "dcm" / "patient1" / "notes.txt").write_text("not a scan")
    with zipfile.ZipFile(raw / "dcm" / "patient2.zip", "w") as zf:
        zf.writestr("p2/I1", _DICOM_HEAD)
    with zipfile.ZipFile(raw / "dcm" / "docs.zip", "w") as zf:
        zf.writestr("readme.txt", "x")
    # label maps beside images: by header size, then by name stem
    _nii(raw / "mixed" / "example_ct.nii.gz", (4, 4, 9))
    _nii(raw / "mixed" / "example_ct_sm.nii.gz", (4, 4, 3))
    _nii(raw / "mixed" / "example_seg.nii.gz", (4, 4, 3), np.uint8)
    _nii(raw / "named" / "a.nii.gz")
    _nii(raw / "named" / "b_ct.nii.gz")
    _nii(raw / "named" / "b_seg.nii.gz", dtype=np.uint8)
    _nii(raw / "named" / "c_mask.nii.gz", dtype=np.uint8)  # ambiguous -> unpaired... c has no image
    _nii(raw / "named" / "d_ct.nii.gz")
    _nii(raw / "named" / "d_ct_label.nii.gz", dtype=np.uint8)  # the image's _ct suffix in the label's name too
    _nii(raw / "named" / "x y.nrrd".replace(".nrrd", ".nii"))
    _nii(raw / "named" / "sub" / "x y.nii.gz")
    (raw / "empty_ds" / "missing").mkdir(parents=True)
    # loose files in RAW_DIR
    _nii(raw / "loose.nii.gz")
    (raw / ".hidden").mkdir()
    _nii(raw / ".hidden" / "h.nii.gz")

    dss = {d.name: d for d in discover(raw)}
    assert set(dss) == {"msd", "dcm", "mixed", "named", "empty_ds", "raw"}

    msd = _by_id(dss["msd"])
    assert set(msd) == {"la_003", "la_004", "imagesTs__la_010"}
    assert msd["la_003"].label.name == "la_003.nii.gz" and msd["la_004"].label is None

    dcm = _by_id(dss["dcm"])
    assert set(dcm) == {"patient1__series", "patient2"}
    assert dcm["patient1__series"].kind == "dicom_dir" and dcm["patient1__series"].label.name == "seg_total.nii.gz"
    assert dcm["patient2"].kind == "dicom_zip" and dcm["patient2"].label is None

    mixed = _by_id(dss["mixed"])
    assert set(mixed) == {"example_ct", "example_ct_sm"}
    assert mixed["example_ct_sm"].label.name == "example_seg.nii.gz" and mixed["example_ct"].label is None

    named = dss["named"]
    ids = _by_id(named)
    assert ids["b_ct"].label.name == "b_seg.nii.gz" and ids["a"].label is None
    assert ids["d_ct"].label.name == "d_ct_label.nii.gz"
    assert {"x_y", "sub__x_y"} <= set(ids)
    assert [p.name for p in named.unpaired_labels] == ["c_mask.nii.gz"]

    empty = dss["empty_ds"].cases
    assert len(empty) == 1 and empty[0].kind == "empty_dir" and "empty folder" in empty[0].error

    assert [c.case_id for c in dss["raw"].cases] == ["loose"]
    for ds in dss.values():
        assert len({c.case_id for c in ds.cases}) == len(ds.cases)
        for c in ds.cases:
            assert sanitize_id([c.case_id]) == c.case_id  # filesystem-safe


def test_ids_stable_and_unique(tmp_path):
    raw = tmp_path / "raw"
    _nii(raw / "d" / "a.nii.gz")
    _nii(raw / "d" / "a.nii")
    _nii(raw / "d" / "b.nii")
    first = {c.rel_path: c.case_id for c in discover(raw)[0].cases}
    again = {c.rel_path: c.case_id for c in discover(raw)[0].cases}
    assert first == again
    assert first["b.nii"] == "b"
    assert first["a.nii"] != first["a.nii.gz"] and first["a.nii"].startswith("a-")


def test_max_depth(tmp_path):
    raw = tmp_path / "raw"
    _nii(raw / "d" / "top.nii.gz")
    _nii(raw / "d" / "deep" / "deeper" / "x.nii.gz")
    _nii(raw / "loose.nii.gz")
    ds = {d.name: d for d in discover(raw, max_depth=2)}
    assert [c.case_id for c in ds["d"].cases] == ["top"]
    assert any("max-depth" in s for s in ds["d"].ignored)
    assert [d.name for d in discover(raw, max_depth=0)] == ["raw"]


def test_out_dir_inside_raw_is_skipped(tmp_path):
    raw = tmp_path / "raw"
    _nii(raw / "d" / "a.nii.gz")
    _nii(raw / "processed_dataset" / "x" / "b.nii.gz")
    assert [d.name for d in discover(raw, exclude=[raw / "processed_dataset"])] == ["d"]


def test_missing_raw_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(tmp_path / "nope")


def test_shared_data(ct_data_dir):
    dss = {d.name: d for d in discover(ct_data_dir)}
    assert set(dss) == {"abdomen_dicom_j2k", "abdomen_nifti", "head_dicom_zip"}
    j2k = _by_id(dss["abdomen_dicom_j2k"])
    assert list(j2k) == ["dicom"] and j2k["dicom"].kind == "dicom_dir"
    assert j2k["dicom"].label.name == "seg_totalseg_total.nii.gz"
    nif = _by_id(dss["abdomen_nifti"])
    assert nif["example_ct_sm"].label.name == "example_seg.nii.gz" and nif["example_ct"].label is None
    head = _by_id(dss["head_dicom_zip"])
    assert set(head) == {"ge_head_gantry_tilt", "philips_head_phantom_5mm"}
    assert all(c.kind == "dicom_zip" for c in head.values())
    assert all(not d.unpaired_labels for d in dss.values())

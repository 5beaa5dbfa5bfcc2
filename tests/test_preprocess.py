"""pipeline.preprocess on the shared real scans plus broken inputs, in one CLI run."""
import csv
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline import preprocess as pp
from pipeline.preprocess import cli, config, pool
from transforms import HU_MAX, HU_MIN

R = 96
F16_HU = (HU_MAX - HU_MIN) * 2.0**-11  # float16 step near 1, in HU
SHARED = ["abdomen_dicom_j2k", "abdomen_nifti", "head_dicom_zip"]
BAD = {"truncated", "mr_series", "notes", "empty", "slice2d"}


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def make_bad_inputs(folder: Path, ct_data_dir: Path) -> None:
    """A truncated .nii.gz, an MR DICOM series, a text file named .nii, an empty folder, a 2D slice."""
    folder.mkdir(parents=True)
    data = (ct_data_dir / "abdomen_nifti" / "example_ct_sm.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 3])
    (folder / "notes.nii").write_text("this is not an image\n")
    (folder / "empty").mkdir()
    img = nib.Nifti1Image(np.full((32, 32), -1000, np.int16), np.eye(4))
    nib.save(img, str(folder / "slice2d.nii.gz"))
    mr = folder / "mr_series"
    mr.mkdir()
    with zipfile.ZipFile(ct_data_dir / "head_dicom_zip" / "philips_head_phantom_5mm.zip") as zf:
        names = sorted(n for n in zf.namelist() if not n.endswith("/"))[:4]
        for i, name in enumerate(names):
            raw = zf.read(name)
            ct_tag = b"\x08\x00\x60\x00CS\x02\x00CT"  # Modality (0008,0060) CS "CT", explicit VR LE
            assert raw.count(ct_tag) == 1
            raw = raw.replace(ct_tag, b"\x08\x00\x60\x00CS\x02\x00MR")
            raw = raw.replace(b"1.2.840.10008.5.1.4.1.1.2\x00", b"1.2.840.10008.5.1.4.1.1.4\x00")  # MR storage
            (mr / f"IM{i:04d}").write_bytes(raw)


@pytest.fixture(scope="module")
def run_all(ct_data_dir, tmp_path_factory):
    """One CLI run (2 workers) over the shared datasets plus a dataset of broken inputs."""
    root = tmp_path_factory.mktemp("pp")
    raw = root / "raw"
    raw.mkdir()
    for name in SHARED:
        (raw / name).symlink_to(ct_data_dir / name, target_is_directory=True)
    make_bad_inputs(raw / "bad", ct_data_dir)
    mapping = root / "organs.json"
    labels = json.loads((ct_data_dir / "totalsegmentator_v2_total_labels.json").read_text())
    mapping.write_text(json.dumps({"labels": labels, "windows": ["liver:150:60"]}))
    out = root / "out"
    code = pp.main([str(raw), str(out), str(mapping), "2", "--resolution", str(R), "--no-progress", "--layout", "guide"])
    return {"raw": raw, "out": out, "code": code, "labels": labels}


def load_case(out: Path, ds: str, case: str) -> dict:
    d = out / ds / "processed" / case
    info = json.loads((d / "case.json").read_text())
    return {"dir": d, "info": info}


def cube_hu_reference(source, info) -> np.ndarray:
    """HU on the cube grid computed directly with the transforms (the preprocess output must match)."""
    from monai.transforms import Orientation

    from transforms import ResampleToCube, load_ct

    img = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(load_ct(source))
    cube = ResampleToCube(resolution=info["resolution"])(img)
    np.testing.assert_allclose(cube.meta["cube_affine"].numpy(), info["affine_512"], atol=1e-6)
    return np.clip(cube[0].numpy(), HU_MIN, HU_MAX)


def test_exit_code_and_metadata(run_all):
    out = run_all["out"]
    assert run_all["code"] == 1  # some cases failed
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(SHARED + ["bad"])
    ok = {}
    for ds in SHARED:
        rows = read_rows(out / ds / "metadata.csv")
        for col in ["case_id", "source_path", "label_path", "status", "error", "original_shape",
                    "original_spacing", "spacing_512", "body_voxels", "seconds"]:
            assert col in rows[0]
        ok.update({(ds, r["case_id"]): r for r in rows})
    assert set(ok) == {("abdomen_dicom_j2k", "dicom"), ("abdomen_nifti", "example_ct"),
                       ("abdomen_nifti", "example_ct_sm"), ("head_dicom_zip", "philips_head_phantom_5mm"),
                       ("head_dicom_zip", "ge_head_gantry_tilt")}
    for key, row in ok.items():
        if key[1] == "ge_head_gantry_tilt" and row["status"] == "failed":
            # a loader may refuse the tilted, unevenly spaced series: then it must say so
            assert "tilt" in row["error"].lower() or "spacing" in row["error"].lower(), row["error"]
            continue
        assert row["status"] == "ok", (key, row["error"])
        assert int(row["body_voxels"]) > 0
        assert (out / key[0] / "processed" / key[1] / ".complete").is_file()
    cfg = json.loads((out / "abdomen_nifti" / "dataset_config.json").read_text())
    assert cfg["resolution"] == R and cfg["hu_min"] == HU_MIN and cfg["hu_max"] == HU_MAX
    assert cfg["organ_mapping"]["5"] == "liver"
    assert cfg["windows"]["lung"] == {"width": 1500.0, "level": -600.0, "file": "windows/lung_w1500_l-600.npy"}
    assert set(cfg["windows"]) == {"lung", "bone", "soft_tissue", "brain", "liver"}


def test_bad_inputs_fail_one_row_each(run_all):
    rows = {r["case_id"]: r for r in read_rows(run_all["out"] / "bad" / "metadata.csv")}
    assert set(rows) == BAD
    for cid, row in rows.items():
        assert row["status"] == "failed", cid
        assert row["error"] and "\n" not in row["error"], cid
        assert not (run_all["out"] / "bad" / "processed" / cid).exists(), cid
    assert "NIfTI" in rows["truncated"]["error"] and "truncated.nii.gz" in rows["truncated"]["error"]
    assert "MR" in rows["mr_series"]["error"] and "not CT" in rows["mr_series"]["error"]
    assert "notes.nii" in rows["notes"]["error"]
    assert "empty folder" in rows["empty"]["error"]
    assert "2D" in rows["slice2d"]["error"]
    # the loader's own refusals read as sentences, not as Python exceptions
    assert not rows["truncated"]["error"].startswith("CTLoadError") and not rows["empty"]["error"].startswith("CTLoadError")


def test_files_shapes_dtypes(run_all):
    out = run_all["out"]
    c = load_case(out, "abdomen_nifti", "example_ct_sm")
    d, info = c["dir"], c["info"]
    ct = np.load(d / "ct_normalized_512.npy", mmap_mode="r")
    assert ct.shape == (R, R, R) and ct.dtype == np.float16
    mask = np.load(d / "body_mask_512.npy", mmap_mode="r")
    assert mask.shape == (R, R, R) and mask.dtype == np.bool_
    lab = np.load(d / "labels_512.npy", mmap_mode="r")
    assert lab.shape == (R, R, R) and lab.dtype in (np.uint8, np.int16)
    names = sorted(p.name for p in (d / "windows").iterdir())
    assert names == sorted(["lung_w1500_l-600.npy", "bone_w1500_l300.npy", "soft_tissue_w400_l50.npy",
                            "brain_w80_l35.npy", "liver_w150_l60.npy"])
    for n in names:
        w = np.load(d / "windows" / n, mmap_mode="r")
        assert w.shape == (R, R, R) and w.dtype == np.float16
        assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
    for key in ("case_id", "source", "affine_512", "spacing_512", "source_affine", "source_shape", "body_bbox",
                "timings"):
        assert key in info, key
    assert np.asarray(info["affine_512"]).shape == (4, 4)
    (i0, i1), (j0, j1), (k0, k1) = info["body_bbox"]
    assert mask[:, :, :k0].sum() == 0 and mask[:, :, k1:].sum() == 0 and mask[i0:i1, j0:j1, k0:k1].any()
    assert not list(d.rglob(".*tmp-*"))
    marker = json.loads((d / ".complete").read_text())
    assert set(marker["files"]) >= {"case.json", "ct_normalized_512.npy", "labels_512.npy"}


@pytest.mark.parametrize("ds,case", [("abdomen_nifti", "example_ct"), ("abdomen_dicom_j2k", "dicom")])
def test_hu_roundtrip_and_windows(run_all, ds, case):
    c = load_case(run_all["out"], ds, case)
    d, info = c["dir"], c["info"]
    ref = cube_hu_reference(info["source"], info)
    ct = np.load(d / "ct_normalized_512.npy").astype(np.float32)
    hu = ct * (HU_MAX - HU_MIN) + HU_MIN
    assert np.abs(hu - ref).max() <= F16_HU
    integer_hu = np.rint(np.clip(ref, HU_MIN, HU_MAX))  # what both layouts store
    for name, w in info["windows"].items():
        win = np.load(d / w["file"]).astype(np.float32)
        expect = np.clip((integer_hu - (w["level"] - w["width"] / 2)) / w["width"], 0, 1)
        assert np.abs(win - expect).max() <= 2.0**-11 + 1e-6, name
    mask = np.load(d / "body_mask_512.npy")
    assert ref[mask].mean() > -500 > ref[~mask].mean()


def test_labels_overlay_anatomy(run_all):
    labels = run_all["labels"]
    assert labels["5"] == "liver" and labels["1"] == "spleen"
    for ds, case in [("abdomen_nifti", "example_ct_sm"), ("abdomen_dicom_j2k", "dicom")]:
        c = load_case(run_all["out"], ds, case)
        d = c["dir"]
        ct = np.load(d / "ct_normalized_512.npy").astype(np.float32) * (HU_MAX - HU_MIN) + HU_MIN
        lab = np.load(d / "labels_512.npy")
        present = set(np.unique(lab).tolist()) - {0}
        assert present and present <= {int(k) for k in labels}, (ds, present)
        assert json.loads(read_rows_by_id(run_all["out"], ds)[case]["label_ids"]) == sorted(present)
        liver = lab == 5
        assert liver.sum() > 50, ds
        assert 20 <= ct[liver].mean() <= 120, (ds, ct[liver].mean())
        bone = np.isin(lab, [int(k) for k, v in labels.items() if v.startswith("vertebrae")])
        if bone.sum() > 50:
            assert ct[bone].mean() > 150, ds
        lung = np.isin(lab, [int(k) for k, v in labels.items() if v.startswith("lung_")])
        if lung.sum() > 50:
            assert ct[lung].mean() < -500, ds


def read_rows_by_id(out: Path, ds: str) -> dict:
    return {r["case_id"]: r for r in read_rows(out / ds / "metadata.csv")}


def test_geometry_maps_back_to_source_nifti(run_all, ct_data_dir):
    """Cube voxel -> world (affine_512) -> source voxel (the file's own affine, via nibabel)."""
    from scipy.ndimage import map_coordinates

    c = load_case(run_all["out"], "abdomen_nifti", "example_ct")
    info = c["info"]
    src = nib.load(str(ct_data_dir / "abdomen_nifti" / "example_ct.nii.gz"))
    vol = np.asarray(src.dataobj, dtype=np.float32)
    np.testing.assert_allclose(info["original_affine"], src.affine, atol=1e-4)
    assert info["original_shape"] == list(vol.shape)
    ct = np.load(c["dir"] / "ct_normalized_512.npy").astype(np.float32) * (HU_MAX - HU_MIN) + HU_MIN
    rng = np.random.default_rng(0)
    ijk = np.argwhere(np.load(c["dir"] / "body_mask_512.npy"))
    ijk = ijk[rng.choice(len(ijk), 2000, replace=False)]
    world = ijk @ np.asarray(info["affine_512"])[:3, :3].T + np.asarray(info["affine_512"])[:3, 3]
    inv = np.linalg.inv(src.affine)
    vox = world @ inv[:3, :3].T + inv[:3, 3]
    inside = np.all((vox >= 0) & (vox <= np.asarray(vol.shape) - 1), axis=1)
    expect = np.clip(map_coordinates(vol, vox[inside].T, order=1), HU_MIN, HU_MAX)
    got = ct[tuple(ijk[inside].T)]
    assert inside.mean() > 0.95
    assert np.median(np.abs(got - expect)) < 3.0


def test_geometry_maps_back_to_source_dicom(run_all, ct_data_dir):
    """Same check for the DICOM series, with SimpleITK's own index <-> physical point mapping (LPS)."""
    import SimpleITK as sitk
    from scipy.ndimage import map_coordinates

    c = load_case(run_all["out"], "abdomen_dicom_j2k", "dicom")
    info = c["info"]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(ct_data_dir / "abdomen_dicom_j2k" / "dicom")))
    img = reader.Execute()
    vol = sitk.GetArrayFromImage(img).astype(np.float32).transpose(2, 1, 0)  # (x, y, z)
    ct = np.load(c["dir"] / "ct_normalized_512.npy").astype(np.float32) * (HU_MAX - HU_MIN) + HU_MIN
    rng = np.random.default_rng(1)
    ijk = np.argwhere(np.load(c["dir"] / "body_mask_512.npy"))
    ijk = ijk[rng.choice(len(ijk), 1000, replace=False)]
    aff = np.asarray(info["affine_512"])
    ras = ijk @ aff[:3, :3].T + aff[:3, 3]
    got, expect = [], []
    for p, (i, j, k) in zip(ras, ijk):
        lps = (-float(p[0]), -float(p[1]), float(p[2]))
        idx = np.asarray(img.TransformPhysicalPointToContinuousIndex(lps))
        if np.all(idx >= 0) and np.all(idx <= np.asarray(vol.shape) - 1):
            expect.append(float(map_coordinates(vol, idx[:, None], order=1)[0]))
            got.append(ct[i, j, k])
    assert len(got) > 500
    diff = np.abs(np.clip(expect, HU_MIN, HU_MAX) - np.asarray(got))
    assert np.median(diff) < 5.0


def test_rerun_skips_then_redoes_invalid(run_all):
    raw, out = run_all["raw"], run_all["out"]
    shared_only = raw.parent / "raw_shared"
    shared_only.mkdir(exist_ok=True)
    (shared_only / "abdomen_nifti").symlink_to(raw / "abdomen_nifti", target_is_directory=True)
    before = (out / "abdomen_nifti" / "processed" / "example_ct" / "ct_normalized_512.npy").stat().st_mtime_ns
    args = [str(shared_only), str(out), "-", "0", "--resolution", str(R), "--no-progress", "--layout", "guide",
            "--windows", "lung", "bone", "soft_tissue", "brain", "liver:150:60"]
    assert pp.main(args) == 0
    after = (out / "abdomen_nifti" / "processed" / "example_ct" / "ct_normalized_512.npy").stat().st_mtime_ns
    assert after == before  # skipped
    # a folder without a valid marker is redone: drop one window file
    (out / "abdomen_nifti" / "processed" / "example_ct" / "windows" / "brain_w80_l35.npy").unlink()
    s = pp.run(shared_only, out, None, 0, R, ["lung", "bone", "soft_tissue", "brain", "liver:150:60"], progress=False, layout="guide")
    assert (s["ok"], s["skipped"], s["failed"]) == (1, 1, 0)
    assert (out / "abdomen_nifti" / "processed" / "example_ct" / "windows" / "brain_w80_l35.npy").exists()
    # other settings (a window less) invalidate the marker
    s = pp.run(shared_only, out, None, 0, R, ["lung"], progress=False, layout="guide")
    assert (s["ok"], s["skipped"]) == (2, 0)
    rows = read_rows(out / "abdomen_nifti" / "metadata.csv")
    assert sorted(r["case_id"] for r in rows) == ["example_ct", "example_ct_sm"]


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pp.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("RAW_DIR", "OUT_DIR", "ORGAN_MAPPING_JSON", "NUM_WORKERS", "--resolution", "--windows",
                 "--max-depth", "--overwrite", "label pairing", ".complete", "name:WIDTH:LEVEL"):
        assert word in text, word
    (tmp_path / "raw").mkdir()
    for bad in (["--windows", "nope"], ["--windows", "x:0:10"], ["--resolution", "4"]):
        with pytest.raises(SystemExit) as e:
            code = pp.main([str(tmp_path / "raw"), str(tmp_path / "out"), *bad, "--no-progress"])
            raise SystemExit(code)
        assert e.value.code == 2, bad
    capsys.readouterr()
    assert pp.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2  # a wrong path: one line, no usage
    assert capsys.readouterr().err.strip().splitlines() == [
        f"preprocess: error: RAW_DIR {tmp_path / 'missing'} is not a folder; pass the folder of your raw CT collections"]


def test_window_and_mapping_parsing(tmp_path):
    ws = config.parse_windows(["lung,bone", "liver:150:60.5"])
    assert [w.filename for w in ws] == ["lung_w1500_l-600.npy", "bone_w1500_l300.npy", "liver_w150_l60.5.npy"]
    with pytest.raises(ValueError, match="twice"):
        config.parse_windows(["lung", "lung"])
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"1": "spleen", "5": "liver"}))
    assert config.load_organ_mapping(f) == ({"1": "spleen", "5": "liver"}, [])
    f.write_text(json.dumps({"organ_mapping": {"5": {"name": "liver", "window": [150, 60]}},
                             "windows": {"liver": {"width": 150, "level": 60}}}))
    mapping, wins = config.load_organ_mapping(f)
    assert mapping["5"]["name"] == "liver" and wins[0].filename == "liver_w150_l60.npy"
    f.write_text(json.dumps({"spleen": 1}))
    with pytest.raises(ValueError, match="not an integer label id"):
        config.load_organ_mapping(f)


def test_positional_workers(tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(["raw", "out", "3"])
    assert cli._resolve_positionals(args, parser) == (None, 3)
    args = parser.parse_args(["raw", "out", "-", "0"])
    assert cli._resolve_positionals(args, parser) == (None, 0)
    args = parser.parse_args(["raw", "out", "m.json"])
    assert cli._resolve_positionals(args, parser)[0] == "m.json"


@pytest.mark.slow
def test_full_resolution_512_case(ct_data_dir, tmp_path):
    """One case at the real 512^3 resolution (ct_normalized, lung window, body mask, labels)."""
    raw = tmp_path / "raw" / "nifti"
    raw.mkdir(parents=True)
    for name in ("example_ct_sm.nii.gz", "example_seg.nii.gz"):
        (raw / name).symlink_to(ct_data_dir / "abdomen_nifti" / name)
    out = tmp_path / "out"
    s = pp.run(raw.parent, out, None, 0, 512, ["lung"], progress=False, layout="guide")
    assert (s["ok"], s["failed"]) == (1, 0)
    d = out / "nifti" / "processed" / "example_ct_sm"
    info = json.loads((d / "case.json").read_text())
    assert info["resolution"] == 512 and len(info["affine_512"]) == 4
    assert abs(info["spacing_512"][0] - 366.0 / 512) < 1e-6  # largest extent 122 * 3 mm fills the cube
    ct = np.load(d / "ct_normalized_512.npy", mmap_mode="r")
    lab = np.load(d / "labels_512.npy", mmap_mode="r")
    mask = np.load(d / "body_mask_512.npy", mmap_mode="r")
    assert ct.shape == lab.shape == mask.shape == (512, 512, 512)
    assert ct.dtype == np.float16 and mask.dtype == np.bool_ and lab.dtype == np.uint8
    for w in info["windows"].values():
        win = np.load(d / w["file"], mmap_mode="r")
        assert win.shape == (512, 512, 512) and win.dtype == np.float16
    (i0, i1), (j0, j1), (k0, k1) = info["body_bbox"]
    sub = (slice(i0, i1), slice(j0, j1), slice(k0, k1))
    hu = np.asarray(ct[sub], dtype=np.float32) * (HU_MAX - HU_MIN) + HU_MIN
    liver = np.asarray(lab[sub]) == 5
    assert liver.sum() > 10000 and 20 <= hu[liver].mean() <= 120
    print(f"512^3 case: {info['timings']}")


def _crashing_case(task):
    if task["case"].case_id == "crash":
        import os

        os._exit(3)  # a worker dying hard (segfault, out-of-memory kill)
    return {"dataset": "d", "timings": {}, "row": {"case_id": task["case"].case_id, "status": "ok"}}


@pytest.mark.skipif("fork" not in __import__("multiprocessing").get_all_start_methods(),
                    reason="the patched case function reaches workers only through fork")
def test_worker_crash_fails_only_its_case(monkeypatch, tmp_path):
    from pipeline.discovery import Case

    monkeypatch.setattr(pool, "process_case", _crashing_case)  # workers are forked: they see it too
    tasks = [{"case": Case("d", cid, tmp_path / cid, "volume", cid), "case_dir": str(tmp_path / cid)}
             for cid in ("a", "crash", "b", "c")]
    got = []
    pool.run_pool(tasks, 2, got.append)
    status = {r["row"]["case_id"]: r["row"]["status"] for r in got}
    assert status == {"a": "ok", "b": "ok", "c": "ok", "crash": "failed"}
    err = next(r["row"]["error"] for r in got if r["row"]["case_id"] == "crash")
    assert "worker process died" in err


def test_io_utils_atomic(tmp_path):
    from pipeline import io_utils as io

    target = tmp_path / "a" / "x.json"
    io.save_json(target, {"v": np.float32(1.5), "arr": np.arange(3)})
    assert json.loads(target.read_text()) == {"v": 1.5, "arr": [0, 1, 2]}
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text())["v"] == 1.5  # old content kept
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]  # temporary removed
    io.save_csv(tmp_path / "m.csv", [{"case_id": "a", "status": "ok"}, {"case_id": "b", "error": "x"}],
                ["case_id", "status", "error"])
    assert (tmp_path / "m.csv").read_text().splitlines() == ["case_id,status,error", "a,ok,", "b,,x"]
    with io.open_npy_atomic(tmp_path / "big.npy", (4, 5), np.float16) as out:
        assert not (tmp_path / "big.npy").exists()
        out[:] = 2
    assert np.load(tmp_path / "big.npy").sum() == 40
    io.save_npy(tmp_path / "f.npy", np.arange(24.0).reshape(2, 3, 4), dtype=np.float16)
    assert np.load(tmp_path / "f.npy").dtype == np.float16
    (tmp_path / ".f.npy.tmp-1-deadbeef").write_text("stale")
    assert io.remove_stale_tmp(tmp_path) == 1

"""LoadCT on the shared real scans, DICOM geometry (gantry tilt, uneven spacing), refusals."""

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from transforms import CTLoadError, LoadCT, LoadCTd, find_dicom_series, load_ct, world_to_voxel

# name -> (relative path, shape, spacing, (hu_min, hu_max))
VOLUMES = {
    "abdomen_dicom_j2k": ("abdomen_dicom_j2k/dicom", (512, 512, 20), (0.977, 0.977, 2.0), (-1024, 1839)),
    "example_ct": ("abdomen_nifti/example_ct.nii.gz", (122, 101, 112), (3.0, 3.0, 3.0), (-1207, 3382)),
    "example_ct_sm": ("abdomen_nifti/example_ct_sm.nii.gz", (122, 101, 30), (3.0, 3.0, 3.0), (-1100, 1207)),
    "philips_phantom": ("head_dicom_zip/philips_head_phantom_5mm.zip", (512, 512, 28), (0.451, 0.451, 5.0),
                        (-1024, 782)),
}


def _sitk():
    return pytest.importorskip("SimpleITK")


@pytest.mark.parametrize("name", sorted(VOLUMES))
def test_load_shared_volumes(ct_data_dir, name):
    rel, shape, spacing, (lo, hi) = VOLUMES[name]
    img = LoadCT()(ct_data_dir / rel)
    assert img.dtype == torch.float32
    assert tuple(img.shape) == (1, *shape)
    np.testing.assert_allclose(img.meta["original_spacing"], spacing, atol=2e-3)
    assert float(img.min()) == pytest.approx(lo, abs=1)
    assert float(img.max()) == pytest.approx(hi, abs=1)
    assert img.meta["filename_or_obj"] == str(ct_data_dir / rel)
    assert list(img.meta["original_shape"]) == list(shape)
    assert img.affine.shape == (4, 4)
    assert torch.allclose(img.affine, img.meta["original_affine"])


def test_example_ct_int32_sform(ct_data_dir):
    nib = pytest.importorskip("nibabel")
    path = ct_data_dir / "abdomen_nifti/example_ct.nii.gz"
    ref = nib.load(str(path))
    assert ref.get_data_dtype() == np.int32 and int(ref.header["qform_code"]) == 0
    img = load_ct(path)
    np.testing.assert_allclose(img.affine.numpy(), ref.affine, atol=1e-5)
    np.testing.assert_array_equal(img[0].numpy(), np.asanyarray(ref.dataobj).astype(np.float32))


def test_dicom_affine_matches_headers_lps_to_ras(ct_data_dir):
    sitk = _sitk()
    folder = ct_data_dir / "abdomen_dicom_j2k/dicom"
    img = load_ct(folder)
    files = find_dicom_series(folder)[""]
    assert len(files) == 20
    # the first file in slice order sits at k=0; its IPP (LPS) is the RAS world point with x, y negated
    r = sitk.ImageFileReader()
    r.SetFileName(files[0])
    r.ReadImageInformation()
    ipp = np.array([float(v) for v in r.GetMetaData("0020|0032").split("\\")])
    ras = ipp * np.array([-1, -1, 1])
    np.testing.assert_allclose(world_to_voxel(img.affine, ras), [0, 0, 0], atol=1e-4)
    # pixel (0, 0) of that file equals voxel (0, 0, 0)
    pix = sitk.GetArrayFromImage(sitk.ReadImage(files[0], sitk.sitkFloat32))[0]
    assert float(img[0, 0, 0, 0]) == pytest.approx(float(pix[0, 0]))
    assert float(img[0, 100, 200, 0]) == pytest.approx(float(pix[200, 100]))


def _tilt_samples(path, n_slices=(0, 7, 13, 14, 20, 27)):
    """(RAS world points, source pixel values) of a few slices of the tilted series, inside the head."""
    sitk = _sitk()
    import tempfile

    pts, vals = [], []
    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(path).extractall(tmp)
        (paths,) = find_dicom_series(tmp).values()
        for k in n_slices:
            sl = sitk.ReadImage(paths[k], sitk.sitkFloat32)
            pix = sitk.GetArrayFromImage(sl)[0]
            for row in range(120, 400, 23):
                for col in range(120, 400, 23):
                    lps = np.asarray(sl.TransformContinuousIndexToPhysicalPoint((col, row, 0)))
                    pts.append(lps * np.array([-1, -1, 1]))
                    vals.append(float(pix[row, col]))
    return np.asarray(pts), np.asarray(vals)


@pytest.fixture(scope="module")
def ge(ct_data_dir):
    return load_ct(ct_data_dir / "head_dicom_zip/ge_head_gantry_tilt.zip")


def test_gantry_tilt_uneven_spacing_placed_by_position(ct_data_dir, ge):
    from scipy.ndimage import map_coordinates

    path = ct_data_dir / "head_dicom_zip/ge_head_gantry_tilt.zip"
    img = ge
    assert img.meta["dicom_regularized"] and img.meta["dicom_uneven_spacing"]
    assert img.meta["dicom_gantry_tilt"] == pytest.approx(18.5)
    aff = img.affine.numpy()
    cols = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)
    np.testing.assert_allclose(cols.T @ cols, np.eye(3), atol=1e-6)  # a regular, orthogonal grid
    # every source pixel, at its own ImagePositionPatient, is found at that world position
    pts, vals = _tilt_samples(path)
    vol = img[0].numpy()
    ijk = world_to_voxel(aff, pts)
    got = map_coordinates(vol, ijk.T, order=1, mode="nearest")
    err = np.abs(got - vals)
    assert np.median(err) < 5.0 and err.mean() < 20.0, (np.median(err), err.mean())
    # the naive reading (one average spacing, no tilt) puts the same pixels elsewhere (~200 HU off)
    assert _naive_error(path, vals) > 5 * err.mean()


def _naive_error(path, vals):
    """Mean error of the geometry SimpleITK's series reader reports (average spacing, no shear)."""
    sitk = _sitk()
    import tempfile

    from scipy.ndimage import map_coordinates

    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(path).extractall(tmp)
        (paths,) = find_dicom_series(tmp).values()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            naive = sitk.ReadImage(paths, sitk.sitkFloat32)
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(True)
        pts, _ = _tilt_samples(path)
        arr = sitk.GetArrayFromImage(naive)  # (z, y, x)
        idx = np.array([naive.TransformPhysicalPointToContinuousIndex(tuple(p * np.array([-1, -1, 1])))
                        for p in pts])
        got = map_coordinates(arr, idx[:, ::-1].T, order=1, mode="nearest")
    return float(np.abs(got - vals).mean())


def test_gantry_tilt_not_average_spacing(ge):
    """The naive reading (one average spacing, no shear) would put slices up to ~10 mm off."""
    img = ge
    assert float(img.min()) == pytest.approx(-1500, abs=1) and float(img.max()) > 2000
    # the head spans (157.8 - 5.8) mm along z plus the tilt: extent along the slice normal ~ 144 mm
    spacing = img.meta["original_spacing"]
    extent = (img.shape[3] - 1) * spacing[2]
    assert extent == pytest.approx(144.0, abs=1.5)


def test_zip_of_dicom_and_loadctd(ct_data_dir, tmp_path):
    d = LoadCTd(["image", "label"], label_keys="label")(
        {"image": ct_data_dir / "abdomen_dicom_j2k/dicom",
         "label": ct_data_dir / "abdomen_dicom_j2k/seg_totalseg_total.nii.gz"})
    assert d["image"].dtype == torch.float32
    assert d["label"].dtype == torch.int16 and int(d["label"].max()) > 5
    # the same series in a .zip (files without extensions, in a sub-folder)
    z = tmp_path / "series.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i, f in enumerate(sorted((ct_data_dir / "abdomen_dicom_j2k/dicom").iterdir())):
            zf.write(f, f"sub/IM{i:04d}")
    img = LoadCT()(z)
    assert torch.equal(img.as_tensor(), d["image"].as_tensor())
    assert img.meta["filename_or_obj"] == str(z)


def _write_modified_series(src_files, out_dir: Path, changes: dict, n: int = 3, prefix: str = "s"):
    """Copies DICOM slices through SimpleITK with some header tags changed."""
    sitk = _sitk()
    keep = ["0008|0008", "0008|0060", "0020|000d", "0020|000e", "0020|0013", "0020|0032", "0020|0037",
            "0028|0030", "0028|1052", "0028|1053", "0018|0050", "0008|103e"]
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(src_files[:n]):
        r = sitk.ImageFileReader()
        r.SetFileName(str(f))
        img = r.Execute()
        for k in keep:
            if r.HasMetaDataKey(k):
                img.SetMetaData(k, r.GetMetaData(k))
        for k, v in changes.items():
            img.SetMetaData(k, v)
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetImageIO("GDCMImageIO")
        w.SetFileName(str(out_dir / f"{prefix}{i}"))
        w.Execute(img)


@pytest.fixture(scope="module")
def phantom_files(ct_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    zipfile.ZipFile(ct_data_dir / "head_dicom_zip/philips_head_phantom_5mm.zip").extractall(out)
    files = next(iter(find_dicom_series(out).values()))
    return [Path(f) for f in files]


def test_refuse_mr(phantom_files, tmp_path):
    _write_modified_series(phantom_files, tmp_path / "mr", {"0008|0060": "MR", "0020|000e": "1.2.3.4"})
    with pytest.raises(CTLoadError, match="MR is not CT"):
        LoadCT()(tmp_path / "mr")


def test_refuse_localizer(phantom_files, tmp_path):
    _write_modified_series(phantom_files, tmp_path / "loc", {"0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"})
    with pytest.raises(CTLoadError, match="localizer"):
        LoadCT()(tmp_path / "loc")


def test_refuse_single_slice(phantom_files, tmp_path):
    (tmp_path / "one").mkdir()
    shutil.copy(phantom_files[0], tmp_path / "one" / "slice")
    with pytest.raises(CTLoadError, match="single 2D"):
        LoadCT()(tmp_path / "one")
    with pytest.raises(CTLoadError, match="single 2D"):
        LoadCT()(tmp_path / "one" / "slice")


def test_refuse_empty_folder_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CTLoadError, match="no DICOM image files"):
        LoadCT()(tmp_path / "empty")
    with pytest.raises(CTLoadError, match="does not exist"):
        LoadCT()(tmp_path / "nothing.nii.gz")
    case = tmp_path / "processed" / "case_000"  # what ./run.sh preprocess writes: not a scan to load
    case.mkdir(parents=True)
    (case / "case.json").write_text('{"source": "raw/case_000.nii.gz"}')
    with pytest.raises(CTLoadError, match=r"a processed case folder \(case.json\), not a scan.*pass the scan it was made from \(raw/case_000.nii.gz\)"):
        LoadCT()(case)


def test_refuse_text_named_nii_and_truncated(ct_data_dir, tmp_path):
    txt = tmp_path / "notes.nii"
    txt.write_text("this is not an image\n")
    with pytest.raises(CTLoadError, match="notes.nii: not a readable NIfTI"):
        LoadCT()(txt)
    data = (ct_data_dir / "abdomen_nifti/example_ct_sm.nii.gz").read_bytes()
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CTLoadError, match="trunc.nii.gz"):
        LoadCT()(trunc)
    # a 2D NIfTI
    nib = pytest.importorskip("nibabel")
    two_d = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 1), -1000, np.int16), np.eye(4)), str(two_d))
    with pytest.raises(CTLoadError, match="single 2D"):
        LoadCT()(two_d)


def test_truncated_nifti_sizes_in_a_unit_that_fits(tmp_path):
    """A 40 MiB image in a file of 1 MiB reads '(40.0 MiB) but the file holds 1.0 MiB', not '(0.0 GiB)'."""
    nib = pytest.importorskip("nibabel")
    full = tmp_path / "full.nii"
    nib.save(nib.Nifti1Image(np.zeros((256, 256, 320), np.int16), np.eye(4)), str(full))
    trunc = tmp_path / "trunc.nii"
    trunc.write_bytes(full.read_bytes()[: 2**20])
    with pytest.raises(CTLoadError) as e:
        LoadCT()(trunc)
    msg = str(e.value)
    assert "256 x 256 x 320 image (40.0 MiB) but the file holds 1.0 MiB" in msg and "GiB" not in msg
    from transforms.image_files import _size

    assert [_size(n) for n in (812, 3584, 40 * 2**20, 1.5 * 2**30)] == ["812 bytes", "3.5 KiB", "40.0 MiB", "1.5 GiB"]


def test_refuse_truncated_dicom(phantom_files, tmp_path):
    folder = tmp_path / "trunc"
    folder.mkdir()
    for f in phantom_files[:4]:
        shutil.copy(f, folder / f.name)
    raw = phantom_files[4].read_bytes()
    (folder / phantom_files[4].name).write_bytes(raw[:400])
    with pytest.raises(CTLoadError, match="unreadable"):
        LoadCT()(folder)


def test_error_messages_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CTLoadError) as e:
        LoadCT()(tmp_path / "empty")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "empty") in msg and ";" in msg


def test_several_series_split_by_uid(ct_data_dir, phantom_files, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for f in phantom_files:
        shutil.copy(f, folder / f.name)
    _write_modified_series(phantom_files, folder, {"0008|0060": "MR", "0020|000e": "1.2.3.4"}, prefix="mr")
    series = find_dicom_series(folder)
    assert len(series) == 2 and len(series["1.2.3.4"]) == 3
    img = LoadCT()(folder)  # picks the CT series
    assert img.shape == (1, 512, 512, 28)
    assert img.meta["dicom_series_found"] == 2
    with pytest.raises(CTLoadError, match="MR is not CT"):
        LoadCT(series_uid="1.2.3.4")(folder)


def test_nrrd_and_mha_match_nifti(ct_data_dir, tmp_path):
    sitk = _sitk()
    ref = load_ct(ct_data_dir / "abdomen_nifti/example_ct_sm.nii.gz")
    aff_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ref.affine.numpy()
    spacing = np.linalg.norm(aff_lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(ref[0].numpy().transpose(2, 1, 0).astype(np.int16))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((aff_lps[:3, :3] / spacing).ravel().tolist())
    img.SetOrigin(aff_lps[:3, 3].tolist())
    for ext in (".nrrd", ".mha"):
        p = tmp_path / f"ct{ext}"
        sitk.WriteImage(img, str(p))
        got = LoadCT()(p)
        assert torch.equal(got.as_tensor(), ref.as_tensor())
        assert torch.allclose(got.affine, ref.affine, atol=1e-5)


def test_refuse_non_hu_volume(tmp_path):
    nib = pytest.importorskip("nibabel")
    p = tmp_path / "mr.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(0, 900, (16, 16, 8)).astype(np.int16), np.eye(4)),
             str(p))
    with pytest.raises(CTLoadError, match="do not look like CT in HU"):
        LoadCT()(p)
    assert LoadCT(check_hu=False)(p).shape == (1, 16, 16, 8)

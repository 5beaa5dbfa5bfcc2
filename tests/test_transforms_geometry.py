"""World-space cube resampling on the shared scans: exact geometry, labels, mapping back."""

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy.ndimage import map_coordinates

from transforms import (
    LoadCTd,
    Orientation,
    Orientationd,
    ResampleToCube,
    ResampleToCubed,
    cube_affine_for,
    load_ct,
    resample_to_grid,
    resample_to_source,
    voxel_to_world,
    world_to_voxel,
)


def _trilinear(vol: np.ndarray, ijk: np.ndarray, pad: float = -1024.0) -> np.ndarray:
    """Reference: trilinear value at fractional voxel coords; edge value within half a voxel, pad beyond."""
    shape = np.asarray(vol.shape)
    inside = np.all((ijk >= -0.5) & (ijk <= shape - 0.5), axis=1)
    val = map_coordinates(vol.astype(np.float64), np.clip(ijk, 0, shape - 1).T, order=1)
    return np.where(inside, val, pad)


@pytest.fixture(scope="module")
def j2k(ct_data_dir):
    return LoadCTd(["image", "label"], label_keys="label")(
        {"image": ct_data_dir / "abdomen_dicom_j2k/dicom",
         "label": ct_data_dir / "abdomen_dicom_j2k/seg_totalseg_total.nii.gz"})


def test_cube_geometry_centred_isotropic(ct_data_dir):
    img = load_ct(ct_data_dir / "abdomen_nifti/example_ct.nii.gz")
    cube = ResampleToCube(128)(img)
    assert cube.shape == (1, 128, 128, 128) and cube.dtype == torch.float32
    extent = np.array(img.shape[1:]) * 3.0  # 366, 303, 336 mm
    assert cube.meta["cube_spacing"] == pytest.approx(extent.max() / 128)
    aff = cube.affine.numpy()
    np.testing.assert_allclose(aff[:3, :3], np.eye(3) * extent.max() / 128)
    # centre of the cube = centre of the source volume
    src_centre = voxel_to_world(img.affine, (np.array(img.shape[1:]) - 1) / 2)
    np.testing.assert_allclose(voxel_to_world(aff, [63.5, 63.5, 63.5]), src_centre, atol=1e-6)
    for k in ("cube_affine", "source_affine", "source_shape"):
        assert k in cube.meta
    assert list(cube.meta["source_shape"]) == [122, 101, 112]
    # padding is air and the volume is there
    assert float(cube[0, 64, 0, 64]) == -1024.0 or float(cube[0, 64, 127, 64]) == -1024.0
    assert cube.meta["filename_or_obj"].endswith("example_ct.nii.gz")


@pytest.mark.parametrize("orient", [False, True])
def test_world_points_keep_their_values_dicom(j2k, orient):
    """Every cube voxel holds the source's trilinear value at the same world point."""
    img = j2k["image"]
    if orient:
        img = Orientation("RAS", labels=None)(img)
    cube = ResampleToCube(128)(img)
    rng = np.random.default_rng(0)
    ijk = rng.integers(0, 128, size=(4000, 3))
    world = voxel_to_world(cube.affine, ijk)
    ref = _trilinear(img[0].numpy(), world_to_voxel(img.affine, world))
    got = cube[0].numpy()[tuple(ijk.T)]
    np.testing.assert_allclose(got, ref, atol=1e-2)
    assert np.mean(got > -1000) > 0.01  # the check hits the body, not only padding


def test_known_world_point_same_value(ct_data_dir):
    """A source voxel centre that is also a cube voxel centre keeps exactly its value."""
    img = load_ct(ct_data_dir / "abdomen_nifti/example_ct.nii.gz")[:, :, :100]  # 3 mm, 122 x 100 x 112
    # resolution 122 makes the cube spacing exactly 3 mm and the grids aligned (even size differences)
    cube = ResampleToCube(122)(img)
    assert cube.meta["cube_spacing"] == pytest.approx(3.0)
    vol = img[0].numpy()
    for ijk in [(60, 50, 56), (30, 40, 20), (100, 70, 90)]:
        p = voxel_to_world(img.affine, ijk)
        c = world_to_voxel(cube.affine, p)
        np.testing.assert_allclose(c, np.round(c), atol=1e-6)
        assert float(cube[(0, *np.round(c).astype(int))]) == pytest.approx(float(vol[ijk]), abs=1e-3)


def test_labels_land_on_liver(ct_data_dir, j2k):
    names = json.loads((ct_data_dir / "totalsegmentator_v2_total_labels.json").read_text())
    ids = {v: int(k) for k, v in names.items()}
    # image LPS (DICOM), labels LAS (NIfTI): paired by world position, not array index
    assert float(j2k["image"].affine[1, 1]) * float(j2k["label"].affine[1, 1]) < 0
    d = ResampleToCubed(["image", "label"], resolution=128, mode=["bilinear", "nearest"],
                        padding_value=[-1024, 0])(dict(j2k))
    img, lab = d["image"][0], d["label"][0]
    assert lab.dtype == torch.int16
    assert torch.equal(d["label"].affine, d["image"].affine)
    liver = lab == ids["liver"]
    assert int(liver.sum()) > 1000
    assert 20 < float(img[liver].mean()) < 120
    spleen = lab == ids["spleen"]
    assert 20 < float(img[spleen].mean()) < 200
    # pairing by array index (ignoring the flip) puts the liver label on other tissue
    wrong = ResampleToCube(128, mode="nearest", padding_value=0)(
        MetaTensor(j2k["label"].as_tensor(), affine=j2k["image"].affine), cube_affine=d["image"].affine)
    wrong_liver = wrong[0] == ids["liver"]
    assert not 20 < float(img[wrong_liver].mean()) < 120


def test_labels_with_orientation_first(j2k):
    d = Orientationd(["image", "label"], axcodes="RAS", labels=None)(dict(j2k))
    a = ResampleToCubed(["image", "label"], resolution=96, mode=["bilinear", "nearest"], padding_value=[-1024, 0])(d)
    b = ResampleToCubed(["image", "label"], resolution=96, mode=["bilinear", "nearest"],
                        padding_value=[-1024, 0])(dict(j2k))
    assert torch.allclose(a["image"].as_tensor(), b["image"].as_tensor(), atol=1e-3)
    # nearest ties (exact half-voxel positions) may round the other way on a flipped axis
    assert float((a["label"].as_tensor() == b["label"].as_tensor()).float().mean()) > 0.995


def test_round_trip_to_source(ct_data_dir):
    img = load_ct(ct_data_dir / "abdomen_nifti/example_ct.nii.gz")
    cube = ResampleToCube(256)(img)  # 1.43 mm: finer than the 3 mm source
    back = resample_to_source(cube)
    assert back.shape == img.shape
    assert torch.allclose(back.affine, img.affine)
    err = (back - img).abs()
    assert float(err.mean()) < 15.0
    assert float(err.median()) < 5.0
    lab = torch.randint(0, 5, img.shape, dtype=torch.int16)
    lab_img = MetaTensor(lab, affine=img.affine)
    lab_cube = ResampleToCube(256, mode="nearest", padding_value=0)(lab_img)
    lab_back = resample_to_source(lab_cube, mode="nearest", padding_value=0)
    assert lab_back.dtype == torch.int16
    assert float((lab_back == lab).float().mean()) > 0.99


def test_round_trip_dicom_with_inverse(j2k):
    from monai.transforms import Invertd

    t = ResampleToCubed(["image"], resolution=128)
    d = t({"image": j2k["image"]})
    d["pred"] = d["image"].clone()
    inv = Invertd(keys="pred", transform=t, orig_keys="image", nearest_interp=False)(d)
    assert inv["pred"].shape == j2k["image"].shape
    assert torch.allclose(inv["pred"].affine, j2k["image"].affine)
    direct = t.inverse({"image": t({"image": j2k["image"]})["image"]})["image"]
    assert torch.allclose(direct.as_tensor(), inv["pred"].as_tensor())
    # 128^3 over 500 mm is 3.9 mm: coarse, but the anatomy is where it was
    corr = np.corrcoef(direct[0].numpy().ravel(), j2k["image"][0].numpy().ravel())[0, 1]
    assert corr > 0.9


def test_oblique_fallback_matches_reference():
    rng = np.random.default_rng(1)
    vol = rng.normal(0, 100, (20, 24, 16)).astype(np.float32)
    th = np.deg2rad(20)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]]) @ np.diag(
        [1.5, 1.2, 2.0])
    aff[:3, 3] = [10, -5, 3]
    img = MetaTensor(torch.from_numpy(vol)[None], affine=torch.from_numpy(aff))
    cube = ResampleToCube(32)(img)
    ijk = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"), -1).reshape(-1, 3)
    ref = _trilinear(vol, world_to_voxel(aff, voxel_to_world(cube.affine, ijk)))
    got = cube[0].numpy().reshape(-1)
    np.testing.assert_allclose(got, ref, atol=1e-3)


def test_resample_to_grid_nearest_and_flip_exact():
    vol = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 4, 5, 6)
    aff = np.diag([-2.0, 1.0, 3.0, 1.0])
    flipped = np.diag([2.0, 1.0, 3.0, 1.0])
    flipped[0, 3] = -6.0  # same world grid, x axis reversed
    out = resample_to_grid(vol, aff, flipped, (4, 5, 6))
    assert torch.equal(out, vol.flip(1))
    out_n = resample_to_grid(vol.long(), aff, flipped, (4, 5, 6), mode="nearest", padding_value=0)
    assert out_n.dtype == torch.int64 and torch.equal(out_n, vol.flip(1).long())


def test_cube_affine_for_spacing():
    aff = np.diag([0.5, 0.5, 2.0, 1.0])
    cube, sp = cube_affine_for(aff, (512, 512, 100), 512)
    assert sp == pytest.approx(0.5)  # x/y extent 256 mm > z extent 200 mm
    cube, sp = cube_affine_for(aff, (100, 100, 300), 100)
    assert sp == pytest.approx(6.0)


def test_default_padding_per_mode(j2k):
    t = ResampleToCubed(["image", "label"], resolution=64, mode=["bilinear", "nearest"])
    d = t(dict(j2k))
    assert float(d["image"].min()) == -1024.0
    assert int(d["label"].min()) == 0 and d["label"].dtype == torch.int16
    back = t.inverse(d)  # the same instance (MONAI checks it), or resample_to_source(cube) from meta
    assert back["label"].shape == j2k["label"].shape and int(back["label"].min()) == 0
    lab = resample_to_source(d["label"], mode="nearest")
    assert torch.equal(lab.as_tensor(), back["label"].as_tensor())

"""Sparsify/Densify round trip and block-aligned random crops in full-grid coordinates."""

import numpy as np
import pytest
import torch

from transforms import (
    BodyMask,
    ClipHU,
    Densify,
    Densifyd,
    RandSparseCrop,
    RandSparseCropd,
    ResampleToCube,
    Sparsify,
    Sparsifyd,
    Window,
    block_counts,
    load_ct,
)


@pytest.fixture(scope="module")
def case(ct_data_dir):
    img = ClipHU()(ResampleToCube(128)(load_ct(ct_data_dir / "abdomen_nifti/example_ct.nii.gz")))
    return Window("soft_tissue")(img), BodyMask()(img)


def test_sparsify_densify_round_trip(case):
    win, mask = case
    coords, feats = Sparsify()(win, mask)
    assert coords.dtype == torch.int32 and coords.shape[1] == 3
    assert feats.dtype == torch.float32 and feats.shape == (coords.shape[0], 1)
    support = mask[0] & (win[0] > 0)
    assert coords.shape[0] == int(support.sum()) > 1000
    assert float(feats.min()) > 0
    dense = Densify((128, 128, 128))(coords, feats)
    assert dense.shape == (1, 128, 128, 128)
    ref = torch.where(support, win[0].as_tensor(), torch.zeros(()))
    assert torch.equal(dense[0], ref)
    # without a mask the support is window > 0
    c2, _ = Sparsify()(win)
    assert c2.shape[0] == int((win > 0).sum())


@pytest.mark.parametrize("order", ["C", "F", "mixed"])
def test_sparsify_matches_argwhere_in_any_memory_order(case, order):
    """The points of a crop (numpy arrays in any memory layout, an offset in the full grid) are
    exactly numpy's: the same coordinates, each with its own window value."""
    win, mask = case
    w = np.asarray(win[0].as_tensor())[8:100, 16:120, 4:90]
    m = np.asarray(mask[0].as_tensor())[8:100, 16:120, 4:90]
    if order == "F":
        w, m = np.asfortranarray(w), np.asfortranarray(m)
    elif order == "mixed":
        w, m = np.ascontiguousarray(w.transpose(1, 0, 2)).transpose(1, 0, 2), np.ascontiguousarray(m)
    coords, feats = Sparsify()(w, m, offset=[8, 16, 4])
    sup = (w > 0) & m
    ref = np.argwhere(sup)
    assert coords.dtype == torch.int32 and coords.is_contiguous() and len(ref) > 1000
    got = coords.numpy() - np.array([8, 16, 4])
    order_of = np.lexsort(got.T[::-1])  # compare as sets of points, in C order
    assert np.array_equal(got[order_of], ref)
    assert np.array_equal(feats.numpy()[order_of, 0], w[sup])


def test_dict_forms_round_trip(case):
    win, mask = case
    d = Sparsifyd("lung", mask_key="body_mask")({"lung": win, "body_mask": mask})
    assert d["spatial_shape"] == [128, 128, 128]
    d = Densifyd("feats", output_key="dense")(d)
    assert torch.equal(d["dense"][0], torch.where(mask[0] & (win[0] > 0), win[0].as_tensor(), torch.zeros(())))


@pytest.mark.parametrize("max_points", [512, 5000, 40000])
def test_rand_sparse_crop_bounds(case, max_points):
    win, mask = case
    full_c, full_f = Sparsify()(win, mask)
    support = (mask[0] & (win[0] > 0)).numpy()
    crop = RandSparseCropd(["win"], max_points=max_points, mask_key="mask")
    crop.set_random_state(0)
    for _ in range(5):
        d = crop({"win": win, "mask": mask})
        start = np.asarray(d["crop_start"])
        shape = np.asarray(d["win"].shape[1:])
        assert np.all(start % 8 == 0) and np.all((shape % 8 == 0) | (start + shape == 128))
        assert d["full_shape"] == [128, 128, 128]
        assert d["mask"].shape == d["win"].shape
        s = Sparsifyd("win", mask_key="mask")(d)
        n = s["coords"].shape[0]
        assert 0 < n <= max_points
        c = s["coords"].numpy()
        assert np.all(c >= start) and np.all(c < start + shape)  # full-grid coordinates, inside the box
        assert support[tuple(c.T)].all()  # real support voxels, nothing dropped inside the box
        box_count = int(((full_c.numpy() >= start) & (full_c.numpy() < start + shape)).all(1).sum())
        assert n == box_count
        assert s["spatial_shape"] == [128, 128, 128]
        # the affine of the crop still maps to the same world points
        assert torch.allclose(d["win"].affine[:3, 3], win.affine[:3, 3] + win.affine[:3, :3] @ torch.as_tensor(
            start, dtype=torch.float64))


def test_rand_sparse_crop_whole_when_it_fits(case):
    win, mask = case
    out = RandSparseCrop(max_points=10**9)(win, mask)
    assert out[0].shape == win.shape and out[0].meta["crop_start"] == [0, 0, 0]
    with pytest.raises(ValueError):
        RandSparseCrop(max_points=100)


def test_rand_sparse_crop_array_and_counts(case):
    win, mask = case
    arr = win[0].numpy().astype(np.float16)
    counts = block_counts((win[0] > 0) & mask[0])
    assert counts.shape == (16, 16, 16) and int(counts.sum()) == int(((win[0] > 0) & mask[0]).sum())
    t = RandSparseCrop(max_points=4096)
    t.set_random_state(3)
    out = t(arr, counts=counts)
    start, stop = t.box
    assert isinstance(out, np.ndarray) and out.shape == tuple(np.subtract(stop, start))
    assert int(counts.numpy()[tuple(slice(a // 8, -(-b // 8)) for a, b in zip(start, stop))].sum()) <= 4096
    c, f = Sparsify()(out, offset=start)
    assert np.all(c.numpy() >= start)


def test_chain_to_files_and_crops(ct_data_dir, tmp_path):
    """The preprocessing chain, saved as .npy (any memory layout), memory-mapped, cropped, sparsified."""
    from monai.transforms import Compose

    from transforms import BodyMaskd, ClipHUd, LoadCTd, ResampleToCubed, Windowd

    chain = Compose([
        LoadCTd(["image", "label"], label_keys="label"),
        ResampleToCubed(["image", "label"], resolution=64, mode=["bilinear", "nearest"], padding_value=[-1024, 0]),
        ClipHUd("image"),
        Windowd("image", "lung", output_keys="lung"),
        BodyMaskd("image"),
    ])
    d = chain({"image": ct_data_dir / "abdomen_dicom_j2k/dicom",
               "label": ct_data_dir / "abdomen_dicom_j2k/seg_totalseg_total.nii.gz"})
    np.save(tmp_path / "lung.npy", d["lung"][0].numpy().astype(np.float16))
    np.save(tmp_path / "mask.npy", d["body_mask"][0].numpy())
    lung = np.load(tmp_path / "lung.npy", mmap_mode="r")
    mask = np.load(tmp_path / "mask.npy", mmap_mode="r")
    ref_c, ref_f = Sparsify()(d["lung"], d["body_mask"])
    crop = RandSparseCropd(["lung"], max_points=2000, mask_key="mask")
    crop.set_random_state(1)
    out = Sparsifyd("lung", mask_key="mask")(crop({"lung": lung, "mask": mask}))
    assert 0 < out["coords"].shape[0] <= 2000
    ref = {tuple(c): f for c, f in zip(ref_c.tolist(), ref_f[:, 0].tolist())}
    for c, f in zip(out["coords"].tolist()[:500], out["feats"][:, 0].tolist()):
        assert abs(ref[tuple(c)] - f) < 1e-3  # float16 storage


def test_support_box_is_the_blocks_that_hold_support():
    from transforms import crop_tables, support_box

    counts = np.zeros((8, 8, 8), dtype=np.int64)
    counts[2, 3:5, 1] = 7
    counts[5, 4, 6] = 1
    assert support_box(crop_tables(counts), 8, (60, 64, 64)) == ([16, 24, 8], [48, 40, 56])
    assert support_box(crop_tables(counts), 8, (40, 64, 64))[1][0] == 40  # clipped to the grid
    assert support_box(crop_tables(np.zeros((4, 4, 4), dtype=np.int64)), 8, (32, 32, 32)) == ([0, 0, 0], [32, 32, 32])

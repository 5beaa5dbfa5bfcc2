"""Body mask: patient kept (lungs included), table and air excluded."""

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from transforms import BodyMask, BodyMaskd, ClipHU, LoadCTd, ResampleToCubed, body_bbox, body_mask


def _phantom(n=96):
    """Air, a body ellipse with two lungs, a table slab below it (separated by 4 voxels of air)."""
    x = np.full((n, n, n), -1024.0, np.float32)
    i, j = np.mgrid[:n, :n]
    body = ((i - n / 2) / (0.4 * n)) ** 2 + ((j - n / 2) / (0.3 * n)) ** 2 < 1
    lung_l = ((i - 0.35 * n) / (0.1 * n)) ** 2 + ((j - 0.5 * n) / (0.15 * n)) ** 2 < 1
    lung_r = ((i - 0.65 * n) / (0.1 * n)) ** 2 + ((j - 0.5 * n) / (0.15 * n)) ** 2 < 1
    table = (j >= int(0.2 * n) - 8) & (j < int(0.2 * n) - 4) & (np.abs(i - n / 2) < 0.45 * n)
    sl = np.where(body, 40.0, -1024.0)
    sl[lung_l | lung_r] = -850.0
    sl[table] = 200.0
    x[:, :, 10:-10] = sl[:, :, None]
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    return MetaTensor(torch.from_numpy(x)[None], affine=torch.from_numpy(aff)), body, lung_l | lung_r, table


@pytest.mark.parametrize("factor", [None, 1, 4])
def test_phantom_mask(factor):
    img, body, lungs, table = _phantom()
    m = BodyMask(factor=factor)(img)
    assert m.dtype == torch.bool and m.shape == img.shape
    mid = m[0, :, :, 48].numpy()
    assert mid[lungs].all()  # lungs inside the body are kept
    assert not mid[table].any()  # the table is not the patient
    assert not m[0, :, :, :10].any() and not m[0, :, :, -10:].any()  # air outside the scanned range
    for k in (10, 11, 84, 85):  # lungs are kept up to the first and last scanned slice
        assert m[0, :, :, k].numpy()[lungs].all(), k
    assert (mid == body).mean() > 0.995  # the skin edge at full resolution


def test_mask_on_real_scan_with_lungs(ct_data_dir):
    names = json.loads((ct_data_dir / "totalsegmentator_v2_total_labels.json").read_text())
    lung_ids = [int(k) for k, v in names.items() if v.startswith("lung_")]
    d = LoadCTd(["image", "label"], label_keys="label")(
        {"image": ct_data_dir / "abdomen_nifti/example_ct_sm.nii.gz",
         "label": ct_data_dir / "abdomen_nifti/example_seg.nii.gz"})
    d = ResampleToCubed(["image", "label"], resolution=128, mode=["bilinear", "nearest"], padding_value=[-1024, 0])(d)
    img = ClipHU()(d["image"])
    d = BodyMaskd("image")({"image": img, "label": d["label"]})
    m = d["body_mask"][0].numpy()
    lab = d["label"][0].numpy()
    lungs = np.isin(lab, lung_ids)
    assert lungs.sum() > 500
    assert m[lungs].mean() > 0.99  # lungs included
    organs = lab > 0
    assert m[organs].mean() > 0.999
    hu = img[0].numpy()
    assert not m[hu < -900].all()
    # everything above -500 HU that is not the largest component (table, in this scan) stays out
    comp, n = ndimage.label(hu > -500)
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    others = (comp > 0) & (comp != sizes.argmax())
    assert others.sum() > 20 and m[others].mean() < 0.05
    # air around the patient (the cube corners) is not the body
    assert not m[:8, :8, :].any() and not m[-8:, -8:, :].any()
    bbox = body_bbox(d["body_mask"])
    assert all(0 <= a < b <= 128 for a, b in bbox)


def test_mask_excludes_table_dicom(ct_data_dir):
    from transforms import load_ct

    img = ClipHU()(load_ct(ct_data_dir / "abdomen_dicom_j2k/dicom"))
    m = body_mask(img)[0].numpy()
    hu = img[0].numpy()
    comp, n = ndimage.label(hu > -500)
    objs = ndimage.find_objects(comp)
    # the table: a wide, flat component under the patient (posterior = high row index in LPS)
    table = [k + 1 for k, o in enumerate(objs) if (o[0].stop - o[0].start) > 300 and (o[1].stop - o[1].start) < 120]
    assert table, "no table found in the test scan"
    for t in table:
        assert m[comp == t].mean() < 0.01
    assert m.mean() > 0.2
    assert m[(hu > 0) & (hu < 100)].mean() > 0.9  # soft tissue is mostly body

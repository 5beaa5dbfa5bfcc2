"""Metrics and three-plane pictures."""
import math

import numpy as np
import pytest
import torch
from monai.metrics import SSIMMetric, PSNRMetric

from pipeline.metrics import (
    codebook_usage,
    mae_rmse_hu,
    normalize_organ_mapping,
    organ_mae_hu,
    psnr,
    ssim3d,
    volume_metrics,
)
from pipeline.visualize import choose_center, plane_slices, save_three_plane, three_plane_image
from transforms import window_to_hu


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    x = rng.random((24, 20, 18)).astype(np.float32)
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    return x, y


def test_ssim_matches_monai(pair):
    x, y = pair
    ref = float(SSIMMetric(spatial_dims=3)(torch.tensor(y)[None, None], torch.tensor(x)[None, None]).mean())
    assert ssim3d(y, x) == pytest.approx(ref, abs=1e-5)
    assert ssim3d(y, x, slab=3) == pytest.approx(ref, abs=1e-5)  # slab-wise == one pass
    assert ssim3d(y, x, mask=np.ones_like(x, bool)) == pytest.approx(ref, abs=1e-5)
    assert ssim3d(torch.tensor(x)[None], torch.tensor(x)[None]) == pytest.approx(1.0, abs=1e-6)


def test_ssim_mask_restricts(pair):
    x, y = pair
    y2 = y.copy()
    y2[:12] = x[:12]  # first half perfect
    mask = np.zeros_like(x, bool)
    mask[:7] = True  # map centres 5..6 only see perfect voxels
    assert ssim3d(y2, x, mask=mask) == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(ssim3d(y2, x, mask=np.zeros_like(x, bool)))


def test_psnr_matches_monai(pair):
    x, y = pair
    ref = float(PSNRMetric(max_val=1.0)(torch.tensor(y)[None, None], torch.tensor(x)[None, None]).mean())
    assert psnr(y, x) == pytest.approx(ref, abs=1e-3)
    mask = np.zeros_like(x, bool)
    mask[2:5] = True
    mse = float(((y - x)[mask].astype(np.float64) ** 2).mean())
    assert psnr(y, x, mask) == pytest.approx(10 * math.log10(1 / mse), abs=1e-6)
    assert psnr(x, x) == math.inf


def test_hu_errors(pair):
    x, _ = pair
    y = x + 0.01
    mae, rmse = mae_rmse_hu(y, x, (1500, -600))
    assert mae == pytest.approx(15.0, rel=1e-4) and rmse == pytest.approx(15.0, rel=1e-4)
    assert window_to_hu(0.0, 1500, -600) == -1350 and window_to_hu(1.0, 400, 50) == 250
    assert mae_rmse_hu(y, x, {"width": 400, "level": 50})[0] == pytest.approx(4.0, rel=1e-4)


def test_organ_mae(pair):
    x, _ = pair
    y = x.copy()
    lab = np.zeros(x.shape, np.uint8)
    lab[:5] = 1
    lab[5:10] = 2
    y[:5] += 0.1
    out = organ_mae_hu(y, x, lab, (400, 50), {"liver": 1, "spleen": 2})
    assert out["liver"] == pytest.approx(40.0, rel=1e-4) and out["spleen"] == pytest.approx(0.0, abs=1e-6)
    assert normalize_organ_mapping({"1": "liver"}) == {1: "liver"}
    assert normalize_organ_mapping({"liver": 1}) == {1: "liver"}
    assert normalize_organ_mapping(None) == {}
    assert set(organ_mae_hu(y, x, lab, (400, 50))) == {"label_1", "label_2"}


def test_codebook_usage():
    u = codebook_usage([np.array([0, 1]), np.array([2, 3])], 8)
    assert u["codes_used"] == 4 and u["usage"] == 0.5 and u["perplexity"] == pytest.approx(4.0)
    assert codebook_usage(np.zeros(0, np.int64), 8)["codes_used"] == 0
    with pytest.raises(ValueError):
        codebook_usage(np.array([9]), 8)


def test_volume_metrics(pair):
    x, y = pair
    mask = x > 0.2
    lab = (x > 0.5).astype(np.uint8)
    m = volume_metrics(y, x, (1500, -600), mask, lab, {"1": "bright"})
    for key in ("psnr", "psnr_body", "ssim", "ssim_body", "mae_hu_body", "rmse_hu_body"):
        assert np.isfinite(m[key]), key
    assert "bright" in m["organ_mae_hu"]


def test_shape_mismatch(pair):
    x, _ = pair
    with pytest.raises(ValueError, match="shape"):
        psnr(x, x[:-1])


def test_three_plane(tmp_path, pair):
    x, y = pair
    img = three_plane_image(x, y, mask=x > 0.5, title="case")
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
    path = save_three_plane(tmp_path / "sub" / "p.png", x[None], torch.tensor(y)[None])
    assert (tmp_path / "sub" / "p.png").stat().st_size > 1000 and path.endswith("p.png")
    s = plane_slices(np.zeros((4, 5, 6)), (1, 2, 3))
    assert s["axial"].shape == (5, 4) and s["coronal"].shape == (6, 4) and s["sagittal"].shape == (6, 5)
    v = np.zeros((10, 10, 10))
    v[2:5, 4:9, 6:8] = 1
    assert choose_center(v) == (3, 6, 6)

"""HU clipping, windows (exact formula, presets, custom), normalisation and its inverse."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

import transforms as T

HU = torch.tensor([-3000.0, -2048, -1500, -1024, -1000, -600, -400, 0, 35, 50, 75, 250, 300, 1000, 1050, 3071, 4000])


def test_presets_and_filenames():
    assert T.WINDOW_PRESETS == {"lung": (1500, -600), "bone": (1500, 300), "soft_tissue": (400, 50), "brain": (80, 35)}
    assert T.parse_window("lung").filename == "lung_w1500_l-600.npy"
    assert T.parse_window("bone").filename == "bone_w1500_l300.npy"
    assert T.parse_window("soft_tissue").filename == "soft_tissue_w400_l50.npy"
    assert T.parse_window("brain").filename == "brain_w80_l35.npy"
    spec = T.parse_window("liver:150:60")
    assert spec == T.WindowSpec("liver", 150, 60) and spec.filename == "liver_w150_l60.npy"
    assert T.parse_window(("x", 10.5, -3)).filename == "x_w10.5_l-3.npy"
    assert T.parse_window({"name": "y", "width": 100, "level": 0}).low == -50
    for bad in ("nope", "a:b:c", "bad name:100:0", "w:0:10"):
        with pytest.raises(ValueError):
            T.parse_window(bad)


@pytest.mark.parametrize("name", sorted(T.WINDOW_PRESETS))
def test_window_formula_exact(name):
    w, l = T.WINDOW_PRESETS[name]
    out = T.Window(name)(HU)
    ref = np.clip((HU.double().numpy() - (l - w / 2)) / w, 0, 1)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)
    assert out.dtype == torch.float32 and float(out.min()) >= 0 and float(out.max()) <= 1
    # numpy input works the same
    np.testing.assert_allclose(T.Window(name)(HU.numpy()), ref, atol=1e-6)


def test_custom_window_and_int_input():
    out = T.Window("liver", width=150, level=60)(torch.tensor([-15, 60, 135, 200], dtype=torch.int32))
    np.testing.assert_allclose(out.numpy(), [0.0, 0.5, 1.0, 1.0], atol=1e-7)
    with pytest.raises(ValueError):
        T.Window(width=100)


def test_clip_and_normalize_roundtrip():
    c = T.ClipHU()(HU)
    assert float(c.min()) == -1024 and float(c[-1]) == 4000
    assert float(T.ClipHU(hu_max=3071)(HU).max()) == 3071
    n = T.NormalizeHU()(HU)
    ref = np.clip((HU.numpy() + 1024) / 4095, 0, 1)
    np.testing.assert_allclose(n.numpy(), ref, atol=1e-7)
    inside = (HU >= -1024) & (HU <= 3071)
    np.testing.assert_allclose(T.NormalizeHU().inverse(n)[inside].numpy(), HU[inside].numpy(), atol=1e-3)
    np.testing.assert_allclose(T.denormalize_hu(n.numpy())[inside.numpy()], HU[inside].numpy(), atol=1e-3)
    # float16 storage keeps HU within about half an HU step of 4095/2048
    n16 = n.half().float()
    assert float((T.denormalize_hu(n16) - HU)[inside].abs().max()) < 1.1


def test_dict_forms_keep_meta(ct_data_dir):
    img = T.load_ct(ct_data_dir / "abdomen_nifti/example_ct_sm.nii.gz")
    d = T.ClipHUd("image")({"image": img})
    assert float(d["image"].min()) == -1024 and isinstance(d["image"], MetaTensor)
    d = T.Windowd("image", "lung", output_keys="lung")(d)
    d = T.Windowd("image", "bone", output_keys="bone")(d)
    d = T.NormalizeHUd("image", output_keys="norm")(d)
    for k in ("lung", "bone", "norm"):
        assert isinstance(d[k], MetaTensor) and torch.equal(d[k].affine, img.affine)
        assert d[k].meta["filename_or_obj"] == img.meta["filename_or_obj"]
    assert d["lung"].meta["window"] == {"name": "lung", "width": 1500.0, "level": -600.0}
    assert "window" not in d["image"].meta
    back = T.NormalizeHUd("image", output_keys="norm").inverse(d)["norm"]
    assert torch.allclose(back, d["image"].clamp(max=3071), atol=1e-2)
    assert T.Windowd("missing", allow_missing_keys=True)({"image": img}).keys() == {"image"}

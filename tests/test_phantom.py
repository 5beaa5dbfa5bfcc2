"""The code-generated CT torso phantom."""
import json

import nibabel as nib
import numpy as np

from pipeline.phantom import HU, ORGANS, main, make_phantom, write_phantom, write_phantom_dataset


def test_deterministic_and_seeded():
    a, la, aff = make_phantom(0, shape=(48, 48, 40), spacing=8.0)
    b, lb, _ = make_phantom(0, shape=(48, 48, 40), spacing=8.0)
    c, _, _ = make_phantom(1, shape=(48, 48, 40), spacing=8.0)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert a.dtype == np.int16 and la.dtype == np.uint8 and aff.shape == (4, 4)


def test_tissues_plausible():
    hu, lab, aff = make_phantom(3, shape=(96, 96, 72), spacing=4.0)
    for name, idx in ORGANS.items():
        assert (lab == idx).any(), f"{name} missing"
    means = {n: float(hu[lab == i].mean()) for n, i in ORGANS.items()}
    assert means["lung_left"] < -700 and means["lung_right"] < -700
    assert -150 < means["fat"] < -50
    assert 20 < means["muscle"] < 80 and 40 < means["liver"] < 80 and 10 < means["kidney_left"] < 60
    assert means["ribs"] > 400 and means["spine"] > 300
    # air outside, no table: the border of every slice is air
    assert hu[0].max() < -900 and hu[:, 0].max() < -900 and hu[:, -1].max() < -900
    assert float(np.median(hu[lab == 0][hu[lab == 0] < -500])) < -950
    # RAS: liver on the patient's right (+x), spine posterior (-y), lungs superior (+z)
    ii, jj, kk = np.nonzero(lab == ORGANS["liver"])
    assert ii.mean() > hu.shape[0] / 2
    _, js, _ = np.nonzero(lab == ORGANS["spine"])
    assert js.mean() < hu.shape[1] / 2
    _, _, kl = np.nonzero(lab == ORGANS["lung_left"])
    assert kl.mean() > hu.shape[2] / 2
    assert np.allclose(np.diag(aff)[:3], 4.0)
    assert HU["air"] == -1000


def test_write_nifti(tmp_path):
    paths = write_phantom(tmp_path, seed=2, shape=(40, 40, 32), spacing=(6.0, 6.0, 7.0))
    img = nib.load(paths["ct"])
    lab = nib.load(paths["labels"])
    assert img.shape == (40, 40, 32) and lab.shape == img.shape
    assert np.allclose(img.affine, lab.affine) and np.isclose(img.affine[2, 2], 7.0)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    hu, labels, _ = make_phantom(2, (40, 40, 32), (6.0, 6.0, 7.0))
    assert np.array_equal(np.asarray(img.dataobj), hu)
    assert np.array_equal(np.asarray(lab.dataobj), labels)
    assert not list(tmp_path.rglob(".*tmp*"))  # atomic: no temporary left


def test_dataset_cli(tmp_path):
    assert main([str(tmp_path / "raw"), "--seeds", "0", "1", "--shape", "32", "32", "24", "--spacing", "10"]) == 0
    files = sorted(p.name for p in (tmp_path / "raw" / "phantom").iterdir())
    assert files == ["phantom_000.nii.gz", "phantom_000_seg.nii.gz", "phantom_001.nii.gz", "phantom_001_seg.nii.gz"]
    mapping = json.loads((tmp_path / "raw" / "organ_mapping.json").read_text())
    assert mapping["8"] == "liver" and len(mapping) == len(ORGANS)
    out = write_phantom_dataset(tmp_path / "raw2", seeds=[5], shape=(32, 32, 24), spacing=10.0, dataset="ds")
    assert (out / "ds" / "phantom_005.nii.gz").exists()


def test_discovery_pairs_labels(tmp_path):
    """pipeline.discovery finds each phantom as a case with its label map."""
    import pytest

    discovery = pytest.importorskip("pipeline.discovery")
    write_phantom_dataset(tmp_path, seeds=[0, 1], shape=(32, 32, 24), spacing=10.0)
    datasets = discovery.discover(tmp_path)
    cases = {c.case_id: c for d in datasets for c in d.cases}
    assert set(cases) == {"phantom_000", "phantom_001"}
    assert all(c.label is not None and c.label.name.endswith("_seg.nii.gz") for c in cases.values())


def test_loads_through_transforms(tmp_path):
    """The phantom goes through the project's loader like a real scan."""
    import pytest

    transforms = pytest.importorskip("transforms")
    if not hasattr(transforms, "LoadCT"):
        pytest.skip("transforms.LoadCT not available")
    paths = write_phantom(tmp_path, seed=0, shape=(40, 40, 32), spacing=8.0)
    vol = transforms.LoadCT()(str(paths["ct"]))
    assert tuple(vol.shape) == (1, 40, 40, 32)
    assert float(vol.min()) < -900 and float(vol.max()) > 500

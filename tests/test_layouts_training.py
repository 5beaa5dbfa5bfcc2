"""A training run on a compact dataset and on the same scans preprocessed with --layout guide:
the same losses and gradient norms every step, up to the guide's float16 windows (the crops
themselves are compared voxel by voxel in test_dataset.py)."""
import re
from pathlib import Path

import pytest

from test_training import _inproc, step_losses

GRAD_RE = re.compile(r"Step (\d+):.*? grad_norm=(\S+)")


@pytest.fixture(scope="module")
def layouts(ct_data_dir, tmp_path_factory) -> dict[str, Path]:
    from pipeline.preprocess import run as preprocess

    raw = tmp_path_factory.mktemp("raw") / "abdomen"
    raw.mkdir()
    for name in ("example_ct.nii.gz", "example_ct_sm.nii.gz"):
        (raw / name).symlink_to(ct_data_dir / "abdomen_nifti" / name)
    out = {}
    for layout in ("compact", "guide"):
        out[layout] = tmp_path_factory.mktemp(layout)
        res = preprocess(raw.parent, out[layout], num_workers=0, resolution=64, windows=["lung"], progress=False,
                         log=lambda *a, **k: None, layout=layout)
        assert res["ok"] == 2
    return out


def _grad_norms(run: Path) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in GRAD_RE.finditer((run / "log.txt").read_text())}


def test_training_same_on_both_layouts(layouts, tmp_path):
    runs = {}
    for layout, data in layouts.items():
        runs[layout] = tmp_path / layout
        _inproc("stage0.json", data_dir=str(data), output_dir=str(runs[layout]), max_steps=4, i_save=100,
                i_sample=100, i_val=100, seed=3)
    a, b = step_losses(runs["compact"]), step_losses(runs["guide"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-3), (s, a, b)
    ga, gb = _grad_norms(runs["compact"]), _grad_norms(runs["guide"])
    assert sorted(ga) == sorted(gb) == [1, 2, 3, 4]
    for s in ga:
        assert ga[s] == pytest.approx(gb[s], rel=1e-3), (s, ga, gb)

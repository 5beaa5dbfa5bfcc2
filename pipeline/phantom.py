"""A CT torso phantom generated in code, deterministic from a seed.

The phantom is an elliptic torso in air (no table) with skin, subcutaneous fat, a muscle wall,
two lungs, ribs, a spine, a liver and two kidneys at plausible HU values, mild noise, and a
label map of those organs. It is written as NIfTI (RAS affine), so it goes through the normal
preprocessing like a real scan::

    python -m pipeline.phantom RAW_DIR --seeds 0 1 2 [--shape 96 96 80] [--spacing 4]
    ./run.sh preprocess RAW_DIR processed_dataset RAW_DIR/organ_mapping.json

Array axes are RAS: i towards the patient's right, j anterior, k superior.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["ORGANS", "HU", "make_phantom", "organ_mapping", "write_phantom", "write_phantom_dataset"]

#: organ label ids of the phantom's label map (0 = background / unlabelled soft tissue)
ORGANS = {
    "skin": 1,
    "fat": 2,
    "muscle": 3,
    "lung_left": 4,
    "lung_right": 5,
    "ribs": 6,
    "spine": 7,
    "liver": 8,
    "kidney_left": 9,
    "kidney_right": 10,
}

#: mean HU of each tissue
HU = {
    "air": -1000.0,
    "skin": 30.0,
    "fat": -100.0,
    "muscle": 50.0,
    "soft": 30.0,  # unlabelled abdominal content
    "lung": -850.0,
    "rib": 700.0,
    "spine_cortex": 1000.0,
    "spine_marrow": 250.0,
    "canal": 15.0,
    "liver": 60.0,
    "kidney": 35.0,
}


def _ellipse(x, y, cx, cy, a, b):
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2


def make_phantom(
    seed: int = 0,
    shape: Sequence[int] = (128, 128, 96),
    spacing: float | Sequence[float] = 3.0,
    noise_hu: float = 12.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build one torso phantom.

    Args:
        seed: random seed; the same seed gives the same phantom.
        shape: voxels (X, Y, Z).
        spacing: voxel size in mm (one value or three).
        noise_hu: standard deviation of Gaussian noise added inside the body.

    Returns:
        (hu int16 (X, Y, Z), labels uint8 (X, Y, Z), affine 4x4 RAS).
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    ext = np.asarray(shape) * sp  # field of view in mm
    # world coordinates (mm) centred in x, y; z from the bottom of the field of view
    x = (np.arange(shape[0]) + 0.5) * sp[0] - ext[0] / 2
    y = (np.arange(shape[1]) + 0.5) * sp[1] - ext[1] / 2
    z = (np.arange(shape[2]) + 0.5) * sp[2]
    X, Y = np.meshgrid(x, y, indexing="ij")
    zf = z / ext[2]  # 0 (inferior) .. 1 (superior)

    j = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    # torso fills ~80 % of the field laterally, ~60 % antero-posteriorly
    a = 0.40 * ext[0] * j(0.92, 1.05)
    b = 0.30 * ext[1] * j(0.92, 1.05)
    cy = j(-0.03, 0.03) * ext[1]
    skin_t, fat_t, musc_t = 0.012 * a + 1.5, 0.08 * a * j(0.7, 1.3), 0.06 * a * j(0.8, 1.2)
    lung_z0 = j(0.50, 0.58)  # lung bases; diaphragm dome above the liver
    liver_z = (j(0.22, 0.28), lung_z0 + 0.08)
    kidney_z = (j(0.12, 0.18), j(0.36, 0.42))
    rib_period, rib_t = 0.09 * ext[2] * j(0.9, 1.1), 0.025 * ext[2]
    rib_phase = j(0, rib_period)
    spine_r = 0.11 * b
    spine_cy = cy - b + musc_t + fat_t + spine_r * 1.4

    hu = np.full(shape, HU["air"], dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint8)
    r_out = _ellipse(X, Y, 0, cy, a, b)
    for k in range(shape[2]):
        f = zf[k]
        # slight narrowing towards the top (shoulders are out of the field)
        s = 1.0 - 0.06 * f
        aa, bb = a * s, b * s
        e = _ellipse(X, Y, 0, cy, aa, bb)
        body = e <= 1.0
        # shells by distance-like ellipse offsets
        e_fat = _ellipse(X, Y, 0, cy, aa - skin_t, bb - skin_t)
        e_mus = _ellipse(X, Y, 0, cy, aa - skin_t - fat_t, bb - skin_t - fat_t)
        e_cav = _ellipse(X, Y, 0, cy, aa - skin_t - fat_t - musc_t, bb - skin_t - fat_t - musc_t)
        sl_hu = np.full(X.shape, HU["air"], np.float32)
        sl_lab = np.zeros(X.shape, np.uint8)
        sl_hu[body] = HU["skin"]
        sl_lab[body] = ORGANS["skin"]
        m = e_fat <= 1
        sl_hu[m], sl_lab[m] = HU["fat"], ORGANS["fat"]
        m = e_mus <= 1
        sl_hu[m], sl_lab[m] = HU["muscle"], ORGANS["muscle"]
        cav = e_cav <= 1
        sl_hu[cav], sl_lab[cav] = HU["soft"], 0
        ca, cb = aa - skin_t - fat_t - musc_t, bb - skin_t - fat_t - musc_t
        # ribs: bands inside the muscle wall, thorax only, open anteriorly
        if f > lung_z0 - 0.12 and ((z[k] - rib_phase) % rib_period) < rib_t:
            e_r1 = _ellipse(X, Y, 0, cy, ca + 0.6 * musc_t, cb + 0.6 * musc_t)
            rib = (e_r1 <= 1) & (e_cav > 1) & (Y < cy + 0.55 * cb)
            sl_hu[rib], sl_lab[rib] = HU["rib"], ORGANS["ribs"]
        # lungs
        if f > lung_z0:
            grow = min(1.0, (f - lung_z0) / 0.12)
            for side, name in ((-1, "lung_left"), (1, "lung_right")):
                lx = side * 0.48 * ca
                la, lb = 0.42 * ca * (0.6 + 0.4 * grow), 0.80 * cb * (0.6 + 0.4 * grow)
                m = (_ellipse(X, Y, lx, cy + 0.05 * cb, la, lb) <= 1) & cav
                sl_hu[m], sl_lab[m] = HU["lung"], ORGANS[name]
        # liver: patient's right (+x), below the right lung base
        if liver_z[0] < f < liver_z[1]:
            t = (f - liver_z[0]) / (liver_z[1] - liver_z[0])
            w = np.sin(np.pi * min(1.0, 0.25 + 0.75 * t))
            m = (_ellipse(X, Y, 0.35 * ca, cy + 0.05 * cb, 0.55 * ca * w + 1e-3, 0.65 * cb * w + 1e-3) <= 1) & cav
            m &= sl_lab != ORGANS["lung_right"]
            sl_hu[m], sl_lab[m] = HU["liver"], ORGANS["liver"]
        # kidneys: posterior, either side of the spine
        if kidney_z[0] < f < kidney_z[1]:
            t = (f - kidney_z[0]) / (kidney_z[1] - kidney_z[0])
            w = np.sqrt(max(0.0, 1 - (2 * t - 1) ** 2))
            for side, name in ((-1, "kidney_left"), (1, "kidney_right")):
                m = (_ellipse(X, Y, side * 0.42 * ca, spine_cy + 0.9 * spine_r, 0.14 * ca * w + 1e-3, 0.2 * cb * w + 1e-3) <= 1) & cav
                sl_hu[m], sl_lab[m] = HU["kidney"], ORGANS[name]
        # spine: vertebral body (cortex + marrow) with the canal behind it
        d = _ellipse(X, Y, 0, spine_cy, spine_r, spine_r)
        vert = d <= 1
        sl_hu[vert], sl_lab[vert] = HU["spine_cortex"], ORGANS["spine"]
        sl_hu[d <= 0.6] = HU["spine_marrow"]
        canal = _ellipse(X, Y, 0, spine_cy - 1.5 * spine_r, 0.45 * spine_r, 0.45 * spine_r) <= 1
        ring = (_ellipse(X, Y, 0, spine_cy - 1.5 * spine_r, 0.8 * spine_r, 0.8 * spine_r) <= 1) & ~canal
        sl_hu[ring], sl_lab[ring] = HU["spine_cortex"], ORGANS["spine"]
        sl_hu[canal], sl_lab[canal] = HU["canal"], 0
        hu[:, :, k] = sl_hu
        lab[:, :, k] = sl_lab
    del r_out
    body3 = hu > -900
    if noise_hu > 0:
        hu[body3] += rng.normal(0.0, noise_hu, size=int(body3.sum())).astype(np.float32)
    hu[~body3] = HU["air"] + rng.normal(0.0, 5.0, size=int((~body3).sum())).astype(np.float32)
    affine = np.diag([sp[0], sp[1], sp[2], 1.0])
    affine[:3, 3] = [-ext[0] / 2 + sp[0] / 2, -ext[1] / 2 + sp[1] / 2, sp[2] / 2]
    return np.round(hu).astype(np.int16), lab, affine


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    from pipeline.io_utils import atomic_path

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        # nibabel picks the compression from the name: keep ".nii.gz" on the temporary file
        tmp_gz = tmp.with_name(tmp.name + ".nii.gz")
        nib.save(img, str(tmp_gz))
        os.replace(tmp_gz, tmp)


def write_phantom(
    out_dir: str | os.PathLike,
    seed: int = 0,
    shape: Sequence[int] = (128, 128, 96),
    spacing: float | Sequence[float] = 3.0,
    name: str | None = None,
) -> dict[str, Path]:
    """Write one phantom as ``<name>.nii.gz`` and its label map ``<name>_seg.nii.gz``.

    Args:
        out_dir: folder to write into (created).
        seed: phantom seed.
        shape: voxels (X, Y, Z).
        spacing: voxel size in mm.
        name: case name (default ``phantom_<seed:03d>``).

    Returns:
        {"ct": path, "labels": path}.
    """
    hu, lab, affine = make_phantom(seed, shape, spacing)
    name = name or f"phantom_{seed:03d}"
    paths = {"ct": Path(out_dir) / f"{name}.nii.gz", "labels": Path(out_dir) / f"{name}_seg.nii.gz"}
    _save_nifti(paths["ct"], hu, affine)
    _save_nifti(paths["labels"], lab, affine)
    return paths


def organ_mapping() -> dict[str, str]:
    """The phantom's organ mapping in the preprocessing format ``{"1": "skin", ...}``."""
    return {str(i): n for n, i in ORGANS.items()}


def write_phantom_dataset(
    raw_dir: str | os.PathLike,
    seeds: Sequence[int] = (0, 1, 2),
    shape: Sequence[int] = (128, 128, 96),
    spacing: float | Sequence[float] = 3.0,
    dataset: str = "phantom",
) -> Path:
    """Write a raw dataset of phantoms for ``pipeline.preprocess``.

    Layout: ``RAW_DIR/<dataset>/phantom_<seed>.nii.gz`` + ``phantom_<seed>_seg.nii.gz`` (paired by
    name) and ``RAW_DIR/organ_mapping.json`` (``{"1": "skin", ...}``, the ORGAN_MAPPING_JSON).

    Args:
        raw_dir: raw data folder (created).
        seeds: one phantom per seed.
        shape: voxels per phantom.
        spacing: voxel size in mm.
        dataset: dataset folder name.

    Returns:
        ``raw_dir``.
    """
    from pipeline.io_utils import save_json

    out = Path(raw_dir)
    for s in seeds:
        write_phantom(out / dataset, int(s), shape, spacing)
    save_json(out / "organ_mapping.json", organ_mapping())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.phantom", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", metavar="RAW_DIR")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--shape", type=int, nargs=3, default=[128, 128, 96])
    p.add_argument("--spacing", type=float, nargs="+", default=[3.0])
    a = p.parse_args(argv)
    sp = a.spacing[0] if len(a.spacing) == 1 else a.spacing
    out = write_phantom_dataset(a.out_dir, a.seeds, a.shape, sp)
    print(f"wrote {len(a.seeds)} phantoms to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

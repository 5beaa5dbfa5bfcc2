"""Three-plane pictures of a CT reconstruction: axial, coronal and sagittal x input, reconstruction, error.

Volumes are (X, Y, Z) or (1, X, Y, Z) arrays in RAS order (i: to the right, j: anterior,
k: superior), window values in [0, 1]. Planes are shown in radiological convention: the
patient's right on the viewer's left, anterior and superior up.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["three_plane_figure", "three_plane_image", "save_three_plane", "plane_slices", "choose_center"]

PLANES = ("axial", "coronal", "sagittal")


def _np3d(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"expected a volume (X, Y, Z) or (1, X, Y, Z), got shape {a.shape}")
    return a


def choose_center(volume: Any, mask: Any | None = None) -> tuple[int, int, int]:
    """Voxel to cut through: centre of the mask's (or the non-zero voxels') bounding box, else the middle.

    Args:
        volume: the volume (X, Y, Z).
        mask: optional boolean mask of the body.
    """
    v = _np3d(volume)
    sel = _np3d(mask).astype(bool) if mask is not None else v > 0
    if not sel.any():
        return tuple(s // 2 for s in v.shape)
    center = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.nonzero(sel.any(axis=other))[0]
        center.append(int((idx[0] + idx[-1]) // 2))
    return tuple(center)


def plane_slices(volume: Any, center: Sequence[int]) -> dict[str, np.ndarray]:
    """Three 2D display slices through ``center`` (rows top to bottom, columns left to right).

    Args:
        volume: (X, Y, Z) RAS volume.
        center: voxel (i, j, k) the planes pass through.
    """
    v = _np3d(volume)
    i, j, k = (int(c) for c in center)
    # rows: anterior/superior up (flip), columns: patient's right on the left (flip i).
    axial = v[:, :, k].T[::-1, ::-1]  # rows j, cols i
    coronal = v[:, j, :].T[::-1, ::-1]  # rows k, cols i
    sagittal = v[i, :, :].T[::-1, ::-1]  # rows k, cols j (anterior on the left)
    return {"axial": axial, "coronal": coronal, "sagittal": sagittal}


def three_plane_figure(
    input_volume: Any,
    reconstructions: Any,
    center: Sequence[int] | None = None,
    mask: Any | None = None,
    title: str | None = None,
    error_range: float | None = None,
    dpi: int = 64,
):
    """The matplotlib figure: planes (rows) x input, then the reconstruction and signed error of each
    reconstruction, one error colour scale with a colour bar. The caller closes it.

    Args:
        input_volume: reference volume, window values in [0, 1].
        reconstructions: reconstructed volume of the same shape, or a {name: volume} mapping to
            compare side by side.
        center: voxel (i, j, k) to cut through; default: centre of the mask's bounding box.
        mask: optional body mask (chooses the centre and the error colour range).
        title: optional figure title.
        error_range: error colour scale ±range; default from the 99.5th percentile of |error|.
        dpi: resolution (64 gives about 576 x 600 pixels for one reconstruction).
    """
    recons = reconstructions if isinstance(reconstructions, dict) else {"reconstruction": reconstructions}
    x = _np3d(input_volume).astype(np.float32)
    ys = {name: _np3d(y).astype(np.float32) for name, y in recons.items()}
    for name, y in ys.items():
        if x.shape != y.shape:
            raise ValueError(f"input shape {x.shape} != {name} shape {y.shape}")
    if center is None:
        center = choose_center(x, mask)
    errs = {name: y - x for name, y in ys.items()}
    if error_range is None:
        a = np.concatenate([np.abs(e[mask.astype(bool)] if mask is not None else e).ravel() for e in errs.values()])
        error_range = float(max(0.05, np.percentile(a, 99.5))) if a.size else 0.05
    single = len(ys) == 1
    panels = [("input", plane_slices(x, center), dict(cmap="gray", vmin=0.0, vmax=1.0))]
    for name in ys:
        panels.append((name, plane_slices(ys[name], center), dict(cmap="gray", vmin=0.0, vmax=1.0)))
        label = "error" if single else f"{name} error"
        panels.append((f"{label} (recon - input)", plane_slices(errs[name], center),
                       dict(cmap="seismic", vmin=-error_range, vmax=error_range)))
    fig, axes = plt.subplots(3, len(panels), figsize=(3 * len(panels), 9.4), dpi=dpi, squeeze=False)
    for r, plane in enumerate(PLANES):
        for c, (name, slices, kw) in enumerate(panels):
            ax = axes[r, c]
            im = ax.imshow(slices[plane], interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0:
                ax.set_ylabel(plane, fontsize=10)
            if kw["cmap"] == "seismic":
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def three_plane_image(input_volume: Any, reconstruction: Any, **options: Any) -> np.ndarray:
    """Render :func:`three_plane_figure` (same arguments) to an RGB image.

    Returns:
        uint8 array (H, W, 3), e.g. for ``SummaryWriter.add_image(..., dataformats="HWC")``.
    """
    fig = three_plane_figure(input_volume, reconstruction, **options)
    try:
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
        return rgba[..., :3].copy()
    finally:
        plt.close(fig)


def save_three_plane(path: str | os.PathLike, input_volume: Any, reconstruction: Any, dpi: int = 80,
                     **options: Any) -> str:
    """Save :func:`three_plane_figure` (same arguments) as a PNG, written atomically; returns the path.

    Args:
        path: output .png path (folders are created).
    """
    from pipeline.io_utils import atomic_path

    path = os.fspath(path)
    with atomic_path(path) as tmp:  # creates the folder; removes the temporary file on failure
        fig = three_plane_figure(input_volume, reconstruction, dpi=dpi, **options)
        try:
            fig.savefig(tmp, format="png")
        finally:
            plt.close(fig)
    return path

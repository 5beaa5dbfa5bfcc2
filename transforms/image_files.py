"""Reading image files (NIfTI, NRRD, MetaImage): voxel arrays with RAS affines, header geometry, label overlap."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .load_errors import fail, first_line, last_line

__all__ = ["LPS_TO_RAS", "NIFTI_SUFFIXES", "ITK_SUFFIXES", "quiet_itk", "load_nifti", "load_itk", "label_coverage",
           "check_label_overlap"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


class quiet_itk:
    """Context manager silencing ITK warnings (non-DICOM probes, non-uniform sampling)."""

    def __enter__(self):
        import SimpleITK as sitk

        self._prev = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        return self

    def __exit__(self, *exc):
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalWarningDisplay(self._prev)
        return False


def _size(nbytes: float) -> str:
    """Bytes in the unit that fits: ``812 bytes``, ``3.5 KiB``, ``40.0 MiB``, ``1.4 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def _check_claimed_size(path, shape, itemsize: int, compressed: bool) -> None:
    """Refuses a header whose image size the file cannot hold (truncated file or a forged header),
    before any memory is allocated for it."""
    voxels = int(np.prod([int(s) for s in shape], dtype=np.float64)) if len(shape) else 0
    need = voxels * int(itemsize)
    have = os.path.getsize(path)
    # raw data is at most the file size; compressed CT shrinks far less than 1000x
    if need > have * (1000 if compressed else 1) or voxels > 2**34:
        raise fail(path, f"header claims a {' x '.join(str(int(v)) for v in shape)} image ({_size(need)}) "
                   f"but the file holds {_size(have)}", "the file is truncated or its header is wrong; re-export it")


def load_nifti(path: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(path)
        shape, dtype = img.header.get_data_shape(), img.header.get_data_dtype()
    except Exception as e:  # nibabel raises many types for corrupt or foreign files
        raise fail(path, f"not a readable NIfTI file ({first_line(e)})",
                   "check the file is a complete NIfTI image (re-export or re-download it)") from None
    _check_claimed_size(path, shape, dtype.itemsize, compressed=path.lower().endswith(".gz"))
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise fail(path, f"not a readable NIfTI file ({first_line(e)})",
                   "check the file is a complete NIfTI image (re-export or re-download it)") from None
    aff = np.asarray(img.affine, dtype=np.float64)
    return data, aff


def load_itk(path: str) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        with quiet_itk():
            reader = sitk.ImageFileReader()
            reader.SetFileName(path)
            reader.ReadImageInformation()
    except RuntimeError as e:
        raise fail(path, f"not a readable image file ({last_line(e)})",
                   "check the file is a complete NRRD/MHA image (re-export it)") from None
    if not path.lower().endswith((".nhdr", ".mhd")):  # detached data lies in another file
        bits = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
        itemsize = int(bits.group(1)) // 8 if bits else 1
        _check_claimed_size(path, reader.GetSize(), itemsize * reader.GetNumberOfComponents(), compressed=True)
    try:
        with quiet_itk():
            img = reader.Execute()
    except (RuntimeError, MemoryError) as e:
        raise fail(path, f"not a readable image file ({last_line(e)})",
                   "check the file is a complete NRRD/MHA image (re-export it)") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise fail(path, "image has several components per pixel (RGB/vector), not CT HU",
                   "give a single-channel CT volume")
    if img.GetDimension() < 3:
        raise fail(path, "a 2D image, not a 3D volume", "give a 3D CT volume")
    if img.GetDimension() > 3:
        if any(sz != 1 for sz in img.GetSize()[3:]):
            raise fail(path, "a 4D image with several volumes", "give a single 3D CT volume")
        img = img[:, :, :, 0]
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    d = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = d * np.asarray(img.GetSpacing())[None, :]
    aff[:3, 3] = img.GetOrigin()
    return np.asarray(arr), LPS_TO_RAS @ aff


def _header_geometry(path: Path) -> tuple[np.ndarray, tuple] | None:
    """(RAS affine, shape) from a volume file's header only (None when it cannot be read)."""
    try:
        if str(path).lower().endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            img = nib.load(str(path))
            return np.asarray(img.affine, np.float64), tuple(int(v) for v in img.shape[:3])
        import SimpleITK as sitk

        r = sitk.ImageFileReader()
        r.SetFileName(str(path))
        with quiet_itk():
            r.ReadImageInformation()
        aff = np.eye(4)
        aff[:3, :3] = (np.asarray(r.GetDirection()).reshape(r.GetDimension(), -1)[:3, :3]
                       * np.asarray(r.GetSpacing())[None, :3])
        aff[:3, 3] = r.GetOrigin()[:3]
        return LPS_TO_RAS @ aff, tuple(int(v) for v in r.GetSize()[:3])
    except Exception:
        return None


def label_coverage(label: str | os.PathLike, image_affine, image_shape, samples: int = 24) -> float | None:
    """Share of an image's volume that a label map's grid covers (0.0: they do not overlap).

    Read from the label's header only: the image grid is sampled on ``samples``^3 points, each
    mapped into the label's voxel grid through the two affines.

    Args:
        label: label map file (NIfTI, NRRD, MHA).
        image_affine: 4x4 RAS affine of the image.
        image_shape: the image's (X, Y, Z).
        samples: points per axis.

    Returns:
        the covered share in [0, 1], or None when the label's header cannot be read.
    """
    geo = _header_geometry(Path(label))
    if geo is None:
        return None
    lab_aff, lab_shape = geo
    shape = np.asarray([int(v) for v in list(image_shape)[-3:]], np.float64)
    axes = [np.linspace(0, n - 1, samples) for n in shape]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    pts = np.concatenate([pts, np.ones((len(pts), 1))], 1)
    world = pts @ np.asarray(image_affine, np.float64).T
    ijk = (world @ np.linalg.inv(lab_aff).T)[:, :3]
    inside = np.all((ijk > -0.5) & (ijk < np.asarray(lab_shape) - 0.5), axis=1)
    return float(inside.mean())


def check_label_overlap(label: str | os.PathLike, image_affine, image_shape) -> tuple[float | None, list[str]]:
    """:func:`label_coverage` of a label map, refusing one that does not overlap its image at all.

    Returns:
        (covered share or None when the header cannot be read, warnings: a label map covering
        less than half of the image).

    Raises:
        CTLoadError: the label map and the image do not overlap.
    """
    cover = label_coverage(label, image_affine, image_shape)
    if cover == 0.0:
        raise fail(label, "label map does not overlap its image in world space (covers 0% of it)",
                   "pair it with the right image, or fix the origin / orientation in its header")
    warn = [f"label map {Path(label).name} covers only {cover:.0%} of the image"] if cover is not None and cover < 0.5 else []
    return cover, warn

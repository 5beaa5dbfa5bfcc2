"""Loading CT volumes (DICOM series, zipped DICOM, NIfTI, NRRD, MHA) as HU MetaTensors.

Every loader returns a float32 ``MetaTensor`` of shape (1, X, Y, Z) in Hounsfield units whose
``affine`` maps array indices (i, j, k) to RAS world millimetres (MONAI convention). Anything that
is not a loadable CT volume raises :class:`CTLoadError` with one line naming the input and the fix.
"""


from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from .dicom import load_dicom
from .image_files import ITK_SUFFIXES, NIFTI_SUFFIXES, load_itk, load_nifti
from .load_errors import check_readable, fail

__all__ = ["LoadCT", "LoadCTd", "load_ct"]


def _check_volume(path, data: np.ndarray, check_hu: bool) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 5 and data.shape[3:] == (1, 1):
        data = data[..., 0, 0]
    if data.ndim == 2 or (data.ndim == 3 and min(data.shape) == 1):
        raise fail(path, f"a single 2D slice of shape {tuple(data.shape)}, not a 3D volume",
                   "give the whole CT volume")
    if data.ndim != 3:
        raise fail(path, f"array of shape {tuple(data.shape)} is not one 3D volume", "give a single 3D CT volume")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise fail(path, f"voxel type {data.dtype} is not a real number", "give a CT volume in HU")
    vol = data.astype(np.float32, copy=False)
    if check_hu:
        lo, hi = float(vol.min()), float(vol.max())
        if not np.isfinite(lo) or not np.isfinite(hi):
            raise fail(path, "volume contains NaN or infinite values", "clean the volume before loading")
        if lo > -500 or hi - lo < 200:
            raise fail(path, f"values {lo:g}..{hi:g} do not look like CT in HU (no air below -500 HU)",
                       "give a CT in Hounsfield units (apply rescale slope/intercept; a normalised or 8-bit image cannot be used)")
    return vol


def _kind(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "dicom_dir"
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    return "file"


def load_ct(path: str | os.PathLike, series_uid: str | None = None, check_hu: bool = True,
            label: bool = False) -> MetaTensor:
    """Loads one CT volume as a (1, X, Y, Z) float32 HU MetaTensor with a RAS affine.

    Args:
        path: a DICOM folder, a .zip of a DICOM series, a single DICOM file of a series folder,
            or a NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) or MetaImage (.mha/.mhd) file.
        series_uid: SeriesInstanceUID to load when a folder holds several series (default: the
            CT volume series with the most slices).
        check_hu: refuse volumes whose values do not look like HU (no voxel below -500).
        label: load a label map instead (no HU check, integer ids kept as int16/int32).

    Raises:
        CTLoadError: the input is not a loadable CT volume (message names the input and the fix).
    """
    path = Path(path)
    if not path.exists():
        raise fail(path, "does not exist", "check the path")
    check_readable(path)
    kind = _kind(path)
    meta: dict = {"load_warnings": []}
    if kind in ("dicom_dir", "zip", "file"):
        data, aff, meta = load_dicom(path, kind == "zip", series_uid)
    elif kind == "nifti":
        data, aff = load_nifti(str(path))
    else:
        data, aff = load_itk(str(path))
    vol = _check_volume(path, data, check_hu and not label)
    if label:
        ids = np.rint(vol)
        if np.abs(vol - ids).max() > 1e-3 or ids.min() < 0:
            raise fail(path, "label map holds non-integer or negative values", "give an integer label map")
        vol = ids.astype(np.int16 if ids.max() < 32768 else np.int32)
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise fail(path, "has a degenerate or missing affine (zero voxel size)", "fix the header geometry")
    spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    affine_t = torch.as_tensor(aff, dtype=torch.float64)
    meta.update(
        {
            "filename_or_obj": str(path),
            "original_affine": affine_t.clone(),
            "original_spacing": [float(v) for v in spacing],
            "original_shape": [int(v) for v in vol.shape],
            "spatial_shape": np.asarray(vol.shape),
            "original_channel_dim": float("nan"),
            "space": "RAS",
            "source_format": kind,
        }
    )
    return MetaTensor(torch.from_numpy(vol)[None], affine=affine_t, meta=meta)


class LoadCT(Transform):
    """Loads a CT volume (DICOM folder/zip, NIfTI, NRRD, MHA) as a (1, X, Y, Z) float32 HU MetaTensor.

    The affine maps (i, j, k) to RAS mm; meta holds ``filename_or_obj``, ``original_affine``,
    ``original_spacing`` and ``original_shape``. Gantry-tilted or unevenly spaced DICOM stacks are
    resampled onto a regular grid, each slice placed by its ImagePositionPatient.

    Args:
        series_uid: SeriesInstanceUID to pick when a folder holds several series.
        check_hu: refuse volumes whose values do not look like HU.
        orientation: optional axcodes (e.g. "RAS") applied with monai ``Orientation`` after loading.
        label: load label maps (integer ids, no HU check) instead of CT.
    """

    def __init__(self, series_uid: str | None = None, check_hu: bool = True, orientation: str | None = None,
                 label: bool = False):
        self.series_uid = series_uid
        self.check_hu = check_hu
        self.orientation = orientation
        self.label = label

    def __call__(self, path: str | os.PathLike) -> MetaTensor:
        img = load_ct(path, series_uid=self.series_uid, check_hu=self.check_hu, label=self.label)
        if self.orientation:
            from monai.transforms import Orientation

            img = Orientation(axcodes=self.orientation, labels=None)(img)
        return img


class LoadCTd(MapTransform):
    """Dictionary form of :class:`LoadCT`: replaces each path under ``keys`` with the loaded volume.

    Args:
        keys: keys holding paths.
        series_uid: SeriesInstanceUID to pick when a folder holds several series.
        check_hu: refuse volumes whose values do not look like HU.
        orientation: optional axcodes (e.g. "RAS") applied after loading.
        label_keys: keys (among ``keys``) holding label maps: loaded as integer ids without HU check.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, series_uid: str | None = None, check_hu: bool = True,
                 orientation: str | None = None, label_keys: KeysCollection = (), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.label_keys = {label_keys} if isinstance(label_keys, str) else set(label_keys)
        self.loader = LoadCT(series_uid=series_uid, check_hu=check_hu, orientation=orientation)
        self.label_loader = LoadCT(orientation=orientation, label=True)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (self.label_loader if key in self.label_keys else self.loader)(d[key])
        return d

"""Loading CT volumes (DICOM series, zipped DICOM, NIfTI, NRRD, MHA) as HU MetaTensors.

Every loader returns a float32 ``MetaTensor`` of shape (1, X, Y, Z) in Hounsfield units whose
``affine`` maps array indices (i, j, k) to RAS world millimetres (MONAI convention). Anything that
is not a loadable CT volume raises :class:`CTLoadError` with one line naming the input and the fix.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

__all__ = [
    "CTLoadError",
    "LoadCT",
    "LoadCTd",
    "load_ct",
    "find_dicom_series",
    "dicom_volume_series",
    "label_coverage",
    "check_label_overlap",
    "MAX_SLICE_GAP",
    "LPS_TO_RAS",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_LOCALIZER_WORDS = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM", "SURVIEW", "PILOT")

# DICOM tags read from headers (SimpleITK key format "gggg|eeee").
_T_MODALITY = "0008|0060"
_T_IMAGE_TYPE = "0008|0008"
_T_SERIES_UID = "0020|000e"
_T_SERIES_DESC = "0008|103e"
_T_IPP = "0020|0032"
_T_IOP = "0020|0037"
_T_INSTANCE = "0020|0013"
_T_TILT = "0018|1120"


class CTLoadError(ValueError):
    """Raised for an input that is not a loadable CT volume (message: input and what to do)."""


def _fail(path, what: str, fix: str) -> CTLoadError:
    return CTLoadError(f"{path}: {what}; {fix}")


def _first_line(e: BaseException, limit: int = 100) -> str:
    """``Type: first line of the message`` (just the type when the message is empty, e.g. MemoryError)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


def _check_readable(path: Path) -> None:
    """Refuses a path this process may not read, naming the permission."""
    need = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, need):
        raise _fail(path, "no permission to read it", "fix its permissions (e.g. chmod -R a+rX) or run as a user who may read it")


#: slices wider apart than this many typical spacings (and 10 mm) are refused instead of interpolated
MAX_SLICE_GAP = 3.0


class _quiet_itk:
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


# ----------------------------------------------------------------------------------------------
# DICOM headers and series
# ----------------------------------------------------------------------------------------------


@dataclass
class _DicomHeader:
    path: str
    series_uid: str
    modality: str
    image_type: str
    description: str
    size: tuple
    spacing: tuple
    ipp: np.ndarray | None
    iop: np.ndarray | None
    instance: int
    tilt: float = 0.0
    extra: dict = field(default_factory=dict)


def _looks_like_dicom(path: str) -> bool:
    """True when the file has the DICM magic at byte 128 (cheap header test, no extension)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _floats(text: str | None, n: int) -> np.ndarray | None:
    if not text:
        return None
    try:
        vals = [float(v) for v in text.strip().replace(" ", "").split("\\") if v != ""]
    except ValueError:
        return None
    return np.asarray(vals, dtype=np.float64) if len(vals) == n else None


def _read_dicom_header(path: str, force: bool = False) -> _DicomHeader | None:
    """Reads one file's DICOM header with GDCM; None when the file is not a DICOM image."""
    import SimpleITK as sitk

    magic = _looks_like_dicom(path)
    if not force and not magic:
        return None
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(path)
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError:
        if magic:
            raise _fail(path, "DICOM file with an unreadable header (truncated or corrupt)",
                        "remove or replace this file and load the series again") from None
        return None

    def tag(key: str) -> str:
        return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""

    try:
        instance = int(float(tag(_T_INSTANCE) or 0))
    except ValueError:
        instance = 0
    try:
        tilt = float(tag(_T_TILT) or 0.0)
    except ValueError:
        tilt = 0.0
    return _DicomHeader(
        path=path,
        series_uid=tag(_T_SERIES_UID),
        modality=tag(_T_MODALITY).upper(),
        image_type=tag(_T_IMAGE_TYPE).upper(),
        description=tag(_T_SERIES_DESC),
        size=tuple(reader.GetSize()),
        spacing=tuple(reader.GetSpacing()),
        ipp=_floats(tag(_T_IPP), 3),
        iop=_floats(tag(_T_IOP), 6),
        instance=instance,
        tilt=tilt,
    )


def _scan_dicom(folder: str | os.PathLike) -> dict[str, list[_DicomHeader]]:
    """Headers of every DICOM image under ``folder`` (recursive), grouped by SeriesInstanceUID.

    Files are recognised by their content (DICM magic, then a GDCM header read for files without
    a preamble), never by extension. Files without a SeriesInstanceUID (anonymised data) share
    the key "" and are split further by geometry when loaded.
    """
    groups: dict[str, list[_DicomHeader]] = {}
    for root, _dirs, files in os.walk(folder):
        for name in sorted(files):
            p = os.path.join(root, name)
            _check_readable(Path(p))
            hdr = _read_dicom_header(p)
            if hdr is None and not name.lower().endswith(_NIFTI_SUFFIXES + _ITK_SUFFIXES + (".zip", ".json", ".txt")):
                # DICOM files written without the 128-byte preamble: ask GDCM directly.
                if os.path.getsize(p) < (1 << 30):
                    hdr = _read_dicom_header(p, force=True)
            if hdr is not None:
                groups.setdefault(hdr.series_uid, []).append(hdr)
    return groups


def find_dicom_series(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Finds the DICOM series in a folder by reading headers (not file extensions).

    Args:
        folder: directory searched recursively.

    Returns:
        ``{SeriesInstanceUID: [file paths]}``; files of a series are sorted along the slice normal
        when positions are known. Anonymised files without a UID are grouped under "".
    """
    out = {}
    for uid, headers in _scan_dicom(folder).items():
        out[uid] = [h.path for h in _sort_slices(headers)]
    return out


def dicom_volume_series(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The CT volume series of a DICOM folder (searched recursively, as :func:`load_ct` does).

    Args:
        folder: DICOM folder.

    Returns:
        (SeriesInstanceUIDs of CT volume series, notes ``"series UID: reason"`` on the series that
        are not: other modalities, localizers). A folder whose files cannot be read gives ([], []),
        leaving the refusal to :func:`load_ct`.
    """
    try:
        groups = _scan_dicom(folder)
    except CTLoadError:
        return [], []
    volumes, notes = [], []
    for uid, headers in sorted(groups.items()):
        try:
            _choose_series(folder, {uid: headers}, None)
            volumes.append(uid)
        except CTLoadError as e:
            notes.append(f"series {uid or '(no UID)'} ({len(headers)} files): {str(e).split(': ', 1)[-1]}")
    return volumes, notes


def _header_geometry(path: Path) -> tuple[np.ndarray, tuple] | None:
    """(RAS affine, shape) from a volume file's header only (None when it cannot be read)."""
    try:
        if str(path).lower().endswith(_NIFTI_SUFFIXES):
            import nibabel as nib

            img = nib.load(str(path))
            return np.asarray(img.affine, np.float64), tuple(int(v) for v in img.shape[:3])
        import SimpleITK as sitk

        r = sitk.ImageFileReader()
        r.SetFileName(str(path))
        with _quiet_itk():
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
        raise _fail(label, "label map does not overlap its image in world space (covers 0% of it)",
                    "pair it with the right image, or fix the origin / orientation in its header")
    warn = [f"label map {Path(label).name} covers only {cover:.0%} of the image"] if cover is not None and cover < 0.5 else []
    return cover, warn


def _normal(iop: np.ndarray) -> np.ndarray:
    n = np.cross(iop[:3], iop[3:])
    return n / max(np.linalg.norm(n), 1e-12)


def _sort_slices(headers: list[_DicomHeader]) -> list[_DicomHeader]:
    if all(h.ipp is not None and h.iop is not None for h in headers) and headers:
        n = _normal(headers[0].iop)
        return sorted(headers, key=lambda h: float(h.ipp @ n))
    return sorted(headers, key=lambda h: (h.instance, h.path))


def _is_localizer(h: _DicomHeader) -> bool:
    return any(w in h.image_type for w in _LOCALIZER_WORDS) or any(
        w in h.description.upper() for w in ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW")
    )


def _split_by_geometry(headers: list[_DicomHeader]) -> list[list[_DicomHeader]]:
    """Splits one UID group into stacks sharing image size, pixel spacing and orientation."""
    stacks: dict[tuple, list[_DicomHeader]] = {}
    for h in headers:
        iop = tuple(np.round(h.iop, 3)) if h.iop is not None else None
        key = (h.size[:2], tuple(np.round(h.spacing[:2], 4)), iop)
        stacks.setdefault(key, []).append(h)
    return list(stacks.values())


def _choose_series(path, groups: dict[str, list[_DicomHeader]], series_uid: str | None) -> tuple[list[_DicomHeader], int]:
    """Picks the CT volume series to load (the one asked for, else the CT stack with most slices).

    Returns:
        (its headers, how many slices of the same SeriesInstanceUID were left out: another size,
        pixel spacing or orientation).
    """
    if not groups:
        raise _fail(path, "no DICOM image files found (empty folder or no readable DICOM headers)",
                    "point to a folder, .zip or file holding a CT DICOM series")
    if series_uid is not None:
        if series_uid not in groups:
            raise _fail(path, f"no DICOM series with SeriesInstanceUID {series_uid!r} "
                        f"(found {sorted(groups)})", "pass one of the listed series_uid values")
        groups = {series_uid: groups[series_uid]}
    modalities = sorted({h.modality or "?" for hs in groups.values() for h in hs})
    candidates = []
    localizer_only = False
    for hs in groups.values():
        ct = [h for h in hs if h.modality == "CT"]
        if not ct:
            continue
        vol = [h for h in ct if not _is_localizer(h)]
        if not vol:
            localizer_only = True
            continue
        candidates.extend(_split_by_geometry(vol))
    if not candidates:
        if localizer_only:
            raise _fail(path, "the DICOM series is a localizer/scout image, not a CT volume",
                        "give the axial CT series instead")
        raise _fail(path, f"DICOM modality {'/'.join(modalities)} is not CT",
                    "give a CT series (only CT in Hounsfield units is supported)")
    best = max(candidates, key=len)
    left = sum(len(c) for c in candidates if c is not best and c[0].series_uid == best[0].series_uid)
    return best, left


def _read_dicom_stack(path, headers: list[_DicomHeader]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reads a sorted DICOM stack into (X, Y, Z) float32 HU and a RAS affine.

    Slices are placed by their own ImagePositionPatient. Evenly spaced stacks perpendicular to the
    slice plane map directly; gantry-tilted or unevenly spaced stacks are resampled onto a regular
    grid (axes: row, column, slice normal) in world space.
    """
    import SimpleITK as sitk

    if len(headers) < 2:
        raise _fail(path, "a single 2D DICOM slice, not a 3D volume",
                    "give the whole CT series (folder or .zip with all slices)")
    for h in headers:
        if h.ipp is None or h.iop is None:
            raise _fail(h.path, "DICOM slice without ImagePositionPatient/ImageOrientationPatient",
                        "export the series with full geometry headers")
        if len(h.size) > 2 and h.size[2] > 1:
            raise _fail(h.path, "multi-frame DICOM is not supported",
                        "convert it to single-frame DICOM or NIfTI first")
    headers = _sort_slices(headers)
    iop = headers[0].iop
    r, c = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    n = _normal(iop)
    pos = np.stack([h.ipp for h in headers])  # (K, 3) LPS
    s = pos @ n
    gaps = np.diff(s)
    if np.any(gaps < 1e-3):
        raise _fail(path, "DICOM series has several slices at the same position (mixed acquisitions?)",
                    "split the series so each position appears once")
    typical = float(np.median(gaps))
    wide = np.flatnonzero(gaps > 1.5 * typical)
    warnings = []
    if len(wide):
        worst = float(gaps.max())
        if worst > MAX_SLICE_GAP * typical + 1e-3 and worst > 10.0:
            raise _fail(path, f"a gap of {worst:.1f} mm between slices (typical spacing {typical:.2f} mm, about "
                        f"{round(worst / typical) - 1} slices missing)", "give the complete series "
                        f"(gaps up to {MAX_SLICE_GAP:g} spacings or 10 mm are interpolated with a warning)")
        missing = int(sum(round(g / typical) - 1 for g in gaps[wide]))
        warnings.append(f"{len(wide)} gap(s) between slices up to {worst:.1f} mm (typical {typical:.2f} mm, about "
                        f"{missing} slice(s) missing) were interpolated")
    dx, dy = float(headers[0].spacing[0]), float(headers[0].spacing[1])
    files = [h.path for h in headers]
    with _quiet_itk():
        try:
            img = sitk.ReadImage(files, sitk.sitkFloat32)
        except RuntimeError as e:
            raise _fail(path, f"cannot decode the DICOM pixel data ({str(e).strip().splitlines()[-1][:120]})",
                        "check the files are complete and the transfer syntax is supported by GDCM") from None
    arr = sitk.GetArrayFromImage(img)  # (Z, Y, X)
    vol = arr.transpose(2, 1, 0)  # (X, Y, Z) float32 view (X innermost in memory)
    lateral = pos - pos[0] - np.outer(s - s[0], n)  # in-plane drift of each slice (mm)
    drift = float(np.abs(lateral).max())
    mean_gap = float(gaps.mean())
    uneven = float(np.abs(gaps - mean_gap).max()) > max(1e-3, 0.01 * mean_gap)
    tilted = drift > 0.01 * min(dx, dy)
    info = {
        "dicom_slices": len(headers),
        "dicom_gantry_tilt": headers[0].tilt,
        "dicom_uneven_spacing": bool(uneven),
        "dicom_regularized": bool(uneven or tilted),
        "dicom_slice_gaps_mm": [round(float(g), 4) for g in np.unique(np.round(gaps, 3))],
        "load_warnings": warnings,
    }
    if not (uneven or tilted):
        aff = np.eye(4)
        aff[:3, 0], aff[:3, 1] = r * dx, c * dy
        aff[:3, 2] = (pos[-1] - pos[0]) / (len(headers) - 1)
        aff[:3, 3] = pos[0]
        return vol, LPS_TO_RAS @ aff, info
    vol, aff = _regularize_stack(vol, pos, r, c, n, dx, dy, s, gaps)
    return vol, LPS_TO_RAS @ aff, info


def _regularize_stack(vol, pos, r, c, n, dx, dy, s, gaps, pad: float = -1024.0):
    """Resamples slices at arbitrary positions (tilt, uneven gaps) onto a regular world grid.

    Each target point is projected along the slice normal onto the two enclosing source slices,
    which are sampled bilinearly at their own in-plane offsets and blended linearly.
    """
    nx, ny, nk = vol.shape
    dz = float(gaps.min())
    off = np.stack([(pos - pos[0]) @ r, (pos - pos[0]) @ c], axis=1)  # (K, 2) in-plane offsets, mm
    ox0, oy0 = off[:, 0].min(), off[:, 1].min()
    out_x = int(np.ceil((off[:, 0].max() - ox0) / dx - 1e-6)) + nx
    out_y = int(np.ceil((off[:, 1].max() - oy0) / dy - 1e-6)) + ny
    srel = s - s[0]
    out_z = int(np.floor(srel[-1] / dz + 1e-6)) + 1
    zt = np.arange(out_z) * dz
    k0 = np.clip(np.searchsorted(srel, zt, side="right") - 1, 0, nk - 2)
    w = np.clip((zt - srel[k0]) / (srel[k0 + 1] - srel[k0]), 0.0, 1.0)
    # 1) shift every source slice onto the common in-plane grid (separable linear, pad outside)
    from .geometry import _axis_plan, _take

    src = torch.from_numpy(np.ascontiguousarray(vol.transpose(2, 1, 0)))  # (K, Y, X)
    shifted = torch.full((nk, out_y, out_x), pad, dtype=torch.float32)
    for k in range(nk):
        plane = src[k]
        px = _axis_plan(1.0, (ox0 - off[k, 0]) / dx, nx, out_x, True)
        py = _axis_plan(1.0, (oy0 - off[k, 1]) / dy, ny, out_y, True)
        for dim, (lo, hi, idx, wt) in ((1, px), (0, py)):
            if wt is None:
                plane = _take(plane, dim, idx)
            else:
                shape = [1, 1]
                shape[dim] = -1
                plane = _take(plane, dim, idx).lerp_(_take(plane, dim, idx + 1), wt.view(shape))
        shifted[k, py[0]:py[1], px[0]:px[1]] = plane
    # 2) blend the two slices enclosing each target plane along the normal
    k0_t = torch.from_numpy(k0)
    out = shifted.index_select(0, k0_t)
    out.lerp_(shifted.index_select(0, k0_t + 1), torch.from_numpy(w.astype(np.float32)).view(-1, 1, 1))
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2] = r * dx, c * dy, n * dz
    aff[:3, 3] = pos[0] + ox0 * r + oy0 * c
    return out.permute(2, 1, 0).numpy(), aff


# ----------------------------------------------------------------------------------------------
# File formats
# ----------------------------------------------------------------------------------------------


def _check_claimed_size(path, shape, itemsize: int, compressed: bool) -> None:
    """Refuses a header whose image size the file cannot hold (truncated file or a forged header),
    before any memory is allocated for it."""
    voxels = int(np.prod([int(s) for s in shape], dtype=np.float64)) if len(shape) else 0
    need = voxels * int(itemsize)
    have = os.path.getsize(path)
    # raw data is at most the file size; compressed CT shrinks far less than 1000x
    if need > have * (1000 if compressed else 1) or voxels > 2**34:
        raise _fail(path, f"header claims a {' x '.join(str(int(v)) for v in shape)} image ({need / 2**30:.1f} GiB) "
                    f"but the file holds {have / 2**20:.1f} MiB", "the file is truncated or its header is wrong; re-export it")


def _load_nifti(path: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(path)
        shape, dtype = img.header.get_data_shape(), img.header.get_data_dtype()
    except Exception as e:  # nibabel raises many types for corrupt or foreign files
        raise _fail(path, f"not a readable NIfTI file ({_first_line(e)})",
                    "check the file is a complete NIfTI image (re-export or re-download it)") from None
    _check_claimed_size(path, shape, dtype.itemsize, compressed=path.lower().endswith(".gz"))
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise _fail(path, f"not a readable NIfTI file ({_first_line(e)})",
                    "check the file is a complete NIfTI image (re-export or re-download it)") from None
    aff = np.asarray(img.affine, dtype=np.float64)
    return data, aff


def _load_itk(path: str) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        with _quiet_itk():
            reader = sitk.ImageFileReader()
            reader.SetFileName(path)
            reader.ReadImageInformation()
    except RuntimeError as e:
        raise _fail(path, f"not a readable image file ({_last_line(e)})",
                    "check the file is a complete NRRD/MHA image (re-export it)") from None
    if not path.lower().endswith((".nhdr", ".mhd")):  # detached data lies in another file
        bits = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
        itemsize = int(bits.group(1)) // 8 if bits else 1
        _check_claimed_size(path, reader.GetSize(), itemsize * reader.GetNumberOfComponents(), compressed=True)
    try:
        with _quiet_itk():
            img = reader.Execute()
    except (RuntimeError, MemoryError) as e:
        raise _fail(path, f"not a readable image file ({_last_line(e)})",
                    "check the file is a complete NRRD/MHA image (re-export it)") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise _fail(path, "image has several components per pixel (RGB/vector), not CT HU",
                    "give a single-channel CT volume")
    if img.GetDimension() < 3:
        raise _fail(path, "a 2D image, not a 3D volume", "give a 3D CT volume")
    if img.GetDimension() > 3:
        if any(sz != 1 for sz in img.GetSize()[3:]):
            raise _fail(path, "a 4D image with several volumes", "give a single 3D CT volume")
        img = img[:, :, :, 0]
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    d = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = d * np.asarray(img.GetSpacing())[None, :]
    aff[:3, 3] = img.GetOrigin()
    return np.asarray(arr), LPS_TO_RAS @ aff


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1][:100] if lines else type(e).__name__


def _check_volume(path, data: np.ndarray, check_hu: bool) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 5 and data.shape[3:] == (1, 1):
        data = data[..., 0, 0]
    if data.ndim == 2 or (data.ndim == 3 and min(data.shape) == 1):
        raise _fail(path, f"a single 2D slice of shape {tuple(data.shape)}, not a 3D volume",
                    "give the whole CT volume")
    if data.ndim != 3:
        raise _fail(path, f"array of shape {tuple(data.shape)} is not one 3D volume", "give a single 3D CT volume")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise _fail(path, f"voxel type {data.dtype} is not a real number", "give a CT volume in HU")
    vol = data.astype(np.float32, copy=False)
    if check_hu:
        lo, hi = float(vol.min()), float(vol.max())
        if not np.isfinite(lo) or not np.isfinite(hi):
            raise _fail(path, "volume contains NaN or infinite values", "clean the volume before loading")
        if lo > -500 or hi - lo < 200:
            raise _fail(path, f"values {lo:g}..{hi:g} do not look like CT in HU (no air below -500 HU)",
                        "give a CT in Hounsfield units (apply rescale slope/intercept; a normalised or 8-bit image cannot be used)")
    return vol


def _kind(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "dicom_dir"
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(_ITK_SUFFIXES):
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
        raise _fail(path, "does not exist", "check the path")
    _check_readable(path)
    kind = _kind(path)
    meta: dict = {"load_warnings": []}
    if kind in ("dicom_dir", "zip", "file"):
        with tempfile.TemporaryDirectory(prefix="ctvq_dicom_") as tmp:
            folder = path
            if kind == "zip":
                try:
                    with zipfile.ZipFile(path) as zf:
                        zf.extractall(tmp)
                except (zipfile.BadZipFile, OSError, EOFError) as e:
                    raise _fail(path, f"not a readable .zip archive ({e})", "re-create the archive") from None
                folder = Path(tmp)
            elif kind == "file":
                hdr = _read_dicom_header(str(path), force=True)
                if hdr is None:
                    raise _fail(path, "unknown file type (not NIfTI/NRRD/MHA by name and not DICOM by header)",
                                "give a .nii/.nii.gz, .nrrd, .mha, a DICOM folder or a .zip of a DICOM series")
                # A single DICOM file: load the series it belongs to from its folder.
                groups = {k: v for k, v in _scan_dicom(path.parent).items() if k == hdr.series_uid}
                if hdr.series_uid == "":
                    groups = {"": [h for h in groups.get("", []) if h.size[:2] == hdr.size[:2]]}
                headers, left = _choose_series(path, groups, None)
                headers = [h for h in headers if h.iop is not None and hdr.iop is not None
                           and np.allclose(h.iop, hdr.iop, atol=1e-3)] or [hdr]
                data, aff, meta = _read_dicom_stack(path, headers)
            if kind != "file":
                groups = _scan_dicom(folder)
                headers, left = _choose_series(path, groups, series_uid)
                data, aff, meta = _read_dicom_stack(path, headers)
                meta["dicom_series_uid"] = headers[0].series_uid
                meta["dicom_series_found"] = len(groups)
            others = {h.series_uid for hs in groups.values() for h in hs if h.modality == "CT" and not _is_localizer(h)}
            others.discard(headers[0].series_uid)
            if others and series_uid is None:
                meta["load_warnings"].append(f"{len(others)} other CT series in it were not loaded (the one with most "
                                             "slices was); put each series in its own folder to use them all")
            if left:
                meta["load_warnings"].append(
                    f"{left} slice(s) of series {headers[0].series_uid or '(no UID)'} have another size, spacing or "
                    "orientation and were left out")
    elif kind == "nifti":
        data, aff = _load_nifti(str(path))
    else:
        data, aff = _load_itk(str(path))
    vol = _check_volume(path, data, check_hu and not label)
    if label:
        ids = np.rint(vol)
        if np.abs(vol - ids).max() > 1e-3 or ids.min() < 0:
            raise _fail(path, "label map holds non-integer or negative values", "give an integer label map")
        vol = ids.astype(np.int16 if ids.max() < 32768 else np.int32)
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise _fail(path, "has a degenerate or missing affine (zero voxel size)", "fix the header geometry")
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

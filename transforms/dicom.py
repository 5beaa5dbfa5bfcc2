"""Reading DICOM: series found by their headers, the CT volume series chosen, slices stacked in world space.

Gantry-tilted or unevenly spaced stacks are resampled onto a regular grid, each slice placed by its
ImagePositionPatient.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .image_files import ITK_SUFFIXES, LPS_TO_RAS, NIFTI_SUFFIXES, quiet_itk
from .load_errors import CTLoadError, check_readable, fail

__all__ = ["find_dicom_series", "dicom_volume_series", "load_dicom", "MAX_SLICE_GAP"]

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

#: slices wider apart than this many typical spacings (and 10 mm) are refused instead of interpolated
MAX_SLICE_GAP = 3.0


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
        with quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError:
        if magic:
            raise fail(path, "DICOM file with an unreadable header (truncated or corrupt)",
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
            check_readable(Path(p))
            hdr = _read_dicom_header(p)
            if hdr is None and not name.lower().endswith(NIFTI_SUFFIXES + ITK_SUFFIXES + (".zip", ".json", ".txt")):
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
        case_json = Path(path) / "case.json"
        if case_json.is_file():  # a folder written by ./run.sh preprocess
            try:
                source = json.loads(case_json.read_text()).get("source")
            except (OSError, ValueError, AttributeError):
                source = None
            raise fail(path, "a processed case folder (case.json), not a scan",
                       f"pass the scan it was made from{f' ({source})' if source else ''}")
        raise fail(path, "no DICOM image files found (empty folder or no readable DICOM headers)",
                   "point to a folder, .zip or file holding a CT DICOM series")
    if series_uid is not None:
        if series_uid not in groups:
            raise fail(path, f"no DICOM series with SeriesInstanceUID {series_uid!r} "
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
            raise fail(path, "the DICOM series is a localizer/scout image, not a CT volume",
                       "give the axial CT series instead")
        raise fail(path, f"DICOM modality {'/'.join(modalities)} is not CT",
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
        raise fail(path, "a single 2D DICOM slice, not a 3D volume",
                   "give the whole CT series (folder or .zip with all slices)")
    for h in headers:
        if h.ipp is None or h.iop is None:
            raise fail(h.path, "DICOM slice without ImagePositionPatient/ImageOrientationPatient",
                       "export the series with full geometry headers")
        if len(h.size) > 2 and h.size[2] > 1:
            raise fail(h.path, "multi-frame DICOM is not supported",
                       "convert it to single-frame DICOM or NIfTI first")
    headers = _sort_slices(headers)
    iop = headers[0].iop
    r, c = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    n = _normal(iop)
    pos = np.stack([h.ipp for h in headers])  # (K, 3) LPS
    s = pos @ n
    gaps = np.diff(s)
    if np.any(gaps < 1e-3):
        raise fail(path, "DICOM series has several slices at the same position (mixed acquisitions?)",
                   "split the series so each position appears once")
    typical = float(np.median(gaps))
    wide = np.flatnonzero(gaps > 1.5 * typical)
    warnings = []
    if len(wide):
        worst = float(gaps.max())
        if worst > MAX_SLICE_GAP * typical + 1e-3 and worst > 10.0:
            raise fail(path, f"a gap of {worst:.1f} mm between slices (typical spacing {typical:.2f} mm, about "
                       f"{round(worst / typical) - 1} slices missing)", "give the complete series "
                       f"(gaps up to {MAX_SLICE_GAP:g} spacings or 10 mm are interpolated with a warning)")
        missing = int(sum(round(g / typical) - 1 for g in gaps[wide]))
        warnings.append(f"{len(wide)} gap(s) between slices up to {worst:.1f} mm (typical {typical:.2f} mm: about "
                        f"{missing} slice(s) missing, or unevenly spaced slices) were interpolated")
    dx, dy = float(headers[0].spacing[0]), float(headers[0].spacing[1])
    files = [h.path for h in headers]
    with quiet_itk():
        try:
            img = sitk.ReadImage(files, sitk.sitkFloat32)
        except RuntimeError as e:
            raise fail(path, f"cannot decode the DICOM pixel data ({str(e).strip().splitlines()[-1][:120]})",
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


def load_dicom(path: Path, zipped: bool, series_uid: str | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The CT volume series of a DICOM folder, a .zip of one, or the folder of a single DICOM file.

    Returns:
        (X, Y, Z) float32 HU, its RAS affine, and meta: ``dicom_*`` facts and ``load_warnings``
        (other CT series left out, interpolated gaps).
    """
    single_file = not zipped and path.is_file()
    with tempfile.TemporaryDirectory(prefix="ctvq_dicom_") as tmp:
        folder = path
        if zipped:
            try:
                with zipfile.ZipFile(path) as zf:
                    zf.extractall(tmp)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise fail(path, f"not a readable .zip archive ({e})", "re-create the archive") from None
            folder = Path(tmp)
        elif single_file:
            hdr = _read_dicom_header(str(path), force=True)
            if hdr is None:
                raise fail(path, "unknown file type (not NIfTI/NRRD/MHA by name and not DICOM by header)",
                           "give a .nii/.nii.gz, .nrrd, .mha, a DICOM folder or a .zip of a DICOM series")
            # A single DICOM file: load the series it belongs to from its folder.
            groups = {k: v for k, v in _scan_dicom(path.parent).items() if k == hdr.series_uid}
            if hdr.series_uid == "":
                groups = {"": [h for h in groups.get("", []) if h.size[:2] == hdr.size[:2]]}
            headers, left = _choose_series(path, groups, None)
            headers = [h for h in headers if h.iop is not None and hdr.iop is not None
                       and np.allclose(h.iop, hdr.iop, atol=1e-3)] or [hdr]
            data, aff, meta = _read_dicom_stack(path, headers)
        if not single_file:
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
    return data, aff, meta

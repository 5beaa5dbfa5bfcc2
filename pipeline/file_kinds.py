"""What a raw file is, from its name or its first bytes: a volume file, a label map's name, a DICOM
file, a zip of DICOM files; and a volume's size from its header."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

__all__ = ["VOLUME_EXTENSIONS", "DICOM_EXTENSIONS", "SKIP_EXTENSIONS", "split_ext", "is_volume_file", "is_label_name",
           "is_dicom_file", "is_dicom_zip", "header_size"]

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
SKIP_EXTENSIONS = (
    ".raw", ".zraw", ".json", ".txt", ".md", ".csv", ".tsv", ".pdf", ".png", ".jpg", ".jpeg",
    ".xml", ".html", ".py", ".sh", ".yaml", ".yml", ".npy", ".npz", ".pkl", ".gz", ".tar",
    ".bz2", ".7z", ".xz",
)
_LABEL_RE = re.compile(
    r"(^|[_\-.])(seg|segmentation|segmentations|label|labels|labelmap|mask|masks|gt)([_\-.]|$)"
)


def split_ext(name: str) -> tuple[str, str]:
    """Split a file name into stem and (possibly double) extension: ``a.nii.gz -> (a, .nii.gz)``.

    Args:
        name: file name.
    """
    low = name.lower()
    for ext in VOLUME_EXTENSIONS + (".zip",) + DICOM_EXTENSIONS:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    stem, ext = os.path.splitext(name)
    return stem, ext


def is_volume_file(path: str | os.PathLike) -> bool:
    """True for file names with a volume extension (.nii, .nii.gz, .nrrd, .mha, .mhd).

    Args:
        path: file path.
    """
    return str(path).lower().endswith(VOLUME_EXTENSIONS)


def is_label_name(path: str | os.PathLike) -> bool:
    """True when a file name holds a label word (seg, label, mask, gt...) between ``_``/``-``/``.``.

    Args:
        path: file path.
    """
    return bool(_LABEL_RE.search(split_ext(Path(path).name)[0].lower()))


_VRS = {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB",
    b"OD", b"OF", b"OL", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"TM", b"UI", b"UL",
    b"UN", b"US", b"UT", b"UC", b"UR", b"OV", b"SV", b"UV",
}


def _looks_like_dicom(head: bytes) -> bool:
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    # Files without the 128-byte preamble start directly with a group 0x0008 (or 0x0002) tag.
    if len(head) >= 8 and head[0:2] in (b"\x08\x00", b"\x02\x00") and head[3:4] == b"\x00":
        if head[4:6] in _VRS:  # explicit VR
            return True
        length = int.from_bytes(head[4:8], "little")  # implicit VR: a small element length
        return head[2] < 0x40 and 0 < length < 1024
    return False


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file's header is DICOM (``DICM`` at byte 128, or a preamble-less start).

    Args:
        path: file path (the name and extension are not used).
    """
    try:
        with open(path, "rb") as f:
            return _looks_like_dicom(f.read(132))
    except OSError:
        return False


def is_dicom_zip(path: str | os.PathLike, max_members: int = 8) -> bool:
    """True when a zip holds DICOM files (the first ``max_members`` files are checked).

    Raises:
        zipfile.BadZipFile: when the file is not a readable zip.

    Args:
        path: zip file.
        max_members: how many member files to test.
    """
    with zipfile.ZipFile(path) as zf:
        checked = 0
        for info in zf.infolist():
            if info.is_dir() or Path(info.filename).name.startswith("."):
                continue
            with zf.open(info) as f:
                if _looks_like_dicom(f.read(132)):
                    return True
            checked += 1
            if checked >= max_members:
                break
    return False


def header_size(path: Path) -> tuple[int, ...] | None:
    """Image size from the file header only (None when unreadable)."""
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return tuple(int(s) for s in reader.GetSize())
    except Exception:
        return None

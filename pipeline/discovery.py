"""Find CT datasets and cases (image + optional label map) under a raw data folder.

Rules (also shown by ``python -m pipeline.preprocess --help``):

Datasets
    Each first-level folder of ``RAW_DIR`` is a dataset named after the folder. Volume files,
    zips and DICOM files lying directly in ``RAW_DIR`` form one more dataset named after
    ``RAW_DIR`` itself. Hidden entries (``.name``) are ignored.

Cases (searched recursively inside a dataset, down to ``max_depth`` folder levels below
``RAW_DIR``; the dataset folder is level 1)
    * a volume file: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``;
    * a DICOM folder: a folder holding at least one DICOM file, recognised by its header
      (``DICM`` magic or a DICOM group-0008 start), whatever the file names; a folder holding
      several CT volume series gives one case per SeriesInstanceUID;
    * a ``.zip`` holding DICOM files;
    * an empty folder (no files, no sub-folders) is reported as a failed case, so that a
      missing download shows up in ``metadata.csv``.

Label maps (never cases themselves)
    * nnU-Net / MSD: ``imagesTr/<id>_0000.nii.gz`` pairs with ``labelsTr/<id>.nii.gz``
      (any ``images<X>``/``labels<X>`` sibling pair; the ``_NNNN`` channel suffix is optional);
    * a volume file whose name holds a label word (``seg``, ``segmentation``, ``label``,
      ``labels``, ``labelmap``, ``mask``, ``masks``, ``gt``) delimited by the name's start/end or
      ``_``/``-``/``.`` (``seg_total.nii.gz``, ``example_seg.nii.gz``, ``case1_label.nrrd``;
      not ``segment_ct.nii``) is a label map, paired with an image of its own folder
      (volume files and zips there, DICOM series in the folder itself or directly below it):
      volumes whose header size equals the label's are kept (if there are none: the DICOM
      series and zips, whose size is not read); if one candidate is left it is the pair; if
      several are left, the one whose name stem equals the
      label's stem without the label word (``case1_seg`` -> ``case1``, also ignoring a
      ``_ct``/``_img``/``_image`` suffix of the image and of the label: ``case1_ct_seg``) wins; otherwise the label stays
      unpaired and is listed in :attr:`Dataset.unpaired_labels`.

Everything else
    Each file or folder that is neither a case nor a label map is listed in
    :attr:`Dataset.ignored` with the reason (a zip without DICOM, a file that is not CT, a non-CT
    DICOM series, a folder deeper than ``max_depth``, a symlink loop or a link to a folder already
    searched: each real folder is searched once). Files beside DICOM slices belong to their folder.

Case ids
    The path relative to the dataset folder without the file extension, folders joined by
    ``__`` and characters outside ``[A-Za-z0-9._-]`` replaced by ``_`` (a leading
    ``imagesTr/`` folder and a ``_0000`` channel suffix are dropped). Ids that would
    collide get ``-<8 hex of sha1(relative path)>`` appended. A DICOM folder or zip at the
    dataset root uses the dataset name. Cases of one multi-series DICOM folder hash the path and the
    SeriesInstanceUID.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.file_kinds import (
    DICOM_EXTENSIONS,
    SKIP_EXTENSIONS,
    header_size,
    is_dicom_file,
    is_dicom_zip,
    is_label_name,
    is_volume_file,
    split_ext,
)

__all__ = ["Case", "Dataset", "discover", "discover_dataset", "sanitize_id"]

_IMAGE_SUFFIX_RE = re.compile(r"([_\-](ct|img|image|volume|vol))+$")
_CHANNEL_RE = re.compile(r"_\d{4}$")
_SAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Case:
    """One CT volume to preprocess.

    Args:
        dataset: dataset name.
        case_id: stable, filesystem-safe id, unique within the dataset.
        source: volume file, DICOM folder or zip.
        kind: ``"volume"``, ``"dicom_dir"``, ``"dicom_zip"`` or ``"empty_dir"``.
        rel_path: source path relative to the dataset folder (posix).
        label: paired label map, or None.
        error: set when discovery already knows the case cannot be processed.
        series_uid: the SeriesInstanceUID to load when a DICOM folder holds several CT series.
    """

    dataset: str
    case_id: str
    source: Path
    kind: str
    rel_path: str
    label: Path | None = None
    error: str | None = None
    series_uid: str | None = None


@dataclass
class Dataset:
    """A dataset: a first-level folder of the raw data (or the raw folder's loose files).

    Args:
        name: dataset name (output folder name).
        root: folder that case paths are relative to.
        cases: cases found, sorted by case id.
        unpaired_labels: label-like files that could not be paired with one image.
        ignored: one note per file or folder that is neither a case nor a label map, with the reason
            (too deep, not a CT file, a zip without DICOM, a non-CT DICOM series, a folder reached twice).
    """

    name: str
    root: Path
    cases: list[Case] = field(default_factory=list)
    unpaired_labels: list[Path] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- case ids


def sanitize_id(parts: Sequence[str]) -> str:
    """Filesystem-safe id from path parts (joined by ``__``).

    Args:
        parts: path components (extension already removed from the last one).
    """
    clean = [_SAFE_RE.sub("_", p).strip("._") or "_" for p in parts if p not in ("", ".")]
    out = "__".join(clean) or "case"
    return out[:120]


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def _assign_ids(cases: list[Case], dataset_name: str) -> None:
    raw_ids = []
    for case in cases:
        parts = list(Path(case.rel_path).parts) if case.rel_path not in ("", ".") else []
        if parts and case.kind in ("volume", "dicom_zip"):
            parts[-1] = split_ext(parts[-1])[0]
        if len(parts) > 1 and parts[0] == "imagesTr":
            parts = parts[1:]
        if parts and Path(case.rel_path).parent.name.startswith("images"):
            parts[-1] = _CHANNEL_RE.sub("", parts[-1])
        raw_ids.append(sanitize_id(parts) if parts else sanitize_id([dataset_name]))
    counts = Counter(raw_ids)
    for case, rid in zip(cases, raw_ids):
        key = case.rel_path + (f"#{case.series_uid}" if case.series_uid else "")
        case.case_id = rid if counts[rid] == 1 else f"{rid}-{_short_hash(key)}"


# ----------------------------------------------------------------------------- walking


@dataclass
class _Folder:
    path: Path
    files: list[Path]
    subdirs: list[Path]


def _walk(root: Path, depth0: int, max_depth: int | None, exclude: set[Path], ignored: list[str],
          notes_deeper: bool = True, seen: set[Path] | None = None) -> Iterable[tuple[_Folder, int]]:
    """Folders below ``root`` (depth first); each real folder is visited once, however many
    symlinks lead to it, and a symlink loop or an unreadable entry becomes a note in ``ignored``.

    ``seen`` (shared between datasets) holds the real folders already searched."""
    stack = [(root, depth0)]
    seen = set() if seen is None else seen
    while stack:
        folder, depth = stack.pop()
        try:
            real = folder.resolve(strict=True)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except (OSError, RuntimeError) as e:
            ignored.append(f"{folder}: cannot be read ({getattr(e, 'strerror', None) or e}); fix the link or its permissions")
            continue
        if real in seen:
            ignored.append(f"{folder}: a link to {real}, which is already searched")
            continue
        seen.add(real)
        files, subdirs = [], []
        for e in entries:
            if e.name.startswith("."):
                continue
            p = Path(e.path)
            try:
                is_dir, is_file = e.is_dir(), e.is_file()
            except OSError as err:  # a symlink loop (ELOOP) or a dangling link
                ignored.append(f"{p}: cannot be read ({err.strerror}); fix or remove the link")
                continue
            if is_dir:
                if p.resolve() in exclude:
                    continue
                subdirs.append(p)
            elif is_file:
                files.append(p)
            else:
                ignored.append(f"{p}: not a file or folder (a dangling link?); fix or remove it")
        yield _Folder(folder, files, subdirs), depth
        for sub in reversed(subdirs):
            if max_depth is not None and depth + 1 > max_depth:
                if notes_deeper:
                    ignored.append(f"{sub}: deeper than --max-depth {max_depth}")
                continue
            stack.append((sub, depth + 1))


def _why_not_ct(path: Path) -> str:
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied); fix its permissions"
    low = path.name.lower()
    if low.endswith((".raw", ".zraw")):
        return "data file of a .mhd/.nhdr header (read with it)"
    return "not a CT file (not NIfTI/NRRD/MHA by name, not DICOM by header)"


def _dicom_cases(name: str, folder: Path, rel_path: str, ignored: list[str]) -> list[Case]:
    """One case per CT volume series of a DICOM folder; its other series become notes in ``ignored``.

    A folder without any CT volume series stays one case, so that the loader's refusal (MR,
    localizer only, unreadable) becomes its failed row.
    """
    from transforms.dicom import dicom_volume_series

    uids, notes = dicom_volume_series(folder)
    ignored.extend(f"{folder}: {n}" for n in notes)
    if len(uids) <= 1:
        return [Case(name, "", folder, "dicom_dir", rel_path)]
    return [Case(name, "", folder, "dicom_dir", rel_path, series_uid=uid) for uid in uids]


def _image_stem(path: Path) -> str:
    stem = split_ext(path.name)[0] if path.is_file() else path.name
    stem = _CHANNEL_RE.sub("", stem)
    return _IMAGE_SUFFIX_RE.sub("", stem.lower())


def _label_stem(path: Path) -> str:
    stem = split_ext(path.name)[0].lower()
    stem = re.sub(r"^(seg|segmentation|label|labels|mask)([_\-.]|$)", "", stem)
    stem = re.sub(r"[_\-.](seg|segmentation|segmentations|label|labels|labelmap|mask|masks|gt)([_\-.].*)?$", "", stem)
    return _IMAGE_SUFFIX_RE.sub("", stem)  # case1_ct_label names the image case1_ct, as case1_label does


def _pair_label(label: Path, candidates: list[Case], header_size=header_size) -> Case | None:
    cands = [c for c in candidates if c.label is None]
    if not cands:
        return None
    lsize = header_size(label)
    if lsize is not None:
        sizes = [(header_size(c.source) if c.kind == "volume" else None) for c in cands]
        same = [c for c, sz in zip(cands, sizes) if sz == lsize]
        cands = same or [c for c, sz in zip(cands, sizes) if sz is None]
    if len(cands) == 1:
        return cands[0]
    stem = _label_stem(label)
    named = [c for c in cands if _image_stem(c.source) == stem]
    return named[0] if len(named) == 1 else None


def discover_dataset(
    name: str,
    root: Path,
    depth0: int = 1,
    max_depth: int | None = None,
    exclude: Iterable[Path] = (),
    loose_only: bool = False,
    seen: set[Path] | None = None,
) -> Dataset:
    """Find the cases of one dataset folder (see the module docstring for the rules).

    Args:
        name: dataset name.
        root: dataset folder.
        depth0: folder level of ``root`` below the raw folder (for ``max_depth``).
        max_depth: deepest folder level searched (None: no limit).
        exclude: folders to skip (e.g. the output folder when it lies inside the raw one).
        loose_only: only look at files directly in ``root`` (the raw folder's own files).
        seen: real folders already searched (shared by the datasets of one raw folder); a link to
            one of them is noted in ``ignored`` instead of being searched again.
    """
    root = Path(root)
    ds = Dataset(name=name, root=root)
    exclude_set = {Path(p).resolve() for p in exclude}
    images: list[Case] = []
    labels: list[tuple[Path, Path]] = []  # (label file, folder)
    nnunet: dict[Path, dict[str, Path]] = {}  # images folder -> {stem: label}

    def rel(p: Path) -> str:
        r = p.relative_to(root).as_posix()
        return r if r else "."

    walker = _walk(root, depth0, depth0 if loose_only else max_depth, exclude_set, ds.ignored,
                   notes_deeper=not loose_only, seen=seen)
    for folder, _depth in walker:
        fname = folder.path.name
        if not folder.files and not folder.subdirs and not loose_only:
            images.append(Case(name, "", folder.path, "empty_dir", rel(folder.path),
                               error=f"empty folder {folder.path}: no CT volume in it (remove the folder or add the scan)"))
            continue
        # nnU-Net labels folder: its files are labels of the sibling images folder.
        img_dir = folder.path.parent / ("images" + fname[6:])
        if fname.startswith("labels") and img_dir.is_dir():
            nnunet[img_dir] = {_CHANNEL_RE.sub("", split_ext(f.name)[0]): f for f in folder.files if is_volume_file(f)}
            continue
        has_dicom = False
        others: list[Path] = []
        for f in folder.files:
            low = f.name.lower()
            if is_volume_file(f):
                if is_label_name(f) and not fname.startswith("images"):
                    labels.append((f, folder.path))
                else:
                    images.append(Case(name, "", f, "volume", rel(f)))
            elif low.endswith(".zip"):
                try:
                    ok = is_dicom_zip(f)
                except (zipfile.BadZipFile, OSError) as e:
                    images.append(Case(name, "", f, "dicom_zip", rel(f),
                                       error=f"{f}: not a readable zip ({e}); re-download or remove it"))
                    continue
                if ok:
                    images.append(Case(name, "", f, "dicom_zip", rel(f)))
                else:
                    ds.ignored.append(f"{f}: a zip without DICOM files (unzip volume files into the folder to use them)")
            elif low.endswith(DICOM_EXTENSIONS) or not low.endswith(SKIP_EXTENSIONS):
                if has_dicom or is_dicom_file(f):
                    has_dicom = True
                else:
                    others.append(f)
            else:
                others.append(f)
        if has_dicom:
            images.extend(_dicom_cases(name, folder.path, rel(folder.path), ds.ignored))
        else:
            ds.ignored.extend(f"{f}: {_why_not_ct(f)}" for f in others)

    # nnU-Net pairing by name.
    for img_dir, stems in nnunet.items():
        for case in images:
            if case.kind == "volume" and case.source.parent == img_dir:
                key = _CHANNEL_RE.sub("", split_ext(case.source.name)[0])
                if key in stems:
                    case.label = stems.pop(key)
        ds.unpaired_labels.extend(sorted(stems.values()))

    # Label maps beside images (each image header is read once, however many labels share its folder).
    cached_size = functools.cache(header_size)
    for label, folder in labels:
        cands = [c for c in images if c.error is None and (
            (c.kind in ("volume", "dicom_zip") and c.source.parent == folder)
            or (c.kind == "dicom_dir" and (c.source == folder or c.source.parent == folder)))]
        match = _pair_label(label, cands, cached_size)
        if match is None:
            ds.unpaired_labels.append(label)
        else:
            match.label = label

    _assign_ids(images, name)
    ds.cases = sorted(images, key=lambda c: c.case_id)
    return ds


def discover(raw_dir: str | os.PathLike, max_depth: int | None = None, exclude: Iterable[Path] = ()) -> list[Dataset]:
    """Find all datasets and cases under ``raw_dir``.

    Args:
        raw_dir: folder of raw CT collections (each first-level folder is a dataset).
        max_depth: deepest folder level searched, ``raw_dir`` being level 0 (None: no limit).
        exclude: folders to skip (e.g. the output folder).

    Returns:
        datasets sorted by name; a dataset folder without any case is kept when it holds files
        that were skipped (listed in ``ignored``), the raw folder's own files only when one is a case.

    Raises:
        FileNotFoundError: when ``raw_dir`` is not a folder.
    """
    raw = Path(raw_dir)
    if not raw.is_dir():
        raise FileNotFoundError(f"raw data folder {raw} does not exist or is not a folder; pass the folder of your CT collections")
    exclude = [Path(p) for p in exclude]
    exclude_set = {p.resolve() for p in exclude}
    datasets: list[Dataset] = []
    names: set[str] = set()
    seen: set[Path] = set()
    if max_depth is None or max_depth >= 1:
        for entry in sorted(raw.iterdir()):
            try:
                if entry.name.startswith(".") or not entry.is_dir() or entry.resolve() in exclude_set:
                    continue
            except (OSError, RuntimeError):  # a symlink loop or dangling link at the top: noted by the loose scan
                continue
            ds = discover_dataset(entry.name, entry, 1, max_depth, exclude, seen=seen)
            datasets.append(ds)
            names.add(ds.name)
    loose_name = raw.resolve().name or "raw"
    if loose_name in names:
        loose_name += "_root"
    loose = discover_dataset(loose_name, raw, 0, 0, exclude, loose_only=True)
    if loose.cases or loose.unpaired_labels:  # the raw folder's own notes (README, licenses) alone make no dataset
        datasets.append(loose)
    return sorted([d for d in datasets if d.cases or d.unpaired_labels or d.ignored], key=lambda d: d.name)

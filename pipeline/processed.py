"""The processed-case layouts and the rule of which cases are usable, read by training,
evaluation, check-data and the benchmarks.

Two layouts of ``OUT_DIR/<dataset>/processed/<case_id>/`` (``case.json`` says which)::

    compact (default)   hu.chunks          int16 HU, clipped to [hu_min, hu_max], cropped to the body box
                        body_mask.chunks   bool, same crop
                        labels.chunks      label ids, same crop (when a label map exists)
    guide               ct_normalized_512.npy, windows/<name>_w<W>_l<L>.npy (float16), body_mask_512.npy,
                        labels_512.npy     (the older guide's files, whole R^3 cube)

plus ``case.json`` (geometry; for compact, ``crop``: offset and shape of the box in the cube)
and ``.complete`` (written last: files and sizes). A compact case is air (hu_min), outside the
body and label 0 beyond its crop. Windows of a compact case are computed when read, by
``transforms.apply_window``; both layouts hold the same integer HU, so their supports (body
mask & window > 0) are equal and their window values differ only by the guide's float16.

A case is usable when its ``metadata.csv`` row says ``ok``, its ``.complete`` marker is valid
(every file it lists is there with its size; a compact case needs one, a guide case written
without such a manifest, as the older guide's tools did, is taken on its files) and, for the
guide layout, the window's file exists.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io_utils import load_json, load_npy
from transforms import HU_MAX, HU_MIN, WINDOW_PRESETS, WindowSpec, apply_window, parse_window

__all__ = [
    "LAYOUTS",
    "MARKER",
    "CASE_JSON",
    "METADATA_CSV",
    "DATASET_CONFIG",
    "GUIDE_FILES",
    "COMPACT_FILES",
    "find_datasets",
    "resolve_window",
    "marker_is_valid",
    "DatasetCases",
    "usable_cases",
    "ProcessedCase",
    "layout_files",
    "load_case",
    "case_geometry",
]

LAYOUTS = ("compact", "guide")
MARKER = ".complete"
CASE_JSON = "case.json"
METADATA_CSV = "metadata.csv"
DATASET_CONFIG = "dataset_config.json"
GUIDE_FILES = {"ct_normalized": "ct_normalized_512.npy", "body_mask": "body_mask_512.npy", "labels": "labels_512.npy"}
COMPACT_FILES = {"hu": "hu.chunks", "body_mask": "body_mask.chunks", "labels": "labels.chunks"}
# case.json and metadata.csv name the cube's affine and spacing with the guide's "_512" at any
# resolution; earlier case.json files may hold the same values under "_cube" names too.
CUBE_AFFINE_KEYS = ("affine_512", "affine_cube")

Box = Sequence[Sequence[int]]


def layout_files(layout: str) -> dict[str, str]:
    """Array files of a case folder in ``layout``, besides the guide layout's windows
    (``windows/<name>_w<W>_l<L>.npy``), ``case.json`` and ``.complete``.

    Raises:
        ValueError: an unknown layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r} unknown; use one of {', '.join(LAYOUTS)}")
    return dict(COMPACT_FILES if layout == "compact" else GUIDE_FILES)


def _roots(data_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(data_dir, (str, os.PathLike)):
        parts = [p.strip() for p in os.fspath(data_dir).split(",") if p.strip()]
    else:
        parts = [os.fspath(p) for p in data_dir]
    return [Path(p).expanduser() for p in parts]


def find_datasets(data_dir: str | os.PathLike | Sequence[str]) -> list[Path]:
    """Processed dataset folders (``metadata.csv`` + ``dataset_config.json``) under one or more
    roots, searched recursively.

    Args:
        data_dir: a folder, a comma-separated list of folders, or a list of folders.
    """
    found: list[Path] = []
    for root in _roots(data_dir):
        if not root.is_dir():
            raise FileNotFoundError(f"data_dir '{root}' is not a folder; pass the output folder of ./run.sh preprocess")
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if METADATA_CSV in filenames and DATASET_CONFIG in filenames:
                found.append(Path(dirpath))
                dirnames[:] = [d for d in dirnames if d != "processed"]
    return sorted(set(found))


def resolve_window(dataset_config: dict, window: str | WindowSpec) -> tuple[WindowSpec, str]:
    """The window spec of ``window`` in one dataset and its guide-layout file (relative).

    Args:
        dataset_config: content of dataset_config.json.
        window: a preset, a custom window listed in the config, or a WindowSpec / "name:W:L".

    Raises:
        KeyError: neither a preset nor listed in the config.
    """
    listed = dataset_config.get("windows") or {}
    name = window.name if isinstance(window, WindowSpec) else str(window)
    if name in listed:
        spec = parse_window({**listed[name], "name": name})
        return spec, listed[name].get("file") or f"windows/{spec.filename}"
    try:
        spec = parse_window(window)
    except ValueError:
        raise KeyError(
            f"window_type '{name}' is neither a preset ({', '.join(WINDOW_PRESETS)}) nor listed in "
            f"dataset_config.json windows ({', '.join(listed) or 'none'}); give it as NAME:WIDTH:LEVEL (e.g. "
            f"'{name}:150:60'; a compact dataset computes any window), preprocess with it, or pick another"
        ) from None
    return spec, f"windows/{spec.filename}"


def marker_is_valid(case_dir: str | os.PathLike, key: str | None = None) -> bool:
    """True when ``case_dir/.complete`` parses, matches ``key`` and every file it lists exists
    with the recorded size.

    Args:
        case_dir: processed case folder.
        key: expected ``pipeline.preprocess.case_key`` (None: do not compare).
    """
    case_dir = Path(case_dir)
    try:
        marker = load_json(case_dir / MARKER)
        if key is not None and marker.get("key") != key:
            return False
        files = marker["files"]
        if not files:
            return False
        return all((case_dir / rel).stat().st_size == int(size) for rel, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


@dataclass
class DatasetCases:
    """The cases of one dataset for one window: usable ones and why the others are not.

    ``cases``: [{"key", "dataset", "case_id", "dir"}]; ``failed``: [{"case", "error"}] (failed in
    metadata.csv); ``missing``: [{"case", "file"}] (incomplete or without the window's file).
    """

    dataset: Path
    config: dict
    window: WindowSpec
    window_file: str
    cases: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    missing: list[dict] = field(default_factory=list)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _lists_files(case_dir: Path) -> bool:
    """The case's marker is a manifest of its files (older guide markers are not)."""
    try:
        return isinstance(load_json(case_dir / MARKER).get("files"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def usable_cases(dataset_dir: str | os.PathLike, window: str | WindowSpec) -> DatasetCases:
    """Applies the usable-case rule (module docstring) to one dataset folder.

    Raises:
        KeyError: the window is unknown to the dataset (see :func:`resolve_window`).
    """
    ds = Path(dataset_dir)
    cfg = load_json(ds / DATASET_CONFIG)
    spec, rel = resolve_window(cfg, window)
    out = DatasetCases(ds, cfg, spec, rel)
    for row in _read_csv(ds / METADATA_CSV):
        cid = str(row.get("case_id", "")).strip()
        key = f"{ds.name}/{cid}"
        if str(row.get("status", "ok")).strip().lower() != "ok":
            out.failed.append({"case": key, "error": row.get("error", "")})
            continue
        case_dir = ds / "processed" / cid
        compact = (case_dir / COMPACT_FILES["hu"]).is_file()
        if (compact or _lists_files(case_dir)) and not marker_is_valid(case_dir):
            out.missing.append({"case": key, "file": str(case_dir / MARKER)})
        elif not compact and not (case_dir / rel).is_file():
            out.missing.append({"case": key, "file": str(case_dir / rel)})
        else:
            out.cases.append({"key": key, "dataset": ds.name, "case_id": cid, "dir": case_dir})
    return out


def _slices(box: Box | None) -> tuple[slice, ...]:
    return (slice(None),) * 3 if box is None else tuple(slice(int(a), int(b)) for a, b in box)


class ProcessedCase:
    """One processed case folder of either layout, read by region.

    Boxes are ((i0, i1), (j0, j1), (k0, k1)) in the cube's voxels, half-open; None is the
    whole cube. Only the region is read (memory maps for the guide layout, the chunks it
    touches for the compact one).

    Args:
        case_dir: the case folder.
        hu_min: HU of air (the compact layout's value beyond its crop) when case.json has none.
        hu_max: upper HU of the clip (for the guide layout's normalised volume) when case.json has none.
    """

    def __init__(self, case_dir: str | os.PathLike, hu_min: float = HU_MIN, hu_max: float = HU_MAX):
        self.dir = Path(case_dir)
        try:
            self.info: dict[str, Any] = load_json(self.dir / CASE_JSON)
        except (OSError, ValueError):
            self.info = {}
        compact = (self.dir / COMPACT_FILES["hu"]).is_file()
        self.layout = self.info.get("layout") or ("compact" if compact else "guide")
        self.hu_min = float(self.info.get("hu_min", hu_min))
        self.hu_max = float(self.info.get("hu_max", hu_max))
        self._arrays: dict[str, Any] = {}
        if self.layout == "compact":
            crop = self.info.get("crop") or {}
            self.offset = np.asarray(crop.get("offset", [0, 0, 0]), dtype=np.int64)
        self.resolution = int(self.info.get("resolution") or self._guess_resolution())

    def _guess_resolution(self) -> int:
        for rel in (GUIDE_FILES["body_mask"], GUIDE_FILES["ct_normalized"]):
            if (self.dir / rel).is_file():
                return int(load_npy(self.dir / rel, mmap_mode="r").shape[0])
        windows = sorted((self.dir / "windows").glob("*.npy"))
        if windows:
            return int(load_npy(windows[0], mmap_mode="r").shape[0])
        raise FileNotFoundError(f"{self.dir}: no case.json and no array to read the cube size from; rerun ./run.sh preprocess")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.resolution,) * 3

    def _array(self, name: str):
        """The stored array ``name`` (``hu``, ``body_mask``, ``labels``, a guide file), None when absent."""
        if name not in self._arrays:
            if self.layout == "compact":
                from pipeline.chunked import ChunkedArray

                path = self.dir / COMPACT_FILES[name]
                self._arrays[name] = ChunkedArray(path) if path.is_file() else None
            else:
                path = self.dir / GUIDE_FILES.get(name, name)
                self._arrays[name] = load_npy(path, mmap_mode="r") if path.is_file() else None
        return self._arrays[name]

    def _compact_read(self, name: str, box: Box | None, fill) -> np.ndarray | None:
        arr = self._array(name)
        if arr is None:
            return None
        box = [(0, self.resolution)] * 3 if box is None else box
        local = [(int(a) - o, int(b) - o) for (a, b), o in zip(box, self.offset)]
        return arr.read(local, fill=fill)

    def hu(self, box: Box | None = None) -> np.ndarray:
        """Integer HU (int16 for compact; float32 from the normalised volume for guide)."""
        if self.layout == "compact":
            return self._compact_read("hu", box, fill=self.hu_min)
        ct = self._array("ct_normalized")
        if ct is None:
            raise FileNotFoundError(f"{self.dir / GUIDE_FILES['ct_normalized']} missing; rerun ./run.sh preprocess for this case")
        x = np.asarray(ct[_slices(box)], dtype=np.float32)
        return np.rint(x * (self.hu_max - self.hu_min) + self.hu_min)

    def window(self, window: WindowSpec, box: Box | None = None, window_file: str | None = None) -> np.ndarray:
        """Window values in [0, 1] (float32) of ``box``: computed by ``transforms.apply_window``
        (compact) or read from ``window_file`` (guide; default ``windows/<stem>.npy``)."""
        if self.layout == "compact":
            return apply_window(self.hu(box), window.width, window.level)
        arr = self._array(window_file or f"windows/{window.filename}")
        if arr is None:
            raise FileNotFoundError(f"{self.dir / (window_file or 'windows/' + window.filename)} missing; "
                                    "preprocess with that window or use the compact layout")
        return np.asarray(arr[_slices(box)], dtype=np.float32)

    def body_mask(self, box: Box | None = None) -> np.ndarray | None:
        """The body mask of ``box`` (bool), None when a guide case has none."""
        if self.layout == "compact":
            return self._compact_read("body_mask", box, fill=False)
        arr = self._array("body_mask")
        return None if arr is None else np.asarray(arr[_slices(box)], dtype=bool)

    def labels(self, box: Box | None = None) -> np.ndarray | None:
        """Label ids of ``box``, None when the case has no label map."""
        if self.layout == "compact":
            return self._compact_read("labels", box, fill=0)
        arr = self._array("labels")
        return None if arr is None else np.asarray(arr[_slices(box)])

    def content_box(self, align: int = 1) -> list[tuple[int, int]]:
        """The box outside which the case is air, mask and labels 0 (compact: its crop; guide: the
        cube), widened to multiples of ``align``."""
        if self.layout != "compact":
            return [(0, self.resolution)] * 3
        shape = (self.info.get("crop") or {}).get("shape", [self.resolution] * 3)
        return [(int(o) // align * align, min(self.resolution, -(-(int(o) + int(n)) // align) * align))
                for o, n in zip(self.offset, shape)]

    def stamp(self) -> float:
        """Modification time of the case's data (for caches derived from it)."""
        for rel in (MARKER, COMPACT_FILES["hu"], CASE_JSON):
            if (self.dir / rel).exists():
                return (self.dir / rel).stat().st_mtime
        return 0.0


def load_case(case: dict) -> dict:
    """The whole cube of one usable case: ``{"window", "mask", "labels", "info"}`` (window values,
    the body mask (all True when a guide case has none), labels or None, case.json).

    Args:
        case: an entry of ``pipeline.evaluate.find_cases``: ``dir``, ``window`` (WindowSpec) and
            ``window_file`` (the guide layout's file of that window).
    """
    pc = ProcessedCase(case["dir"])
    win = pc.window(case["window"], window_file=case["window_file"])
    mask = pc.body_mask()
    return {"window": win, "mask": np.ones(win.shape, bool) if mask is None else mask, "labels": pc.labels(),
            "info": pc.info}


def case_geometry(info: dict) -> dict:
    """The geometry in ``case.json`` as ``Tokenizer.encode_arrays`` takes it: ``cube_affine``,
    ``source_affine`` / ``source_shape``, ``original_affine`` / ``original_shape`` and ``source``
    (each only when recorded)."""
    g: dict[str, Any] = {}
    cube = next((info[k] for k in CUBE_AFFINE_KEYS if info.get(k) is not None), None)
    if cube is not None:
        g["cube_affine"] = np.asarray(cube, np.float64)
    for key in ("source_affine", "original_affine"):
        if info.get(key) is not None:
            g[key] = np.asarray(info[key], np.float64)
    for key in ("source_shape", "original_shape"):
        if info.get(key) is not None:
            g[key] = info[key]
    if info.get("source"):
        g["source"] = str(info["source"])
    return g

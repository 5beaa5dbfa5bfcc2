"""Raw CT collections -> processed cube datasets (``./run.sh preprocess``).

For every case found by :mod:`pipeline.discovery` the job loads the scan (``transforms.LoadCT``),
orients it to RAS, resamples it into an isotropic R^3 cube (``transforms.ResampleToCube``,
air padding), and writes, each file atomically and as soon as it is computed::

    OUT_DIR/<dataset>/metadata.csv, dataset_config.json
    OUT_DIR/<dataset>/processed/<case_id>/
        ct_normalized_512.npy     float16 (R,R,R): (HU - hu_min) / (hu_max - hu_min)
        windows/<name>_w<W>_l<L>.npy   float16 (R,R,R) in [0, 1]
        body_mask_512.npy         bool (R,R,R)
        labels_512.npy            uint8/int16 (R,R,R), nearest in world space (when a label map exists)
        case.json                 geometry, body bbox, timings, the metadata row
        .complete                 written last; a rerun skips a case only when it is valid

The ``_512`` file names are kept for any ``--resolution R`` (R is recorded in the JSON files).
Arrays keep the memory order the resampler produced (C or Fortran; the ``.npy`` header says
which): ``np.load`` returns the same logical (i, j, k) array either way, and no 512^3
transposing copy is paid.

Run ``python -m pipeline.preprocess --help`` for the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import signal
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline import discovery
from pipeline.discovery import Case, Dataset
from pipeline.io_utils import (
    FolderLock,
    load_json,
    remove_stale_tmp,
    rmtree_quiet,
    save_csv,
    save_json,
    save_npy,
    save_text,
)
from transforms import HU_MAX, HU_MIN, WINDOW_PRESETS, WindowSpec, parse_window

__all__ = [
    "HU_MIN",
    "HU_MAX",
    "FORMAT_VERSION",
    "METADATA_COLUMNS",
    "PreprocessConfig",
    "output_files",
    "parse_windows",
    "load_organ_mapping",
    "marker_is_valid",
    "process_case",
    "run",
    "main",
]

FORMAT_VERSION = 1
MARKER = ".complete"
CASE_JSON = "case.json"
METADATA_COLUMNS = [
    "case_id", "status", "error", "source_path", "rel_path", "source_kind", "label_path",
    "original_shape", "original_spacing", "spacing_512", "spacing_cube", "resolution",
    "body_voxels", "label_ids", "label_coverage", "warning", "seconds",
]
DEFAULT_WINDOWS = tuple(WINDOW_PRESETS)  # lung, bone, soft_tissue, brain
_SLAB_VOXELS = 1 << 20  # voxels per slab when computing windows (4 MiB of float32: stays in cache)
_WRITER_THREADS = int(os.environ.get("CTVQ_WRITER_THREADS", "2"))  # background file writers per worker


# ---------------------------------------------------------------------------------------- config


def _window_config(w: WindowSpec) -> dict:
    return {"width": float(w.width), "level": float(w.level), "file": f"windows/{w.filename}"}


def _parse_window(text: str) -> WindowSpec:
    try:
        return parse_window(text.strip())
    except ValueError as e:
        raise ValueError(f"{e} (e.g. --windows lung,bone or 'liver:150:60')") from None


def parse_windows(specs: Sequence[str] | str | None) -> list[WindowSpec]:
    """Parse window specs: preset names or ``name:WIDTH:LEVEL``, comma- or space-separated.

    Args:
        specs: list of specs (each may hold several, comma-separated); None -> the four presets.

    Raises:
        ValueError: an unknown preset, a malformed spec, or two windows with the same name.
    """
    if specs is None:
        specs = list(DEFAULT_WINDOWS)
    if isinstance(specs, str):
        specs = [specs]
    out: list[WindowSpec] = []
    for spec in specs:
        for item in str(spec).split(","):
            if item.strip():
                out.append(_parse_window(item))
    names = [w.name for w in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"window name(s) {dup} given twice; give each window a distinct name")
    if not out:
        raise ValueError("no window given; pass e.g. --windows lung,bone or 'liver:150:60'")
    return out


def load_organ_mapping(path: str | os.PathLike | None) -> tuple[dict | None, list[WindowSpec]]:
    """Read ORGAN_MAPPING_JSON.

    Accepted forms: ``{"1": "spleen", "5": "liver", ...}``, or
    ``{"labels": {"1": "spleen", ...}, "windows": [...]}`` where ``windows`` is a list of
    ``"name:W:L"`` strings or a ``{name: {"width": W, "level": L}}`` / ``{name: [W, L]}`` mapping
    (these windows are computed in addition to ``--windows``). Label entries may also be
    objects (e.g. ``{"name": "liver", "window": [150, 60]}``); they are copied as they are.

    Args:
        path: JSON file, or None.

    Returns:
        (organ mapping with string keys, or None; extra windows).

    Raises:
        ValueError: unreadable file or keys that are not label ids.
    """
    if path is None:
        return None, []
    path = Path(path)
    try:
        data = load_json(path)
    except FileNotFoundError:
        raise ValueError(f"organ mapping {path} not found; pass an existing JSON file or leave it out") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"organ mapping {path} is not valid JSON ({e}); fix the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"organ mapping {path} must be a JSON object {{\"label id\": \"organ name\"}}")
    windows: list[WindowSpec] = []
    mapping = data
    for key in ("labels", "organ_mapping", "organs"):
        if isinstance(data.get(key), dict):
            mapping = data[key]
            break
    raw_windows = data.get("windows") if mapping is not data else None
    if raw_windows is not None:
        if isinstance(raw_windows, dict):
            for name, v in raw_windows.items():
                w, l = (v["width"], v["level"]) if isinstance(v, dict) else v
                windows.append(_parse_window(f"{name}:{w}:{l}"))
        elif isinstance(raw_windows, list):
            windows.extend(_parse_window(str(v)) for v in raw_windows)
        else:
            raise ValueError(f"organ mapping {path}: 'windows' must be a list of 'name:W:L' or an object")
    out = {}
    for k, v in mapping.items():
        try:
            int(str(k))
        except ValueError:
            raise ValueError(f"organ mapping {path}: key {k!r} is not an integer label id; "
                             "use {\"1\": \"spleen\", ...} or put the mapping under \"labels\"") from None
        out[str(int(str(k)))] = v
    return out, windows


@dataclass
class PreprocessConfig:
    """Settings shared by every case of a run.

    Args:
        resolution: cube side R (voxels).
        windows: windows to write.
        hu_min: HU mapped to 0 by the normalisation (and the clip floor).
        hu_max: HU mapped to 1 by the normalisation (and the clip ceiling).
        organ_mapping: label id -> organ name (copied to dataset_config.json).
        overwrite: reprocess cases even when complete.
    """

    resolution: int = 512
    windows: list[WindowSpec] = field(default_factory=lambda: parse_windows(None))
    hu_min: float = HU_MIN
    hu_max: float = HU_MAX
    organ_mapping: dict | None = None
    overwrite: bool = False

    def key_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "resolution": int(self.resolution),
            "hu": [float(self.hu_min), float(self.hu_max)],
            "windows": [[w.name, float(w.width), float(w.level)] for w in self.windows],
        }


def output_files(resolution: int = 512) -> dict[str, str]:
    """File names inside a case folder.

    The names keep the ``_512`` of the original layout whatever the resolution (the arrays are
    (R, R, R); R is ``resolution`` in dataset_config.json and case.json), so readers need one
    set of names.

    Args:
        resolution: cube side R (not part of the names).
    """
    return {
        "ct_normalized": "ct_normalized_512.npy",
        "body_mask": "body_mask_512.npy",
        "labels": "labels_512.npy",
        "case_json": CASE_JSON,
        "marker": MARKER,
    }


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("ctvq", "monai", "torch", "numpy", "SimpleITK", "nibabel", "scipy"):
        with contextlib.suppress(Exception):
            out[pkg] = md.version(pkg)
    return out


def dataset_config(cfg: PreprocessConfig, ds: Dataset) -> dict:
    """Content of ``dataset_config.json`` for one dataset.

    Args:
        cfg: run settings.
        ds: the dataset.
    """
    return {
        "name": ds.name,
        "resolution": int(cfg.resolution),
        "hu_min": float(cfg.hu_min),
        "hu_max": float(cfg.hu_max),
        "normalization": "(HU - hu_min) / (hu_max - hu_min), HU clipped to [hu_min, hu_max]",
        "window_formula": "clip((HU - (level - width / 2)) / width, 0, 1)",
        "windows": {w.name: _window_config(w) for w in cfg.windows},
        "files": output_files(cfg.resolution),
        "dtypes": {"ct_normalized": "float16", "windows": "float16", "body_mask": "bool", "labels": "uint8|int16"},
        "organ_mapping": cfg.organ_mapping,
        "raw_dir": str(ds.root.resolve()),
        "unpaired_labels": [str(p) for p in ds.unpaired_labels],
        "ignored": list(ds.ignored),
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
    }


# ---------------------------------------------------------------------------------------- marker


def _fingerprint(path: Path | None) -> Any:
    """Cheap identity of a source (sizes and mtimes) so that a changed input is reprocessed."""
    if path is None:
        return None
    try:
        if path.is_dir():
            h = hashlib.sha1()
            for root, _dirs, files in os.walk(path):
                for name in sorted(files):
                    st = os.stat(os.path.join(root, name))
                    h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns};".encode())
            return h.hexdigest()
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return None


def case_key(cfg: PreprocessConfig, case: Case) -> str:
    """Hash of everything a case's outputs depend on (settings, source and label identity).

    Args:
        cfg: run settings.
        case: the case.
    """
    blob = {
        **cfg.key_dict(),
        "source": str(case.source.resolve()),
        "source_fp": _fingerprint(case.source),
        "label": str(case.label.resolve()) if case.label else None,
        "label_fp": _fingerprint(case.label),
    }
    return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def marker_is_valid(case_dir: str | os.PathLike, key: str | None = None) -> bool:
    """True when ``case_dir/.complete`` exists, parses, matches ``key`` and every file it lists
    exists with the recorded size.

    Args:
        case_dir: processed case folder.
        key: expected :func:`case_key` (None: do not compare).
    """
    case_dir = Path(case_dir)
    try:
        marker = load_json(case_dir / MARKER)
        if key is not None and marker.get("key") != key:
            return False
        files = marker["files"]
        if not files:
            return False
        for rel, size in files.items():
            if (case_dir / rel).stat().st_size != int(size):
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------- worker


class _Timer:
    """Wall-clock (``t``) and process CPU (``cpu``, all threads) seconds per named stage."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.numpy()
    return np.asarray(x)


def _affine(x) -> np.ndarray:
    return np.asarray(_to_numpy(x), dtype=np.float64).reshape(4, 4)


def _spacing(aff: np.ndarray) -> list[float]:
    return [float(v) for v in np.sqrt((aff[:3, :3] ** 2).sum(axis=0))]


class _BackgroundWriter:
    """Saves arrays with :func:`save_npy` on background threads (``CTVQ_WRITER_THREADS``, 2).

    ``save`` returns at once; ``wait_for(owner)`` blocks until the last file written from
    ``owner``'s memory is done (before that buffer is refilled); ``wait_all`` re-raises the
    first write error. Time spent blocked is added to the timer's "write" stage, the writer
    thread's own time to "write_bg".
    """

    def __init__(self, timer: "_Timer"):
        from concurrent.futures import ThreadPoolExecutor

        self.timer = timer
        self.pool = ThreadPoolExecutor(max_workers=_WRITER_THREADS, thread_name_prefix="ctvq-writer")
        self.futures: list = []
        self.by_owner: dict[int, Any] = {}
        import threading

        self.lock = threading.Lock()

    def _save(self, path: Path, array: np.ndarray) -> None:
        t0 = time.perf_counter()
        save_npy(path, array)
        with self.lock:
            self.timer.t["write_bg"] = self.timer.t.get("write_bg", 0.0) + time.perf_counter() - t0

    def save(self, path: Path, array: np.ndarray, owner: Any = None) -> None:
        fut = self.pool.submit(self._save, Path(path), array)
        self.futures.append(fut)
        if owner is not None:
            self.by_owner[id(owner)] = fut

    def wait_for(self, owner: Any) -> None:
        fut = self.by_owner.pop(id(owner), None)
        if fut is not None:
            with self.timer("write"):
                fut.result()

    def wait_all(self) -> None:
        with self.timer("write"):
            for fut in self.futures:
                fut.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)  # never leave a thread writing into a folder being removed


def _affine_clip_into(hu: torch.Tensor, out: torch.Tensor, hu_min: float, hu_max: float, low: float,
                      width: float) -> None:
    """out[...] = clip((clip(hu, hu_min, hu_max) - low) / width, 0, 1), stored as out.dtype.

    The formula of ``transforms.apply_window`` (window: low = L - W/2) and
    ``transforms.normalize_hu`` (low = hu_min, width = hu_max - hu_min) on HU clipped like
    ``transforms.ClipHU``, fused in place over slabs of a few slices taken along the slowest
    memory axis (``hu`` and ``out`` share one memory layout, C or Fortran): the float32
    temporary stays in cache and the float16 store uses torch's vectorised conversion.
    """
    ax = int(np.argmax(hu.stride()))
    n = hu.shape[ax]
    step = max(1, _SLAB_VOXELS // max(1, hu.numel() // n))
    tmp = torch.empty_like(hu.narrow(ax, 0, min(step, n)), dtype=torch.float32)
    inv = 1.0 / float(width)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory-bound: one thread is as fast, and immune to OpenMP stalls on a busy CPU
    try:
        for s in range(0, n, step):
            k = min(step, n - s)
            t = tmp.narrow(ax, 0, k)
            torch.clamp(hu.narrow(ax, s, k), hu_min, hu_max, out=t).sub_(low).mul_(inv).clamp_(0.0, 1.0)
            out.narrow(ax, s, k).copy_(t)
    finally:
        torch.set_num_threads(threads)


def _labels_to_cube(path: Path, cube_affine: np.ndarray, resolution: int) -> np.ndarray:
    """Label map -> (R, R, R) uint8/int16 on the cube grid: nearest neighbour in world space
    (``transforms.ResampleToCube`` with the image's cube affine), 0 outside the label map."""
    from monai.data import MetaTensor
    from transforms import ResampleToCube, load_ct

    img = load_ct(path, check_hu=False)
    arr = _to_numpy(img)[0]
    if not np.array_equal(arr, np.round(arr)):
        raise ValueError(f"label map {path} holds non-integer values; give an integer label map (organ ids)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 32767:
        raise ValueError(f"label map {path} has ids {lo:g}..{hi:g} outside 0..32767; relabel it")
    lab = MetaTensor(torch.from_numpy(arr.astype(np.uint8 if hi < 256 else np.int16))[None], affine=img.affine)
    del img, arr
    out = ResampleToCube(resolution=resolution, mode="nearest", padding_value=0)(lab, cube_affine=cube_affine)
    return _to_numpy(out)[0]


def _count_and_bbox(mask: np.ndarray) -> tuple[int, list[list[int]] | None]:
    """Voxel count and half-open [[i0, i1], [j0, j1], [k0, k1]] box of a mask (as
    ``transforms.body_bbox``), from two strided reductions (no reshaped copies)."""
    ax = int(np.argmax(mask.strides))  # reduce over the slowest axis first: one pass, in memory order
    proj = mask.any(axis=ax)
    count = int(np.count_nonzero(mask))
    if not count:
        return 0, None
    other = [a for a in range(3) if a != ax]
    box: dict[int, list[int]] = {}
    for pos, a in enumerate(other):
        nz = np.flatnonzero(proj.any(axis=1 - pos))
        box[a] = [int(nz[0]), int(nz[-1]) + 1]
    nz = np.flatnonzero(mask.any(axis=tuple(other)))
    box[ax] = [int(nz[0]), int(nz[-1]) + 1]
    return count, [box[0], box[1], box[2]]


def _label_ids(lab: np.ndarray) -> list[int]:
    """Non-zero ids present in a label volume (histogram over slabs along the slowest memory
    axis: no full-size int64 temporary, no sort)."""
    ax = int(np.argmax(lab.strides))
    step = max(1, _SLAB_VOXELS // max(1, lab.size // lab.shape[ax]))
    counts = np.zeros(1, dtype=np.int64)
    for s in range(0, lab.shape[ax], step):
        slab = lab[(slice(None),) * ax + (slice(s, s + step),)]  # a view, contiguous in memory
        c = np.bincount(slab.ravel(order="K"))
        if len(c) > len(counts):
            c[: len(counts)] += counts
            counts = c
        else:
            counts[: len(c)] += c
    return [int(v) for v in np.flatnonzero(counts) if v != 0]


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text[:500]


def _resample_to_cube(img, resolution: int, hu_min: float):
    """``transforms.ResampleToCube`` -> (cube MetaTensor (1,R,R,R), cube affine)."""
    from transforms import ResampleToCube

    cube = ResampleToCube(resolution=resolution, padding_value=hu_min)(img)
    meta = getattr(cube, "meta", {}) or {}
    aff = meta.get("cube_affine", getattr(cube, "affine", None))
    return cube, _affine(aff)


def _body_mask(cube) -> np.ndarray:
    from transforms import body_mask

    mask = body_mask(cube).numpy()  # bool tensor shaped like the cube (1, R, R, R)
    return mask.reshape(mask.shape[-3:])


def process_case(task: dict) -> dict:
    """Preprocess one case (runs in a worker process). Never raises for a bad input.

    Args:
        task: dict with ``case`` (:class:`~pipeline.discovery.Case`), ``cfg``
            (:class:`PreprocessConfig`), ``case_dir``, ``key``, ``raw_root``.

    Returns:
        ``{"row": metadata row, "timings": {...}}``; row["status"] is "ok" or "failed".
    """
    case: Case = task["case"]
    cfg: PreprocessConfig = task["cfg"]
    case_dir = Path(task["case_dir"])
    R = int(cfg.resolution)
    files = output_files(R)
    timer = _Timer()
    t_start, c_start = time.perf_counter(), time.process_time()
    row: dict[str, Any] = {
        "case_id": case.case_id,
        "status": "failed",
        "error": "",
        "source_path": str(case.source.resolve()),
        "rel_path": case.rel_path,
        "source_kind": case.kind,
        "label_path": str(case.label.resolve()) if case.label else "",
        "resolution": R,
    }
    try:
        rmtree_quiet(case_dir)  # never mix files of two runs
        if case.error:
            raise ValueError(case.error)
        from monai.transforms import Orientation
        from transforms import load_ct
        from transforms.io import check_label_overlap

        with timer("load"):
            img = load_ct(case.source, series_uid=case.series_uid)
        meta = img.meta
        warnings = list(meta.get("load_warnings", []))
        original_affine = _affine(meta.get("original_affine", img.affine))
        original_shape = [int(v) for v in meta.get("original_shape", img.shape[1:])]
        row["original_shape"] = json.dumps(original_shape)
        row["original_spacing"] = json.dumps([round(v, 6) for v in _spacing(original_affine)])
        with timer("orient"):
            img = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(img)
        source_affine = _affine(img.affine)
        source_shape = [int(v) for v in img.shape[1:]]
        if case.label is not None:
            cover, more = check_label_overlap(case.label, source_affine, source_shape)
            row["label_coverage"], warnings = (round(cover, 4) if cover is not None else ""), warnings + more
        row["warning"] = "; ".join(warnings)
        with timer("resample"):
            cube, cube_affine = _resample_to_cube(img, R, cfg.hu_min)
        del img
        hu = cube.as_tensor().reshape(R, R, R) if hasattr(cube, "as_tensor") else cube.reshape(R, R, R)
        if hu.dtype != torch.float32:
            hu = hu.float()
        spacing_cube = _spacing(cube_affine)
        case_dir.mkdir(parents=True, exist_ok=True)
        written: list[str] = []

        # Outputs keep the cube's memory order (C or Fortran, as the resampler returns it): a
        # transposing copy of a 512^3 volume costs about 2 s of CPU. np.save records the order
        # in the .npy header and np.load returns the same logical (i, j, k) array either way.
        # Files are written by a background thread while the next output is computed (two
        # float16 buffers take turns), so the write overlaps the compute.
        writer = _BackgroundWriter(timer)
        try:
            bufs = [torch.empty_like(hu, dtype=torch.float16) for _ in range(2 if cfg.windows else 1)]
            jobs = [("normalize", files["ct_normalized"], cfg.hu_min, cfg.hu_max - cfg.hu_min)]
            jobs += [("windows", f"windows/{w.filename}", w.low, w.width) for w in cfg.windows]
            for n, (stage, rel, low, width) in enumerate(jobs):
                buf = bufs[n % len(bufs)]
                writer.wait_for(buf)  # the buffer's previous content is on disk
                with timer(stage):
                    _affine_clip_into(hu, buf, cfg.hu_min, cfg.hu_max, low, width)
                writer.save(case_dir / rel, buf.numpy(), owner=buf)
                written.append(rel)

            # the body mask is computed while the last windows are still being written
            with timer("body_mask"):
                mask = _body_mask(cube)
                if mask.shape != (R, R, R):
                    raise ValueError(f"BodyMask returned shape {mask.shape}, expected {(R, R, R)}")
            with timer("bbox"):
                body_voxels, bbox = _count_and_bbox(mask)
            writer.save(case_dir / files["body_mask"], mask)
            written.append(files["body_mask"])
            del cube, hu

            label_ids = None
            if case.label is not None:
                with timer("labels"):
                    lab_cube = _labels_to_cube(case.label, cube_affine, R)
                    label_ids = _label_ids(lab_cube)
                writer.save(case_dir / files["labels"], lab_cube)
                written.append(files["labels"])
            writer.wait_all()
        finally:
            writer.close()
        del bufs, mask
        spacing_text = json.dumps([round(v, 6) for v in spacing_cube])
        row.update({
            "status": "ok",
            "spacing_512": spacing_text,
            "spacing_cube": spacing_text,
            "body_voxels": body_voxels,
            "label_ids": json.dumps(label_ids) if label_ids is not None else "",
        })
        row["seconds"] = round(time.perf_counter() - t_start, 3)
        info = {
            "case_id": case.case_id,
            "dataset": case.dataset,
            "source": row["source_path"],
            "rel_path": case.rel_path,
            "source_kind": case.kind,
            "label_source": row["label_path"] or None,
            "resolution": R,
            "affine_512": cube_affine.tolist(),
            "affine_cube": cube_affine.tolist(),
            "spacing_512": spacing_cube,
            "spacing_cube": spacing_cube,
            "source_affine": source_affine.tolist(),
            "source_shape": source_shape,
            "original_affine": original_affine.tolist(),
            "original_shape": original_shape,
            "original_spacing": _spacing(original_affine),
            "hu_min": cfg.hu_min,
            "hu_max": cfg.hu_max,
            "windows": {w.name: _window_config(w) for w in cfg.windows},
            "files": {"ct_normalized": files["ct_normalized"], "body_mask": files["body_mask"],
                      "labels": files["labels"] if case.label is not None else None},
            "body_bbox": bbox,
            "body_voxels": body_voxels,
            "label_ids": label_ids,
            "loader_meta": {k: v for k, v in meta.items() if str(k).startswith("dicom_")},
            "timings": {k: round(v, 4) for k, v in timer.t.items()},
            "cpu_timings": {k: round(v, 4) for k, v in timer.cpu.items()},
            "metadata": row,
        }
        with timer("write"):
            save_json(case_dir / CASE_JSON, info)
        written.append(CASE_JSON)
        sizes = {rel: (case_dir / rel).stat().st_size for rel in written}
        save_json(case_dir / MARKER, {"key": task["key"], "files": sizes,
                                      "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except Exception as e:  # one bad case must not stop the run
        rmtree_quiet(case_dir)
        row.update({"status": "failed", "error": _one_line(e)})
        row["seconds"] = round(time.perf_counter() - t_start, 3)
        log_dir = task.get("log_dir")
        if log_dir:
            with contextlib.suppress(Exception):
                save_text(Path(log_dir) / f"{case.case_id}.log", traceback.format_exc())
    timings = {k: round(v, 4) for k, v in timer.t.items()}
    timings["total"] = round(time.perf_counter() - t_start, 4)
    cpu = {k: round(v, 4) for k, v in timer.cpu.items()}
    cpu["total"] = round(time.process_time() - c_start, 4)
    return {"row": row, "timings": timings, "cpu_timings": cpu, "dataset": case.dataset}


# ---------------------------------------------------------------------------------------- pool


def _worker_init(threads: int, parent_pid: int) -> None:
    """Worker start: die with the parent (Linux), keep BLAS/torch threads to a fair share."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a killed job leaves no orphan writer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides on Ctrl-C
    with contextlib.suppress(Exception):
        import torch

        torch.set_num_threads(max(1, threads))
    if os.getppid() != parent_pid:  # the parent died before PR_SET_PDEATHSIG was armed
        os._exit(1)


class _Lock:
    """Exclusive lock on OUT_DIR (released by the OS when the process dies; the file is removed on exit)."""

    def __init__(self, out_dir: Path):
        self.lock = FolderLock(out_dir, ".preprocess.lock", f"another preprocess run is writing into {out_dir}; "
                               "wait for it to finish or use another OUT_DIR")

    def __enter__(self):
        self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()
        return False


def _metadata_rows(rows: dict[str, dict]) -> list[dict]:
    return [rows[k] for k in sorted(rows)]


def run(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    organ_mapping: str | os.PathLike | None = None,
    num_workers: int = 1,
    resolution: int = 512,
    windows: Sequence[str] | None = None,
    max_depth: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
) -> dict:
    """Preprocess every case under ``raw_dir`` into ``out_dir`` (see module docstring).

    Args:
        raw_dir: raw data folder (first-level folders are datasets).
        out_dir: output folder (``processed_dataset``).
        organ_mapping: ORGAN_MAPPING_JSON path or None.
        num_workers: worker processes (0: run in this process, for debugging).
        resolution: cube side R.
        windows: window specs (None: the four presets).
        max_depth: deepest folder level searched below ``raw_dir``.
        overwrite: reprocess complete cases.
        progress: show a tqdm progress bar.
        log: function used for messages.

    Returns:
        summary ``{"ok", "failed", "skipped", "total", "datasets", "seconds", "failed_cases"}``.
    """
    t0 = time.perf_counter()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    mapping, extra_windows = load_organ_mapping(organ_mapping)
    wins = parse_windows(windows)
    names = {w.name for w in wins}
    for w in extra_windows:
        if w.name in names:
            raise ValueError(f"window {w.name!r} given both in --windows and in {organ_mapping}; keep one")
        wins.append(w)
    if resolution < 8 or resolution > 2048:
        raise ValueError(f"--resolution {resolution} out of range; use 8..2048 (default 512)")
    cfg = PreprocessConfig(resolution=int(resolution), windows=wins, organ_mapping=mapping, overwrite=overwrite)
    datasets = discovery.discover(raw_dir, max_depth=max_depth, exclude=[out_dir])
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"ok": 0, "failed": 0, "skipped": 0, "total": 0, "datasets": len(datasets), "failed_cases": []}
    if not datasets:
        log(f"preprocess: no CT cases found under {raw_dir} (volumes .nii/.nii.gz/.nrrd/.mha/.mhd, DICOM folders, DICOM .zip)")
    with _Lock(out_dir):
        rows: dict[str, dict[str, dict]] = {}
        tasks: list[dict] = []
        for ds in datasets:
            ds_dir = out_dir / ds.name
            (ds_dir / "processed").mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(ds_dir)  # leftovers of a killed run (we hold the lock)
            save_json(ds_dir / "dataset_config.json", dataset_config(cfg, ds))
            for p in ds.unpaired_labels:
                log(f"preprocess: warning: label map {p} was not paired with an image (see --help: label pairing)")
            if ds.ignored:
                log(f"preprocess: {ds.name}: {len(ds.ignored)} file(s) or folder(s) are not cases, e.g. {ds.ignored[0]} "
                    f"(all in {ds_dir / 'dataset_config.json'}, 'ignored')")
            rows[ds.name] = {}
            for case in ds.cases:
                case_dir = ds_dir / "processed" / case.case_id
                key = case_key(cfg, case)
                summary["total"] += 1
                if not overwrite and marker_is_valid(case_dir, key):
                    with contextlib.suppress(Exception):
                        row = load_json(case_dir / CASE_JSON)["metadata"]
                        rows[ds.name][case.case_id] = row
                        summary["skipped"] += 1
                        continue
                tasks.append({"case": case, "cfg": cfg, "case_dir": str(case_dir), "key": key,
                              "log_dir": str(ds_dir / "logs")})
        for ds in datasets:
            save_csv(out_dir / ds.name / "metadata.csv", _metadata_rows(rows[ds.name]), METADATA_COLUMNS)

        def record(result: dict) -> None:
            row = result["row"]
            rows[result["dataset"]][row["case_id"]] = row
            if row.get("warning"):
                (bar.write if bar is not None else log)(f"preprocess: warning: {result['dataset']}/{row['case_id']}: {row['warning']}")
            if row["status"] == "ok":
                summary["ok"] += 1
            else:
                summary["failed"] += 1
                summary["failed_cases"].append(f"{result['dataset']}/{row['case_id']}")
                msg = f"preprocess: FAILED {result['dataset']}/{row['case_id']}: {row['error']}"
                if bar is not None:
                    bar.write(msg, file=sys.stderr)
                else:
                    log(msg)
            save_csv(out_dir / result["dataset"] / "metadata.csv", _metadata_rows(rows[result["dataset"]]),
                     METADATA_COLUMNS)
            if bar is not None:
                bar.set_postfix(ok=summary["ok"], failed=summary["failed"], refresh=False)
                bar.update(1)

        bar = None
        if progress and tasks:
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread in a process that forks workers
            bar = tqdm(total=len(tasks), desc="preprocess", unit="case", file=sys.stderr, dynamic_ncols=True)
        try:
            if num_workers <= 0:
                for task in tasks:
                    record(process_case(task))
            else:
                _run_pool(tasks, num_workers, record)
        finally:
            if bar is not None:
                bar.close()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _run_pool(tasks: list[dict], num_workers: int, record) -> None:
    """Run tasks on ``num_workers`` processes, at most ``num_workers`` in flight; a worker
    that dies (crash, out of memory) fails only its case (each in-flight case is retried once)."""
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // num_workers)
    pending = list(reversed(tasks))
    attempts: dict[int, int] = {}
    # fork: workers reuse the modules this process already imported (torch, monai, transforms),
    # which saves seconds per worker. The CLI runs no torch work before forking; a library
    # caller that already ran torch (OpenMP pools do not survive fork) should pass
    # num_workers=0 (as pipeline.demo does) or run the CLI in a subprocess.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    while pending:
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(threads, os.getpid())) as ex:
            inflight = {}
            broken = False
            try:
                while (pending or inflight) and not broken:
                    while pending and len(inflight) < num_workers:
                        task = pending.pop()
                        inflight[ex.submit(process_case, task)] = task
                    done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                    for fut in done:
                        task = inflight.pop(fut)
                        try:
                            record(fut.result())
                        except BrokenProcessPool:
                            broken = True
                            _retry_or_fail(task, attempts, pending, record)
                if broken:
                    for fut, task in inflight.items():
                        _retry_or_fail(task, attempts, pending, record)
            except BaseException:
                for p in list(getattr(ex, "_processes", {}).values()):
                    with contextlib.suppress(Exception):
                        p.kill()
                ex.shutdown(wait=False, cancel_futures=True)
                raise


def _retry_or_fail(task: dict, attempts: dict, pending: list, record) -> None:
    n = attempts.get(id(task), 0) + 1
    attempts[id(task)] = n
    if n < 2:
        pending.append(task)
        return
    case: Case = task["case"]
    rmtree_quiet(task["case_dir"])
    record({"dataset": case.dataset, "timings": {}, "row": {
        "case_id": case.case_id, "status": "failed", "source_path": str(case.source.resolve()),
        "rel_path": case.rel_path, "source_kind": case.kind,
        "label_path": str(case.label.resolve()) if case.label else "",
        "error": "worker process died while processing this case (crash or out of memory); "
                 "rerun with fewer workers or check the file"}})


# ---------------------------------------------------------------------------------------- CLI


_EPILOG = """\
examples:
  ./run.sh preprocess raw_ct/ processed_dataset/
  ./run.sh preprocess raw_ct/ processed_dataset/ organ_mapping.json 4 --resolution 256
  ./run.sh preprocess raw_ct/ processed_dataset/ - 2 --windows lung,soft_tissue,liver:150:60

what is found (RAW_DIR):
  Each first-level folder of RAW_DIR is a dataset; loose files in RAW_DIR form a dataset named
  after RAW_DIR. Inside a dataset (recursively, down to --max-depth levels below RAW_DIR):
  volume files (.nii, .nii.gz, .nrrd, .mha, .mhd), DICOM folders (found by file headers, any
  file names), .zip files holding a DICOM series. An empty folder becomes a failed case.

label pairing:
  imagesTr/<id>_0000.nii.gz <-> labelsTr/<id>.nii.gz (nnU-Net/MSD). A volume whose name holds
  the word seg, segmentation, label(s), labelmap, mask(s) or gt (between start/end, '_', '-', '.':
  seg_total.nii.gz, case1_seg.nii.gz, ct_label.nrrd) is a label map; it pairs with the image of its folder
  (volumes and zips there, DICOM series in or directly below it): volumes of the label's header
  size are kept (none: the DICOM series/zips); one left -> paired; several -> the one whose name stem equals the label's
  stem without the label word (case1_seg -> case1[_ct]); otherwise a warning, no pairing.
  Labels are resampled (nearest) onto the cube in world space, so a flipped label grid is fine.

output (OUT_DIR/<dataset>/):
  metadata.csv (one row per case, status ok|failed and a one-line error), dataset_config.json,
  processed/<case_id>/{ct_normalized_512.npy, windows/<name>_w<W>_l<L>.npy, body_mask_512.npy,
  labels_512.npy, case.json, .complete}, logs/<case_id>.log (traceback of a failed case).
  Arrays are (R,R,R) for --resolution R; the "_512" file names stay the same for any R.
  Case ids come from the path relative to the dataset folder (folders joined by "__").

rerun / resume:
  Every file is written under a temporary name then renamed; .complete is written last and
  records the settings and the source's size/mtime. A rerun skips cases with a valid marker and
  redoes the rest (a changed source or setting makes the marker invalid). Safe to kill.

exit status: 0 all cases ok or skipped, 1 some case failed, 2 bad arguments."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m pipeline.preprocess``."""
    p = argparse.ArgumentParser(
        prog="./run.sh preprocess",
        description="Turn raw CT collections into processed cube datasets: RAS orientation, isotropic "
        "resampling into an R^3 cube (air padding), normalised HU, display windows, body mask and "
        "labels, as float16/bool .npy files, with parallel workers and resumable runs.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("raw_dir", metavar="RAW_DIR", help="folder of raw CT collections (each first-level folder is a dataset)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder, e.g. processed_dataset/")
    p.add_argument("organ_mapping", metavar="ORGAN_MAPPING_JSON", nargs="?", default=None,
                   help="optional JSON {\"label id\": \"organ name\"} (or {\"labels\": {...}, \"windows\": [\"name:W:L\"]}) "
                   "copied into dataset_config.json; '-' or 'none' for none. A bare integer here is taken as NUM_WORKERS")
    p.add_argument("num_workers", metavar="NUM_WORKERS", nargs="?", default=None,
                   help="worker processes (default: --workers; each needs about 1.5 GB at R=512; 0 = in-process)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="same as NUM_WORKERS (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=512, help="cube side R in voxels (default: %(default)s)")
    p.add_argument("--windows", nargs="+", default=None, metavar="WINDOW",
                   help="windows to write: preset names (lung bone soft_tissue brain) or custom 'name:WIDTH:LEVEL', "
                   "space- or comma-separated (default: the four presets: lung 1500/-600, bone 1500/300, "
                   "soft_tissue 400/50, brain 80/35)")
    p.add_argument("--max-depth", type=int, default=None,
                   help="deepest folder level searched, RAW_DIR = 0, dataset folders = 1 (default: no limit)")
    p.add_argument("--overwrite", action="store_true", help="reprocess cases that are already complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _resolve_positionals(args, parser) -> tuple[str | None, int]:
    mapping, workers = args.organ_mapping, args.num_workers
    if mapping is not None and workers is None and mapping.isdigit() and not Path(mapping).exists():
        mapping, workers = None, mapping
    if mapping is not None and mapping.strip().lower() in ("", "-", "none", "null"):
        mapping = None
    if workers is None:
        n = args.workers
    else:
        try:
            n = int(workers)
        except ValueError:
            parser.error(f"NUM_WORKERS must be an integer, got {workers!r}")
    if n < 0:
        parser.error(f"NUM_WORKERS must be >= 0, got {n}")
    return mapping, n


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry (see ``--help``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    mapping, workers = _resolve_positionals(args, parser)
    try:
        parse_windows(args.windows)
        load_organ_mapping(mapping)
    except ValueError as e:
        parser.error(str(e))
    if not Path(args.raw_dir).is_dir():
        parser.error(f"RAW_DIR {args.raw_dir} is not a folder; pass the folder of your raw CT collections")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        parser.error(f"OUT_DIR {args.out_dir} is a file; pass a folder for the processed datasets")

    def _term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    try:
        s = run(args.raw_dir, args.out_dir, mapping, workers, args.resolution, args.windows, args.max_depth,
                args.overwrite, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("preprocess: interrupted; rerun the same command to finish (complete cases are kept)", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    for name in s["failed_cases"][:20]:
        print(f"preprocess: failed: {name} (see metadata.csv)", file=sys.stderr)
    print(summary_line(s, args.out_dir))
    return 1 if s["failed"] else 0


def summary_line(s: dict, out_dir: str | os.PathLike) -> str:
    """The last line of a preprocessing run: cases ok / failed / skipped, time and where they went."""
    return (f"preprocess: {s['total']} cases in {s['datasets']} datasets: {s['ok']} ok, {s['failed']} failed, "
            f"{s['skipped']} skipped in {s['seconds']:.1f} s -> {out_dir}")


if __name__ == "__main__":
    sys.exit(main())

"""Raw CT collections -> processed cube datasets (``./run.sh preprocess``).

For every case found by :mod:`pipeline.discovery` the job loads the scan (``transforms.LoadCT``),
orients it to RAS, resamples it into an isotropic R^3 cube (``transforms.ResampleToCube``,
air padding), computes the body mask (``transforms.BodyMask``), rounds the HU clipped to
[hu_min, hu_max] to integers and writes, each file atomically, one case folder in the layout
asked for (``pipeline.processed`` owns both)::

    OUT_DIR/<dataset>/metadata.csv, dataset_config.json, logs/<case_id>.log
    OUT_DIR/<dataset>/processed/<case_id>/
        hu.chunks, body_mask.chunks, labels.chunks     --layout compact (default), cropped to the body
        ct_normalized_512.npy, windows/*.npy, body_mask_512.npy, labels_512.npy    --layout guide
        case.json                 geometry, body bbox, crop, timings, the metadata row
        .complete                 written last; a rerun skips a case only when it is valid

``--shard K/N`` processes every N-th case (:func:`shard_of`), so N commands (a SLURM array,
an indexed job, ssh loops) share one OUT_DIR: each holds its own lock file, and
``metadata.csv`` is rewritten under ``<dataset>/.metadata.lock`` with the rows of every shard.

Run ``python -m pipeline.preprocess --help`` for the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
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
from pipeline.chunked import save_chunked
from pipeline.io_utils import TMP_TAG, load_json, rmtree_quiet, save_csv, save_json, save_npy, save_text
from pipeline.processed import CASE_JSON, COMPACT_FILES, GUIDE_FILES, LAYOUTS, MARKER, marker_is_valid
from transforms import HU_MAX, HU_MIN, WINDOW_PRESETS, WindowSpec, apply_window, normalize_hu, parse_window

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

FORMAT_VERSION = 2
METADATA_COLUMNS = [
    "case_id", "status", "error", "source_path", "rel_path", "source_kind", "label_path",
    "original_shape", "original_spacing", "spacing_512", "spacing_cube", "resolution",
    "body_voxels", "label_ids", "label_coverage", "warning", "seconds",
]
DEFAULT_WINDOWS = tuple(WINDOW_PRESETS)  # lung, bone, soft_tissue, brain
_SLAB_VOXELS = 1 << 20  # voxels per slab when computing windows (4 MiB of float32: stays in cache)
_WRITER_THREADS = int(os.environ.get("CTVQ_WRITER_THREADS", "2"))  # background file writers per worker


# ---------------------------------------------------------------------------------------- config


def _window_config(w: WindowSpec, layout: str) -> dict:
    out = {"width": float(w.width), "level": float(w.level)}
    return {**out, "file": f"windows/{w.filename}"} if layout == "guide" else out


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
        layout: "compact" (int16 HU, mask and labels cropped to the body, compressed chunks) or
            "guide" (float16 normalised HU and windows, whole cube; see ``pipeline.processed``).
    """

    resolution: int = 512
    windows: list[WindowSpec] = field(default_factory=lambda: parse_windows(None))
    hu_min: float = HU_MIN
    hu_max: float = HU_MAX
    organ_mapping: dict | None = None
    overwrite: bool = False
    layout: str = "compact"

    def key_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "layout": self.layout,
            "resolution": int(self.resolution),
            "hu": [float(self.hu_min), float(self.hu_max)],
            "windows": [[w.name, float(w.width), float(w.level)] for w in self.windows],
        }


def output_files(layout: str = "compact") -> dict[str, str]:
    """Array files of a case folder in ``layout`` (``pipeline.processed``), besides the windows
    of the guide layout (``windows/<name>_w<W>_l<L>.npy``), ``case.json`` and ``.complete``.

    The guide's names keep their ``_512`` at any ``--resolution`` (R is in the JSON files).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r} unknown; use one of {', '.join(LAYOUTS)}")
    return dict(COMPACT_FILES if layout == "compact" else GUIDE_FILES)


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
        "layout": cfg.layout,
        "windows": {w.name: _window_config(w, cfg.layout) for w in cfg.windows},
        "files": output_files(cfg.layout),
        "dtypes": ({"hu": "int16", "body_mask": "bool", "labels": "uint8|int16"} if cfg.layout == "compact" else
                   {"ct_normalized": "float16", "windows": "float16", "body_mask": "bool", "labels": "uint8|int16"}),
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

    def _save(self, path: Path, array: np.ndarray, saver) -> None:
        t0 = time.perf_counter()
        saver(path, array)
        with self.lock:
            self.timer.t["write_bg"] = self.timer.t.get("write_bg", 0.0) + time.perf_counter() - t0

    def save(self, path: Path, array: np.ndarray, owner: Any = None, saver=save_npy) -> None:
        fut = self.pool.submit(self._save, Path(path), array, saver)
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


def _scale_into(hu: torch.Tensor, out: torch.Tensor, fn) -> None:
    """out[...] = fn(hu) stored as out.dtype, over slabs of a few slices taken along the slowest
    memory axis (``hu`` and ``out`` share one memory layout, C or Fortran): the float32
    temporary stays in cache. ``fn`` is ``transforms.apply_window`` or ``normalize_hu``."""
    ax = int(np.argmax(hu.stride()))
    n = hu.shape[ax]
    step = max(1, _SLAB_VOXELS // max(1, hu.numel() // n))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory-bound: one thread is as fast, and immune to OpenMP stalls on a busy CPU
    try:
        for s in range(0, n, step):
            k = min(step, n - s)
            out.narrow(ax, s, k).copy_(fn(hu.narrow(ax, s, k)))
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


def _save_int16_chunks(path: Path, hu: np.ndarray) -> int:
    return save_chunked(path, hu, dtype=np.int16)


def _write_guide_volumes(writer, timer, hu: torch.Tensor, mask: np.ndarray, cfg: PreprocessConfig,
                         case_dir: Path, written: list[str]) -> None:
    """The guide layout's float16 volumes (normalised HU, windows) and body mask; two float16
    buffers take turns between computing and the background writer."""
    bufs = [torch.empty_like(hu, dtype=torch.float16) for _ in range(2)]
    jobs = [("normalize", GUIDE_FILES["ct_normalized"], lambda x: normalize_hu(x, cfg.hu_min, cfg.hu_max))]
    jobs += [("windows", f"windows/{w.filename}", lambda x, w=w: apply_window(x, w.width, w.level))
             for w in cfg.windows]
    for n, (stage, rel, fn) in enumerate(jobs):
        buf = bufs[n % 2]
        writer.wait_for(buf)  # the buffer's previous content is on disk
        with timer(stage):
            _scale_into(hu, buf, fn)
        writer.save(case_dir / rel, buf.numpy(), owner=buf)
        written.append(rel)
    writer.save(case_dir / GUIDE_FILES["body_mask"], mask)
    written.append(GUIDE_FILES["body_mask"])
    writer.wait_all()  # the buffers are freed after this


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
    files = output_files(cfg.layout)
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
        with timer("body_mask"):
            mask = _body_mask(cube)
            if mask.shape != (R, R, R):
                raise ValueError(f"BodyMask returned shape {mask.shape}, expected {(R, R, R)}")
        with timer("bbox"):
            body_voxels, bbox = _count_and_bbox(mask)
        del cube
        crop = [[0, 0]] * 3 if bbox is None else bbox
        region = hu if cfg.layout == "guide" else hu[tuple(slice(a, b) for a, b in crop)]
        with timer("clip"):
            region.clamp_(cfg.hu_min, cfg.hu_max).round_()  # both layouts hold the same integer HU
        # Files are written by background threads while the next output is computed. Arrays
        # keep the cube's memory order (C or Fortran, as the resampler returns it): a transposing
        # copy of a 512^3 volume costs about 2 s of CPU; np.save records the order in the .npy
        # header, and the compact chunks are copied out one by one.
        writer = _BackgroundWriter(timer)
        written: list[str] = []
        try:
            if cfg.layout == "compact":
                crop_sl = tuple(slice(a, b) for a, b in crop)
                writer.save(case_dir / files["hu"], region.numpy(), saver=_save_int16_chunks)
                writer.save(case_dir / files["body_mask"], mask[crop_sl], saver=save_chunked)
                written += [files["hu"], files["body_mask"]]
            else:
                _write_guide_volumes(writer, timer, hu, mask, cfg, case_dir, written)
            label_ids = None
            if case.label is not None:
                with timer("labels"):
                    lab_cube = _labels_to_cube(case.label, cube_affine, R)
                    label_ids = _label_ids(lab_cube)
                if cfg.layout == "compact":
                    writer.save(case_dir / files["labels"], lab_cube[crop_sl], saver=save_chunked)
                else:
                    writer.save(case_dir / files["labels"], lab_cube)
                written.append(files["labels"])
            writer.wait_all()
        finally:
            writer.close()
        del hu, region, mask
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
            "windows": {w.name: _window_config(w, cfg.layout) for w in cfg.windows},
            "layout": cfg.layout,
            "files": {**{k: v for k, v in files.items() if k != "labels"},
                      "labels": files["labels"] if case.label is not None else None},
            **({"crop": {"offset": [a for a, _ in crop], "shape": [b - a for a, b in crop]}}
               if cfg.layout == "compact" else {}),
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
    """Exclusive ``flock`` on a file (released by the OS when the process dies, even by kill -9).

    Args:
        path: the lock file (created).
        wait: block until the lock is free; otherwise raise ``RuntimeError(busy)`` at once.
        busy: the message when the lock is held elsewhere.
    """

    def __init__(self, path: Path, wait: bool = False, busy: str = ""):
        self.path, self.wait, self.busy = Path(path), wait, busy
        self.fd = None

    def __enter__(self):
        import fcntl

        while True:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(self.fd)
                raise RuntimeError(self.busy) from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    return self
            os.close(self.fd)  # the holder released (and removed) the file meanwhile: lock the new one

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: no zero-byte lock file stays
        os.close(self.fd)
        return False


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 1 <= K <= N; None -> (1, 1).

    Raises:
        ValueError: not of that form.
    """
    if text is None:
        return 1, 1
    try:
        k, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise ValueError(f"--shard {text!r} must be K/N with 1 <= K <= N, e.g. --shard 3/8 "
                         "(in a SLURM array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=1-N)")
    return k, n


def shard_of(keys: Sequence[tuple[str, str]], num_shards: int) -> dict[tuple[str, str], int]:
    """The shard (1..N) of every (dataset, case id): round robin over them sorted, so shards
    get equal shares; every shard must see the same RAW_DIR."""
    return {key: n % num_shards + 1 for n, key in enumerate(sorted(keys))}


class _Metadata:
    """``metadata.csv`` of one dataset, shared by shards running at once.

    Each write takes ``<dataset>/.metadata.lock``, reads the file, keeps the rows of the other
    shards' cases (only those still found), puts this shard's rows in, and replaces the file
    atomically; a shard's cases without a row yet (being processed) have none.
    """

    def __init__(self, ds_dir: Path, all_ids: set[str], own_ids: set[str]):
        self.ds_dir, self.all_ids, self.own_ids = ds_dir, all_ids, own_ids
        self.rows: dict[str, dict] = {}

    def lock(self) -> _Lock:
        return _Lock(self.ds_dir / ".metadata.lock", wait=True)

    def write(self) -> None:
        path = self.ds_dir / "metadata.csv"
        with self.lock():
            merged = {}
            if path.is_file():
                with open(path, newline="", encoding="utf-8") as f:
                    for row in csv.DictReader(f):
                        cid = row.get("case_id", "")
                        if cid in self.all_ids and cid not in self.own_ids:
                            merged[cid] = row
            merged.update(self.rows)
            save_csv(path, [merged[k] for k in sorted(merged)], METADATA_COLUMNS)


def _remove_own_tmp(ds_dir: Path, own_ids: set[str]) -> None:
    """Temporary files left by a killed run, in the folders this run alone writes: the
    dataset folder (written under the metadata lock, held here) and its own cases' logs."""
    for folder, owned in ((ds_dir, None), (ds_dir / "logs", own_ids)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            name = p.name
            if p.is_file() and name.startswith(".") and TMP_TAG in name:
                if owned is None or name[1:].split(".log" + TMP_TAG)[0] in owned:
                    with contextlib.suppress(OSError):
                        p.unlink()


class _Progress:
    """Cases done, cases/s and ETA: a tqdm bar on a terminal, else a line every 30 s (and at
    the end) for batch-job logs."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.ok, self.failed = total, 0, 0, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        self.enabled = enabled and total > 0
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread in a process that forks workers
            self.bar = tqdm(total=total, desc="preprocess", unit="case", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                                       "[{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def line(self) -> str:
        dt = time.perf_counter() - self.t0
        rate = self.done / dt if dt > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
        return (f"preprocess: {self.done}/{self.total} cases ({self.ok} ok, {self.failed} failed), "
                f"{rate:.3g} cases/s, ETA {eta_text}")

    def update(self, ok: bool) -> None:
        self.done += 1
        self.ok += ok
        self.failed += not ok
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(ok=self.ok, failed=self.failed, refresh=False)
            self.bar.update(1)
        elif self.done == self.total or time.perf_counter() - self.last >= 30:
            self.last = time.perf_counter()
            self.write(self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    layout: str = "compact",
    shard: str | tuple[int, int] | None = None,
    dry_run: bool = False,
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
        progress: show progress (cases/s, ETA).
        log: function used for messages.
        layout: "compact" or "guide" (``pipeline.processed``).
        shard: "K/N" or (K, N): process only the cases of shard K of N (:func:`shard_of`).
        dry_run: list what would be processed, skipped and refused; write nothing.

    Returns:
        summary ``{"ok", "failed", "skipped", "total", "datasets", "seconds", "failed_cases"}``
        (dry run: ``{"process", "skip", "refuse", "other_shards", "total", "datasets"}``).
    """
    t0 = time.perf_counter()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    k, n = shard if isinstance(shard, tuple) else parse_shard(shard)
    mapping, extra_windows = load_organ_mapping(organ_mapping)
    wins = parse_windows(windows)
    names = {w.name for w in wins}
    for w in extra_windows:
        if w.name in names:
            raise ValueError(f"window {w.name!r} given both in --windows and in {organ_mapping}; keep one")
        wins.append(w)
    if resolution < 8 or resolution > 2048:
        raise ValueError(f"--resolution {resolution} out of range; use 8..2048 (default 512)")
    output_files(layout)  # checks the name
    cfg = PreprocessConfig(resolution=int(resolution), windows=wins, organ_mapping=mapping, overwrite=overwrite,
                           layout=layout)
    datasets = discovery.discover(raw_dir, max_depth=max_depth, exclude=[out_dir])
    if not datasets:
        log(f"preprocess: no CT cases found under {raw_dir} (volumes .nii/.nii.gz/.nrrd/.mha/.mhd, DICOM folders, DICOM .zip)")
    plan = []  # (dataset, case, case_dir, key, action)
    shards = shard_of([(ds.name, c.case_id) for ds in datasets for c in ds.cases], n)
    for ds in datasets:
        for case in ds.cases:
            case_dir = out_dir / ds.name / "processed" / case.case_id
            key = case_key(cfg, case)
            if shards[(ds.name, case.case_id)] != k:
                action = "other_shard"
            elif not overwrite and marker_is_valid(case_dir, key):
                action = "skip"
            else:
                action = "refuse" if case.error else "process"
            plan.append((ds, case, case_dir, key, action))
    if dry_run:
        return _dry_run(plan, datasets, (k, n), log)

    summary = {"ok": 0, "failed": 0, "skipped": 0, "total": 0, "datasets": len(datasets), "failed_cases": []}
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_name = ".preprocess.lock" if n == 1 else f".preprocess-shard-{k}-of-{n}.lock"
    busy = (f"another preprocess run{'' if n == 1 else f' of shard {k}/{n}'} is writing into {out_dir}; "
            "wait for it to finish or use another OUT_DIR")
    with _Lock(out_dir / lock_name, busy=busy):
        meta: dict[str, _Metadata] = {}
        tasks: list[dict] = []
        for ds in datasets:
            ds_dir = out_dir / ds.name
            (ds_dir / "processed").mkdir(parents=True, exist_ok=True)
            own = {c.case_id for d, c, *_, a in plan if d is ds and a != "other_shard"}
            meta[ds.name] = _Metadata(ds_dir, {c.case_id for c in ds.cases}, own)
            with meta[ds.name].lock():
                _remove_own_tmp(ds_dir, own)
                save_json(ds_dir / "dataset_config.json", dataset_config(cfg, ds))
            for p in ds.unpaired_labels:
                log(f"preprocess: warning: label map {p} was not paired with an image (see --help: label pairing)")
            if ds.ignored:
                log(f"preprocess: {ds.name}: {len(ds.ignored)} file(s) or folder(s) are not cases, e.g. {ds.ignored[0]} "
                    f"(all in {ds_dir / 'dataset_config.json'}, 'ignored')")
        for ds, case, case_dir, key, action in plan:
            if action == "other_shard":
                continue
            summary["total"] += 1
            if action == "skip":
                with contextlib.suppress(Exception):
                    meta[ds.name].rows[case.case_id] = load_json(case_dir / CASE_JSON)["metadata"]
                    summary["skipped"] += 1
                    continue
            tasks.append({"case": case, "cfg": cfg, "case_dir": str(case_dir), "key": key,
                          "log_dir": str(out_dir / ds.name / "logs")})
        for m in meta.values():
            m.write()

        bar = _Progress(len(tasks), progress)

        def record(result: dict) -> None:
            row = result["row"]
            meta[result["dataset"]].rows[row["case_id"]] = row
            if row.get("warning"):
                msg = f"preprocess: warning: {result['dataset']}/{row['case_id']}: {row['warning']}"
                bar.write(msg) if bar.enabled else log(msg)
            ok = row["status"] == "ok"
            if ok:
                summary["ok"] += 1
            else:
                summary["failed"] += 1
                summary["failed_cases"].append(f"{result['dataset']}/{row['case_id']}")
                msg = f"preprocess: FAILED {result['dataset']}/{row['case_id']}: {row['error']}"
                bar.write(msg) if bar.enabled else log(msg)
            meta[result["dataset"]].write()
            bar.update(ok)

        try:
            if num_workers <= 0:
                for task in tasks:
                    record(process_case(task))
            else:
                _run_pool(tasks, num_workers, record)
        finally:
            bar.close()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _dry_run(plan: list, datasets: list, shard: tuple[int, int], log) -> dict:
    """Prints one line per case of this shard (process / skip / refuse) and the counts."""
    counts = {"process": 0, "skip": 0, "refuse": 0, "other_shard": 0}
    words = {"process": "would process", "skip": "would skip (complete)", "refuse": "would refuse"}
    for ds, case, _case_dir, _key, action in plan:
        counts[action] += 1
        if action != "other_shard":
            why = f": {case.error}" if action == "refuse" else ""
            log(f"{words[action]:<22} {ds.name}/{case.case_id}  <- {case.source}{why}")
    k, n = shard
    log(f"preprocess --dry-run{'' if n == 1 else f' (shard {k}/{n})'}: {counts['process']} to process, "
        f"{counts['skip']} to skip, {counts['refuse']} to refuse"
        + (f", {counts['other_shard']} in other shards" if n > 1 else "")
        + f"; {len(datasets)} datasets; nothing written")
    return {"process": counts["process"], "skip": counts["skip"], "refuse": counts["refuse"],
            "other_shards": counts["other_shard"], "total": counts["process"] + counts["skip"] + counts["refuse"],
            "datasets": len(datasets)}


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
  logs/<case_id>.log (traceback of a failed case), processed/<case_id>/ with case.json, .complete and
    --layout compact (default): hu.chunks (int16 HU), body_mask.chunks, labels.chunks, cropped to
      the body's box (offset in case.json), Blosc-compressed 32^3 chunks; windows are computed when
      training or evaluation reads them
    --layout guide: ct_normalized_512.npy, windows/<name>_w<W>_l<L>.npy (float16), body_mask_512.npy,
      labels_512.npy, the whole (R,R,R) cube (the "_512" names stay the same for any R)
  Case ids come from the path relative to the dataset folder (folders joined by "__").

rerun / resume:
  Every file is written under a temporary name then renamed; .complete is written last and
  records the settings and the source's size/mtime. A rerun skips cases with a valid marker and
  redoes the rest (a changed source or setting makes the marker invalid). Safe to kill.

several machines (--shard K/N):
  Each of N commands processes every N-th case (all cases sorted by dataset/case id), into
  the same OUT_DIR (a shared file system with flock: NFSv4, Lustre mounted with -o flock, local
  disks). metadata.csv is rewritten under a lock with every shard's rows; rerun a shard to resume it.
  SLURM:  sbatch --array=1-16 --wrap './run.sh preprocess raw_ct/ processed_dataset/ - 4 --shard $SLURM_ARRAY_TASK_ID/16'

exit status: 0 all cases ok or skipped, 1 some case failed, 2 bad arguments."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m pipeline.preprocess``."""
    p = argparse.ArgumentParser(
        prog="./run.sh preprocess",
        description="Turn raw CT collections into processed cube datasets: RAS orientation, isotropic "
        "resampling into an R^3 cube (air padding), body mask, and integer HU, mask and labels cropped to the "
        "body in compressed chunks (or the older guide's float16 .npy volumes), with parallel workers, resumable "
        "runs and shards for several machines.",
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
                   help="windows of the dataset (the guide layout writes their files; compact cases compute any "
                   "window when read, these are listed in dataset_config.json): preset names (lung bone soft_tissue "
                   "brain) or custom 'name:WIDTH:LEVEL', "
                   "space- or comma-separated (default: the four presets: lung 1500/-600, bone 1500/300, "
                   "soft_tissue 400/50, brain 80/35)")
    p.add_argument("--max-depth", type=int, default=None,
                   help="deepest folder level searched, RAW_DIR = 0, dataset folders = 1 (default: no limit)")
    p.add_argument("--layout", choices=["compact", "guide"], default="compact",
                   help="compact (default): int16 HU, body mask and labels cropped to the body, compressed chunks, "
                   "windows computed when read; guide: the older guide's float16 ct_normalized_512.npy and "
                   "windows/*.npy of the whole cube (17-290x the bytes on the shared scans)")
    p.add_argument("--shard", metavar="K/N", default=None,
                   help="process only shard K of N (every N-th case, sorted by dataset/case id): one command per node "
                   "into one shared OUT_DIR, e.g. a SLURM array --shard $SLURM_ARRAY_TASK_ID/N with --array=1-N")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be processed, skipped (complete) and refused; write nothing")
    p.add_argument("--overwrite", action="store_true", help="reprocess cases that are already complete")
    p.add_argument("--no-progress", action="store_true", help="no progress (default: a bar with cases/s and ETA on a "
                   "terminal, a line every 30 s otherwise)")
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
        parse_shard(args.shard)
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
                args.overwrite, progress=not args.no_progress, layout=args.layout, shard=args.shard,
                dry_run=args.dry_run)
    except KeyboardInterrupt:
        print("preprocess: interrupted; rerun the same command to finish (complete cases are kept)", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    for name in s["failed_cases"][:20]:
        print(f"preprocess: failed: {name} (see metadata.csv)", file=sys.stderr)
    print(summary_line(s, args.out_dir, args.shard))
    return 1 if s["failed"] else 0


def summary_line(s: dict, out_dir: str | os.PathLike, shard: str | None = None) -> str:
    """The last line of a preprocessing run: cases ok / failed / skipped, time and where they went."""
    where = f" (shard {shard})" if shard else ""
    return (f"preprocess: {s['total']} cases in {s['datasets']} datasets{where}: {s['ok']} ok, {s['failed']} failed, "
            f"{s['skipped']} skipped in {s['seconds']:.1f} s -> {out_dir}")


if __name__ == "__main__":
    sys.exit(main())

"""One case: the scan through ``transforms``' preprocessing chain, then its files and its
``metadata.csv`` row (runs in a worker process)."""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from pipeline.chunked import save_chunked
from pipeline.discovery import Case
from pipeline.io_utils import TokenizerError, rmtree_quiet, save_json, save_text
from pipeline.preprocess.config import PreprocessConfig, window_config
from pipeline.preprocess.writer import BackgroundWriter
from pipeline.processed import CASE_JSON, GUIDE_FILES, MARKER, layout_files
from transforms import CUBE_STEPS, CTLoadError, ResampleToCube, apply_window, body_bbox, cube_transforms, load_ct, normalize_hu
from transforms.image_files import check_label_overlap

__all__ = ["Timer", "case_row", "process_case"]

_SLAB_VOXELS = 1 << 20  # voxels per slab of the label histogram (stays in cache)


class Timer:
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


def _labels_to_cube(path: Path, cube_affine: np.ndarray, resolution: int) -> np.ndarray:
    """Label map -> (R, R, R) uint8/int16 on the cube grid: nearest neighbour in world space
    (``transforms.ResampleToCube`` with the image's cube affine), 0 outside the label map."""
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
    """The error in one line: our own refusals (which name the file and the fix) as they are, anything
    else with its type, which is the first clue to what broke."""
    msg = " ".join(str(e).split())
    if not msg:
        return type(e).__name__
    return (msg if isinstance(e, (CTLoadError, TokenizerError)) else f"{type(e).__name__}: {msg}")[:500]


def _save_int16_chunks(path: Path, hu: np.ndarray) -> int:
    return save_chunked(path, hu, dtype=np.int16)


def _write_guide_volumes(writer, timer, hu: torch.Tensor, mask: np.ndarray, cfg: PreprocessConfig,
                         case_dir: Path, written: list[str]) -> None:
    """The guide layout's float16 volumes (normalised HU, windows) and body mask; two float16
    buffers take turns between computing and the background writer."""
    bufs = [torch.empty_like(hu, dtype=torch.float16) for _ in range(2)]
    jobs = [("normalize", GUIDE_FILES["ct_normalized"], lambda out: normalize_hu(hu, cfg.hu_min, cfg.hu_max, out=out))]
    jobs += [("windows", f"windows/{w.filename}", lambda out, w=w: apply_window(hu, w.width, w.level, out=out))
             for w in cfg.windows]
    for n, (stage, rel, fill) in enumerate(jobs):
        buf = bufs[n % 2]
        writer.wait_for(buf)  # the buffer's previous content is on disk
        with timer(stage):
            fill(buf)
        writer.save(case_dir / rel, buf.numpy(), owner=buf)
        written.append(rel)
    writer.save(case_dir / GUIDE_FILES["body_mask"], mask)
    written.append(GUIDE_FILES["body_mask"])
    writer.wait_all()  # the buffers are freed after this


def case_row(case: Case, resolution: int | None = None) -> dict[str, Any]:
    """The start of a case's ``metadata.csv`` row: a failed case until its files are written."""
    row = {
        "case_id": case.case_id,
        "status": "failed",
        "error": "",
        "source_path": str(case.source.resolve()),
        "rel_path": case.rel_path,
        "source_kind": case.kind,
        "label_path": str(case.label.resolve()) if case.label else "",
    }
    return row if resolution is None else {**row, "resolution": resolution}


def _to_cube(case: Case, cfg: PreprocessConfig, timer: Timer, row: dict) -> tuple[dict, dict]:
    """The scan through ``transforms.cube_transforms``, step by step (each one timed): the chain's
    output and the geometry for case.json; fills the row's shapes, spacing and warnings."""
    steps = dict(zip(CUBE_STEPS, cube_transforms("image", cfg.resolution, cfg.hu_min, case.series_uid)))
    d: dict[str, Any] = {"image": case.source}
    with timer("load"):
        d = steps["load"](d)
    meta = d["image"].meta
    warnings = list(meta.get("load_warnings", []))
    geo: dict[str, Any] = {"original_affine": _affine(meta.get("original_affine", d["image"].affine)),
                           "original_shape": [int(v) for v in meta.get("original_shape", d["image"].shape[1:])],
                           "loader_meta": {k: v for k, v in meta.items() if str(k).startswith("dicom_")}}
    row["original_shape"] = json.dumps(geo["original_shape"])
    row["original_spacing"] = json.dumps([round(v, 6) for v in _spacing(geo["original_affine"])])
    with timer("orient"):
        d = steps["orient"](d)
    geo["source_affine"] = _affine(d["image"].affine)
    geo["source_shape"] = [int(v) for v in d["image"].shape[1:]]
    if case.label is not None:
        cover, more = check_label_overlap(case.label, geo["source_affine"], geo["source_shape"])
        row["label_coverage"], warnings = (round(cover, 4) if cover is not None else ""), warnings + more
    row["warning"] = "; ".join(warnings)
    with timer("resample"):
        d = steps["resample"](d)
    geo["cube_affine"] = _affine(d["image"].meta.get("cube_affine", d["image"].affine))
    with timer("body_mask"):
        d = steps["body_mask"](d)
    return d, geo


def _write_arrays(d: dict, cube_affine: np.ndarray, case: Case, cfg: PreprocessConfig, case_dir: Path,
                  timer: Timer) -> tuple[list[str], dict]:
    """The case's arrays in its layout; returns the files written and what case.json records of them."""
    R = int(cfg.resolution)
    files = layout_files(cfg.layout)
    hu = d.pop("image").as_tensor().reshape(R, R, R)
    if hu.dtype != torch.float32:
        hu = hu.float()
    mask = _to_numpy(d.pop("body_mask")).reshape(R, R, R)
    with timer("bbox"):
        body_voxels, bbox = int(np.count_nonzero(mask)), body_bbox(mask)
    crop = [[0, 0]] * 3 if bbox is None else bbox
    crop_sl = tuple(slice(a, b) for a, b in crop)
    region = hu if cfg.layout == "guide" else hu[crop_sl]
    with timer("clip"):
        region.clamp_(cfg.hu_min, cfg.hu_max).round_()  # both layouts hold the same integer HU
    # Files are written by background threads while the next output is computed. Arrays keep the
    # cube's memory order (C or Fortran, as the resampler returns it): a transposing copy of a 512^3
    # volume costs about 2 s of CPU; np.save records the order in the .npy header, and the compact
    # chunks are copied out one by one.
    writer = BackgroundWriter(timer)
    written: list[str] = []
    label_ids = None
    try:
        if cfg.layout == "compact":
            writer.save(case_dir / files["hu"], region.numpy(), saver=_save_int16_chunks)
            writer.save(case_dir / files["body_mask"], mask[crop_sl], saver=save_chunked)
            written += [files["hu"], files["body_mask"]]
        else:
            _write_guide_volumes(writer, timer, hu, mask, cfg, case_dir, written)
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
    info = {
        "files": {**{k: v for k, v in files.items() if k != "labels"},
                  "labels": files["labels"] if case.label is not None else None},
        **({"crop": {"offset": [a for a, _ in crop], "shape": [b - a for a, b in crop]}}
           if cfg.layout == "compact" else {}),
        "body_bbox": bbox,
        "body_voxels": body_voxels,
        "label_ids": label_ids,
    }
    return written, info


def process_case(task: dict) -> dict:
    """Preprocess one case (runs in a worker process). Never raises for a bad input.

    Args:
        task: dict with ``case`` (:class:`~pipeline.discovery.Case`), ``cfg``
            (:class:`~pipeline.preprocess.config.PreprocessConfig`), ``case_dir``, ``key``, ``log_dir``.

    Returns:
        ``{"row": metadata row, "timings": {...}, "cpu_timings": {...}, "dataset"}``; row["status"]
        is "ok" or "failed".
    """
    case: Case = task["case"]
    cfg: PreprocessConfig = task["cfg"]
    case_dir = Path(task["case_dir"])
    timer = Timer()
    t_start, c_start = time.perf_counter(), time.process_time()
    row = case_row(case, int(cfg.resolution))
    try:
        rmtree_quiet(case_dir)  # never mix files of two runs
        if case.error:
            raise ValueError(case.error)
        d, geo = _to_cube(case, cfg, timer, row)
        case_dir.mkdir(parents=True, exist_ok=True)
        written, arrays_info = _write_arrays(d, geo["cube_affine"], case, cfg, case_dir, timer)
        del d
        spacing_cube = _spacing(geo["cube_affine"])
        row.update({
            "status": "ok",
            "spacing_512": json.dumps([round(v, 6) for v in spacing_cube]),
            "body_voxels": arrays_info["body_voxels"],
            "label_ids": json.dumps(arrays_info["label_ids"]) if arrays_info["label_ids"] is not None else "",
        })
        row["seconds"] = round(time.perf_counter() - t_start, 3)
        info = {
            "case_id": case.case_id,
            "dataset": case.dataset,
            "source": row["source_path"],
            "rel_path": case.rel_path,
            "source_kind": case.kind,
            "label_source": row["label_path"] or None,
            "resolution": int(cfg.resolution),
            "affine_512": geo["cube_affine"].tolist(),
            "spacing_512": spacing_cube,
            "source_affine": geo["source_affine"].tolist(),
            "source_shape": geo["source_shape"],
            "original_affine": geo["original_affine"].tolist(),
            "original_shape": geo["original_shape"],
            "original_spacing": _spacing(geo["original_affine"]),
            "hu_min": cfg.hu_min,
            "hu_max": cfg.hu_max,
            "windows": {w.name: window_config(w, cfg.layout) for w in cfg.windows},
            "layout": cfg.layout,
            **arrays_info,
            "loader_meta": geo["loader_meta"],
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

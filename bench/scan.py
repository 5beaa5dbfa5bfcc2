"""The benchmarks' test scan: a processed case folder (guide layout, ``pipeline.processed``), given,
built from a raw scan through ``transforms.cube_transforms``, or a synthetic phantom; and crops of it."""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import default_budget, free_memory, jsonable
from bench.timing import Budget
from pipeline.io_utils import save_npy
from pipeline.processed import CASE_JSON, GUIDE_FILES, MARKER
from transforms import HU_MAX, HU_MIN, WindowSpec, apply_window, normalize_hu

CACHE_DIR = Path(tempfile.gettempdir()) / "ctvq_bench_cache"  # 512^3 cases are ~0.7 GB: never in the tree


def add_scan_args(parser: argparse.ArgumentParser, case_help: str | None = None) -> argparse.ArgumentParser:
    """Add the options that choose the real (or synthetic) scan (``case_help``: the ``--case`` help of a
    script for which it is not one guide-layout case)."""
    src = parser.add_argument_group("scan (one of --case, --nifti; a synthetic phantom otherwise)")
    src.add_argument("--case", type=Path, default=None,
                     help=case_help or "processed case folder (ct_normalized_512.npy, windows/, body_mask_512.npy)")
    src.add_argument("--nifti", type=Path, default=None,
                     help="raw CT (NIfTI or any LoadCT input) processed on the fly through transforms; "
                          "the result is cached under --cache and reused")
    src.add_argument("--cache", type=Path, default=CACHE_DIR,
                     help="folder for scans built from --nifti or the synthetic phantom (default: <tmp>/ctvq_bench_cache)")
    src.add_argument("--window", default="lung",
                     help="window whose support the sparse model sees: a preset name (lung, bone, soft_tissue, "
                          "brain) or name:W:L (default: lung)")
    src.add_argument("--resolution", type=int, default=None,
                     help="cube size for --nifti and the phantom (default 512, or 64 with --small)")
    return parser


def parse_window(spec: str) -> WindowSpec:
    """``--window``: ``transforms.parse_window``; a bad value ends the script with one line."""
    import transforms

    try:
        return transforms.parse_window(spec)
    except ValueError as e:
        raise SystemExit(f"--window: {e}") from None


@dataclass
class Scan:
    """One processed scan in memory (memory-mapped): window values, body mask and where it came from."""

    window: np.ndarray  # (R, R, R) float16/float32 in [0, 1]
    body: np.ndarray  # (R, R, R) bool
    window_name: str
    source: str
    case_dir: Path

    @property
    def resolution(self) -> int:
        return int(self.window.shape[0])


def write_case(case_dir: Path, hu: np.ndarray, windows: dict[str, np.ndarray], body: np.ndarray,
               case_info: dict[str, Any]) -> Path:
    """Write one case folder in the guide layout (``pipeline.processed``: the subset the benchmarks and
    dataset read); ``windows`` maps window file names to window values.

    A dataset root two levels up gets ``dataset_config.json`` and ``metadata.csv`` so the training
    dataset can discover it.
    """
    case_dir = Path(case_dir)
    (case_dir / "windows").mkdir(parents=True, exist_ok=True)
    res = int(body.shape[0])
    save_npy(case_dir / GUIDE_FILES["ct_normalized"], normalize_hu(hu).astype(np.float16))
    for fname, arr in windows.items():
        save_npy(case_dir / "windows" / fname, arr.astype(np.float16, copy=False))
    save_npy(case_dir / GUIDE_FILES["body_mask"], body.astype(bool, copy=False))
    info = {"case_id": case_dir.name, "resolution": res, **case_info}
    (case_dir / CASE_JSON).write_text(json.dumps(info, indent=2, default=jsonable))
    dataset_root = case_dir.parent.parent
    win_cfg = {}
    for fname in windows:
        name, w, l = Path(fname).stem.rsplit("_", 2)  # e.g. soft_tissue, w400, l50
        win_cfg[name] = {"width": float(w[1:]), "level": float(l[1:]), "file": f"windows/{fname}"}
    cfg = {"resolution": res, "hu_min": HU_MIN, "hu_max": HU_MAX, "windows": win_cfg, "organ_mapping": None,
           "versions": {"numpy": np.__version__, "torch": torch.__version__}}
    (dataset_root / "dataset_config.json").write_text(json.dumps(cfg, indent=2))
    meta = dataset_root / "metadata.csv"
    meta.write_text(
        "case_id,source_path,label_path,status,error,original_shape,original_spacing,spacing_512,body_voxels,seconds\n"
        f"{case_dir.name},{case_info.get('source', '')},,ok,,\"{case_info.get('source_shape', '')}\",,,"
        f"{int(body.sum())},0\n")
    (case_dir / MARKER).write_text("ok\n")  # no manifest: taken on its files, as the older guide's tools wrote it
    return case_dir


def phantom_hu(resolution: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A chest-like phantom in HU: ellipsoid body (soft tissue), two lungs, a spine; air outside.

    Returns (hu float32 (R,R,R), body bool (R,R,R)); the body fills about 40% of the cube like a
    resampled chest scan.
    """
    rng = np.random.default_rng(seed)
    r = resolution
    g = (np.arange(r, dtype=np.float32) + 0.5) / r * 2 - 1
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.62) ** 2 + (z / 0.98) ** 8 <= 1.0
    hu = np.full((r, r, r), -1000.0, np.float32)
    hu[body] = 40.0
    lungs = (((x - 0.38) / 0.3) ** 2 + (y / 0.38) ** 2 + (z / 0.8) ** 2 <= 1) | (
        ((x + 0.38) / 0.3) ** 2 + (y / 0.38) ** 2 + (z / 0.8) ** 2 <= 1)
    hu[lungs & body] = -850.0
    spine = ((x / 0.09) ** 2 + ((y + 0.45) / 0.09) ** 2 <= 1) & body
    hu[spine] = 700.0
    fat = body & ~lungs & ((x / 0.8) ** 2 + (y / 0.57) ** 2 > 1)
    hu[fat] = -100.0
    hu += rng.normal(0, 15, size=hu.shape).astype(np.float32) * body
    return hu, body


def _find_window_file(case_dir: Path, name: str) -> Path | None:
    hits = sorted((case_dir / "windows").glob(f"{name}_w*_l*.npy"))
    return hits[0] if hits else None


def _build_from_nifti(path: Path, resolution: int, win: WindowSpec, case_dir: Path) -> None:
    """Run the project's preprocessing chain (``transforms.cube_transforms``) on a raw scan and write a case folder."""
    from monai.transforms import Compose

    from transforms import cube_transforms

    t0 = time.perf_counter()
    d = Compose(cube_transforms("image", resolution))({"image": str(path)})
    hu = np.asarray(d["image"][0].numpy(), dtype=np.float32).clip(HU_MIN, HU_MAX)
    write_case(case_dir, hu, {win.filename: apply_window(hu, win.width, win.level)}, d["body_mask"][0].numpy(),
               {"source": str(path.name), "source_shape": list(d["image"].meta["source_shape"]),
                "timings": {"build_s": round(time.perf_counter() - t0, 2)}})


def prepare_case(args: argparse.Namespace) -> Path:
    """The case folder to benchmark on: ``--case``, or one built (once, cached) from ``--nifti`` or a phantom."""
    win = parse_window(args.window)
    if args.case is not None:
        case = Path(args.case)
        if not (case / GUIDE_FILES["body_mask"]).exists():
            raise SystemExit(f"--case {case}: no {GUIDE_FILES['body_mask']} there; pass a processed case folder "
                             "(processed_dataset/<name>/processed/<case_id>)")
        return case
    res = args.resolution or (64 if args.small else 512)
    if args.nifti is not None:
        stem = Path(args.nifti).name.split(".")[0]
        case = Path(args.cache) / f"{stem}_{res}" / "processed" / stem
        if not (case / MARKER).exists() or _find_window_file(case, win.name) is None:
            print(f"building {res}^3 case from {args.nifti} through transforms (cached in {case}) ...", flush=True)
            _build_from_nifti(Path(args.nifti), res, win, case)
        return case
    case = Path(args.cache) / f"phantom_{res}" / "processed" / "phantom"
    if not (case / MARKER).exists() or _find_window_file(case, win.name) is None:
        hu, body = phantom_hu(res, seed=0)
        write_case(case, hu, {win.filename: apply_window(hu, win.width, win.level)}, body,
                   {"source": "synthetic phantom", "source_shape": [res] * 3})
    return case


def load_scan(args: argparse.Namespace) -> Scan:
    """Memory-map the chosen window and body mask of the benchmark case."""
    case = prepare_case(args)
    win = parse_window(args.window)
    wfile = case / "windows" / win.filename
    if not wfile.exists():
        wfile = _find_window_file(case, win.name)
    if wfile is None or not wfile.exists():
        raise SystemExit(f"{case}: no windows/{win.name}_w*_l*.npy; preprocess that window or pass --window with one "
                         f"of {[p.name for p in (case / 'windows').glob('*.npy')]}")
    window = np.load(wfile, mmap_mode="r")
    body = np.load(case / GUIDE_FILES["body_mask"], mmap_mode="r")
    if window.shape != body.shape or window.ndim != 3:
        raise SystemExit(f"{case}: window {window.shape} and body mask {body.shape} differ; re-run preprocessing")
    info = {}
    with contextlib.suppress(Exception):
        info = json.loads((case / CASE_JSON).read_text())
    return Scan(window=window, body=body, window_name=wfile.stem, source=str(info.get("source", case.name)),
                case_dir=case)


def load_scan_and_budget(args: argparse.Namespace, device: torch.device) -> tuple[Scan, Budget]:
    """The benchmark scan, then the script's time budget, started once the scan is loaded (or built)."""
    scan = load_scan(args)
    budget = Budget(default_budget(args))
    print(f"scan: {scan.source} ({scan.resolution}^3, window {scan.window_name}); device {device}; "
          f"budget {budget.seconds:.0f} s", flush=True)
    return scan, budget


def body_center(body: np.ndarray) -> tuple[int, int, int]:
    """Centre of mass of the body mask, from its three axis projections (cheap on a memory map)."""
    r = body.shape
    center = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        prof = np.asarray(body, dtype=bool).sum(axis=others, dtype=np.int64)
        tot = prof.sum()
        center.append(int(round(float((prof * np.arange(r[axis])).sum() / tot))) if tot else r[axis] // 2)
    return tuple(center)  # type: ignore[return-value]


def crop_box(center: Sequence[int], size: int, resolution: int, align: int = 8) -> tuple[slice, slice, slice]:
    """A cube of ``size`` centred on ``center``, start aligned to ``align``, kept inside the grid."""
    if size > resolution:
        raise ValueError(f"crop {size} is larger than the {resolution}^3 scan; use crops <= {resolution}")
    box = []
    for c in center:
        start = int(c) - size // 2
        start = max(0, min(resolution - size, start))
        start -= start % align
        box.append(slice(start, start + size))
    return tuple(box)  # type: ignore[return-value]


@dataclass
class Crop:
    """Dense and sparse views of one crop (on the benchmark device)."""

    size: int
    box: tuple[slice, slice, slice]
    dense: torch.Tensor  # (1, 1, s, s, s) float32 window values, 0 outside the support
    coords: torch.Tensor  # (N, 4) int32 (batch, i, j, k) in full-grid coordinates
    feats: torch.Tensor  # (N, 1) float32
    resolution: int

    @property
    def voxels(self) -> int:
        return self.size**3

    @property
    def occupancy(self) -> float:
        return self.coords.shape[0] / self.voxels


def make_crop(scan: Scan, size: int, device: torch.device) -> Crop:
    """The crop of ``size``^3 centred on the body; support = body mask & window > 0.

    The dense input holds the window values (what a dense model sees: the full crop); the sparse
    input holds only support voxels, with coordinates in the full grid.
    """
    box = crop_box(body_center(scan.body), size, scan.resolution)
    win = torch.from_numpy(np.array(scan.window[box], dtype=np.float32)).to(device)  # copies off the memory map
    body = torch.from_numpy(np.array(scan.body[box], dtype=bool)).to(device)
    support = body & (win > 0)
    dense = torch.where(support, win, torch.zeros((), device=device))
    ijk = torch.nonzero(support).to(torch.int32)
    offset = torch.tensor([s.start for s in box], dtype=torch.int32, device=device)
    coords = torch.cat([torch.zeros_like(ijk[:, :1]), ijk + offset], dim=1).contiguous()
    feats = win[support].unsqueeze(1).contiguous()
    return Crop(size=size, box=box, dense=dense[None, None].contiguous(), coords=coords, feats=feats,
                resolution=scan.resolution)


@contextlib.contextmanager
def only_on_device(vol: Crop, keep: tuple[str, ...], device: torch.device):
    """Park the input views a model does not read on the CPU, so its peak memory is its own."""
    parked = {}
    for name in ("dense", "coords", "feats"):
        if name not in keep:
            parked[name] = getattr(vol, name).device
            setattr(vol, name, getattr(vol, name).cpu())
    free_memory(device)
    try:
        yield vol
    finally:
        for name, dev in parked.items():
            setattr(vol, name, getattr(vol, name).to(dev))


def whole_scan(scan: Scan, device: torch.device) -> Crop:
    """The whole cube as one 'crop' (for whole-scan inference)."""
    return make_crop(scan, scan.resolution, device)


def sparse_input(crop: Crop, batch_size: int = 1):
    """The crop as an spconv SparseConvTensor on the full grid."""
    from networks import make_sparse  # its backend installs the CPU stream stub and picks the algorithm

    return make_sparse(crop.feats, crop.coords, [crop.resolution] * 3, batch_size)


def grid_input(crop: Crop, factor: int = 8):
    """The crop as the trainer runs it: its box as a dense :class:`networks.grid.GridBatch`."""
    from networks.grid import grid_from_sparse

    box = torch.tensor([[s.start for s in crop.box] + [s.stop for s in crop.box]])
    return grid_from_sparse(sparse_input(crop), box, factor)

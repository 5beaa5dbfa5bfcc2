"""Whole-scan encode to tokens and decode back to HU.

Command line (``./run.sh encode`` / ``./run.sh decode``)::

    python -m pipeline.infer encode SCAN OUT.npz --bundle DIR [--ckpt CKPT] [--tile 16] [--device cpu]
    python -m pipeline.infer decode IN.npz OUT.nii.gz --bundle DIR [--original-grid] [--depth D]

``SCAN`` is anything the preprocessing accepts (DICOM folder or .zip, NIfTI, NRRD, MHA). It goes
through the one preprocessing chain, ``transforms.CTModelInputd`` (the cube steps of
``transforms.cube_transforms`` that ``./run.sh preprocess`` runs, then the model's HU clip, window
and sparse support), then the model's tiled ``Encode``. The token file (.npz) holds the latent coordinates [M, 3], the code indices [M], the
window, and the geometry to go back (cube affine, source and original grids). Decoding runs the
tiled ``Decode``, fills the cube (zeros outside the decoded cells), maps window values back to HU
(``HU = level - width / 2 + v * width``) and writes NIfTI on the cube grid, or with
``--original-grid`` on the scan's own grid and affine.

Python::

    tok = Tokenizer.from_bundle("dist/ct_vqvae")          # or Tokenizer.from_checkpoint(ckpt)
    tokens = tok.encode("scan.nii.gz")                     # CTTokens
    tokens.save("scan_tokens.npz")
    window = tok.decode(tokens)                            # (R, R, R) float32 window values
    hu, affine = tok.decode_hu(tokens, original_grid=True)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import lazy_names
from pipeline.io_utils import TokenizerError, save_nifti

if TYPE_CHECKING:
    import torch

    from pipeline.tokenizer import Tokenizer
    from pipeline.tokens import CTTokens
    from transforms import WindowSpec

__all__ = [
    "CTTokens",
    "Tokenizer",
    "WindowSpec",
    "DEFAULT_TILE",
    "DEFAULT_TILE_CUDA",
    "window_from_config",
    "parse_window",
    "preprocessing_transforms",
    "sparsify",
    "cli_errors",
    "main",
]

DEFAULT_TILE = 16  # latent cells per tile edge (128 voxels) on CPU
# On a GPU, fp16 autocast with 32-cell tiles measured fastest within 16 GB on an H100 for a 512^3
# chest/abdomen (encode 0.78 s + decode 0.47 s, 12.2 GiB; 16-cell tiles: 1.96 s + 0.82 s;
# untiled fails spconv's int32 limit in the last decoder layer).
DEFAULT_TILE_CUDA = 32

__getattr__ = lazy_names(__name__, {"Tokenizer": "pipeline.tokenizer", "CTTokens": "pipeline.tokens", "WindowSpec": "transforms"})


# --------------------------------------------------------------------------------------- windows


def parse_window(spec: Any) -> WindowSpec:
    """``transforms.parse_window`` (the one parser of windows), failing with :class:`TokenizerError`.

    Args:
        spec: the window description.
    """
    from transforms import parse_window as _parse_window

    try:
        return _parse_window(spec)
    except ValueError as e:
        raise TokenizerError(str(e)) from None


def window_from_config(cfg: Mapping) -> WindowSpec:
    """The model's window from a run or bundle config (``window`` or ``window_type``).

    Args:
        cfg: resolved config dict.
    """
    for key in ("window", "window_spec", "window_type"):
        if cfg.get(key):
            return parse_window(cfg[key])
    ds = cfg.get("dataset")
    if isinstance(ds, Mapping):
        for key in ("window", "window_type"):
            if ds.get(key):
                return parse_window(ds[key])
    raise TokenizerError("config has no 'window_type' (or 'window'); add e.g. \"window_type\": \"lung\" to it")


# ----------------------------------------------------------------------------------- preprocessing


def preprocessing_transforms(window: Any, resolution: int = 512):
    """``transforms.CTModelInputd``, the one preprocessing chain, for the model's window: a scan path
    (key ``"image"``) -> window values, ``"body_mask"``, ``"coords"`` and ``"feats"``.

    Args:
        window: the model's window (WindowSpec, preset name, "name:W:L" or mapping).
        resolution: cube side R.
    """
    from transforms import CTModelInputd

    return CTModelInputd(parse_window(window), int(resolution))


def sparsify(window: Any, mask: Any, device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``transforms.Sparsify``: (window (1, R, R, R), body mask) -> coords [N, 3] int32, feats [N, 1] float32.

    Args:
        window: window values, (1, R, R, R) or (R, R, R).
        mask: body mask of the same spatial shape (support = mask & window > 0).
        device: where to find the support (the arrays are moved there in their own dtype; on a
            GPU this takes a fraction of the CPU's time for a 512^3 volume). Default: CPU.
    """
    import warnings

    import numpy as np
    import torch

    from transforms import Sparsify

    with warnings.catch_warnings():  # read-only (memory-mapped) arrays: these tensors are only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        win = torch.as_tensor(np.asarray(window) if not isinstance(window, torch.Tensor) else window)
        msk = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if device is not None:
        win, msk = win.to(device), msk.to(device)
    if win.ndim == 3:
        win = win[None]
    if msk.ndim == 3:
        msk = msk[None]
    coords, feats = Sparsify()(win.float(), msk.bool())
    return torch.as_tensor(coords).to(torch.int32), torch.as_tensor(feats).float().reshape(-1, 1)


# ------------------------------------------------------------------------------------------- CLI


@contextlib.contextmanager
def cli_errors():
    """Turn known failures, and a ``SystemExit`` carrying a message, into one line on stderr
    (``error: ...``) and exit code 2 (``CTVQ_DEBUG=1`` keeps tracebacks)."""
    from transforms import CTLoadError

    try:
        yield
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(f"error: {e.code}", file=sys.stderr)
        raise SystemExit(2) from None
    except (TokenizerError, CTLoadError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError) as e:
        if os.environ.get("CTVQ_DEBUG"):
            raise
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


def _check_in(cmd: str, source: str) -> str | None:
    """Why the input is refused before the model loads (it is not there), or None."""
    if Path(source).exists():
        return None
    if cmd == "encode":
        return f"{source}: does not exist; check the path (a DICOM folder or .zip, NIfTI, NRRD or MHA)"
    return f"{source}: token file not found; write it with `./run.sh encode SCAN {Path(source).name} --bundle DIR`"


def _check_out(cmd: str, out: str) -> str | None:
    """Why OUT is refused before any work (one line naming the path and the fix), or None."""
    path = Path(out)
    name = path.name
    stem = next((name[: -len(x)] for x in (".nii.gz", ".nii", ".npz", ".npy", ".gz") if name.endswith(x)), name)
    if path.is_dir():
        example = "tokens.npz" if cmd == "encode" else "decoded.nii.gz"
        return f"{out}: is a folder; OUT is the file to write, e.g. {path / example}"
    if cmd == "encode" and not name.endswith(".npz"):
        return f"{out}: encode writes a token file (.npz); give OUT a .npz name, e.g. {path.with_name(stem + '.npz')}"
    if cmd == "decode" and not name.endswith((".nii.gz", ".nii")):
        return (f"{out}: decode writes NIfTI; give OUT a .nii.gz (compressed) or .nii name, "
                f"e.g. {path.with_name(stem + '.nii.gz')}")
    return None


def _tokenizer_from_args(a) -> Tokenizer:
    from pipeline.tokenizer import Tokenizer

    kw: dict[str, Any] = {}
    if a.tile is not None:
        kw["tile"] = a.tile or None
    if a.bundle:
        return Tokenizer.from_bundle(a.bundle, device=a.device, trust=a.trust_bundle, **kw)
    if a.ckpt:
        return Tokenizer.from_checkpoint(a.ckpt, config=a.config, device=a.device, trust=a.trust_bundle, **kw)
    raise TokenizerError("no model given; pass --bundle DIR (an exported bundle) or --ckpt RUN_DIR/ckpts/FILE.pt")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./run.sh", description="Encode CT scans to tokens and decode them back.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(q):
        q.add_argument("--bundle", default=None, help="exported MONAI bundle folder")
        q.add_argument("--ckpt", default=None, help="checkpoint (with RUN_DIR/config.json two levels up) instead of --bundle")
        q.add_argument("--config", default=None, help="run config.json for --ckpt (default: next to the ckpts folder)")
        q.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
        q.add_argument("--trust-bundle", action="store_true",
                       help="run the $ expressions and preprocessing of the bundle (or run config): only for files you wrote; "
                            "by default they are read as data")
        q.add_argument("--tile", type=int, default=None, help=f"latent tile edge for whole scans (default {DEFAULT_TILE_CUDA} on CUDA with fp16, {DEFAULT_TILE} on CPU; 0: untiled)")

    e = sub.add_parser("encode", help="scan -> tokens .npz")
    e.add_argument("scan", help="DICOM folder or .zip, NIfTI, NRRD or MHA")
    e.add_argument("out", help="output token file (must end in .npz)")
    model_args(e)
    d = sub.add_parser("decode", help="tokens .npz -> NIfTI in HU")
    d.add_argument("tokens", help="token file from encode")
    d.add_argument("out", help="output NIfTI in HU (must end in .nii.gz or .nii)")
    d.add_argument("--original-grid", action="store_true", help="resample onto the scan's own grid and affine")
    d.add_argument("--depth", type=int, default=None,
                   help="decode the first DEPTH residual code levels (default: all the token file holds)")
    model_args(d)
    a = p.parse_args(argv)
    refused = _check_in(a.cmd, a.scan if a.cmd == "encode" else a.tokens) or _check_out(a.cmd, a.out)
    if refused:  # before loading the model or the scan: nothing is written
        print(f"error: {refused}", file=sys.stderr)
        raise SystemExit(2)
    progress = logging.StreamHandler(sys.stderr)  # tile progress of long runs (CPU): "encode: N of M tiles, S s"
    progress.setFormatter(logging.Formatter(f"{a.cmd}: %(message)s"))
    tiles = logging.getLogger("ctvq.tiles")
    level, propagate = tiles.level, tiles.propagate
    tiles.addHandler(progress)
    tiles.setLevel(logging.INFO)
    tiles.propagate = False  # once, not again through a handler of the root logger
    with cli_errors(), contextlib.ExitStack() as cleanup:
        cleanup.callback(tiles.removeHandler, progress)
        cleanup.callback(tiles.setLevel, level)
        cleanup.callback(setattr, tiles, "propagate", propagate)
        tok = _tokenizer_from_args(a)
        t0 = time.perf_counter()
        if a.cmd == "encode":
            tokens = tok.encode(a.scan)
            out = tokens.save(a.out)
            print(f"{out}: {len(tokens)} tokens on a {'x'.join(map(str, tokens.latent_shape))} grid, window "
                  f"{tokens.window.name}, {time.perf_counter() - t0:.1f} s")
        else:
            hu, affine = tok.decode_hu(a.tokens, original_grid=a.original_grid, depth=a.depth)
            out = save_nifti(a.out, hu, affine)
            print(f"{out}: {'x'.join(map(str, hu.shape))} HU volume ({'original' if a.original_grid else 'cube'} grid), "
                  f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

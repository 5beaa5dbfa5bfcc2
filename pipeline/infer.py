"""Whole-scan encode to tokens and decode back to HU.

Command line (``./run.sh encode`` / ``./run.sh decode``)::

    python -m pipeline.infer encode SCAN OUT.npz --bundle DIR [--ckpt CKPT] [--tile 16] [--device cpu]
    python -m pipeline.infer decode IN.npz OUT.nii.gz --bundle DIR [--original-grid] [--depth D]

``SCAN`` is anything the preprocessing accepts (DICOM folder or .zip, NIfTI, NRRD, MHA). It goes
through the same transforms as training data (``LoadCT``, ``Orientation`` RAS,
``ResampleToCube``, ``ClipHU``, ``BodyMask``, ``Window``, ``Sparsify``), then the model's tiled
``Encode``. The token file (.npz) holds the latent coordinates [M, 3], the code indices [M], the
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
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import quiet_fx_notice
from transforms import WindowSpec
from transforms import parse_window as _parse_window

__all__ = [
    "TokenizerError",
    "CTTokens",
    "Tokenizer",
    "WindowSpec",
    "load_run_config",
    "find_checkpoint",
    "build_network",
    "resolved_network_def",
    "config_value",
    "load_weights",
    "window_from_config",
    "preprocessing_transforms",
    "sparsify",
    "cli_errors",
    "main",
]

logger = logging.getLogger("ctvq.infer")

TOKENS_FORMAT = "ctvq-tokens-1"
DEFAULT_TILE = 16  # latent cells per tile edge (128 voxels) on CPU
# On a GPU, fp16 autocast with 32-cell tiles measured fastest within 16 GB on an H100 for a 512^3
# chest/abdomen (encode 0.78 s + decode 0.47 s, 12.2 GiB; 16-cell tiles: 1.96 s + 0.82 s;
# untiled fails spconv's int32 limit in the last decoder layer).
DEFAULT_TILE_CUDA = 32
_CKPT_RE = re.compile(r"^vqvae_(?:(ema[0-9.]+)_)?step(\d+)\.pt$")


quiet_fx_notice()


class TokenizerError(ValueError):
    """A model, bundle, checkpoint or token file that cannot be used (message: the file and the fix)."""


def _last_line(e: BaseException) -> str:
    """Last line of an exception's message (ConfigParser errors end with the cause), or its type name."""
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


# --------------------------------------------------------------------------------------- windows


def parse_window(spec: Any) -> WindowSpec:
    """``transforms.parse_window`` (the one parser of windows), failing with :class:`TokenizerError`.

    Args:
        spec: the window description.
    """
    try:
        return _parse_window(spec)
    except ValueError as e:
        raise TokenizerError(str(e)) from None


def _window(name: str, width: float, level: float) -> WindowSpec:
    return parse_window((name, width, level))


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


# ----------------------------------------------------------------------------------- model files


def load_run_config(run_dir: str | os.PathLike) -> dict:
    """``RUN_DIR/config.json`` (the resolved training config).

    Args:
        run_dir: run folder, or the config file itself.
    """
    p = Path(run_dir)
    cfg_path = p if p.is_file() else p / "config.json"
    if not cfg_path.is_file():
        raise TokenizerError(f"{cfg_path}: run config not found; pass the run folder written by pipeline.train (it holds config.json)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{cfg_path}: not valid JSON ({e}); restore the run's config.json") from None
    if "network_def" not in cfg:
        raise TokenizerError(f"{cfg_path}: has no 'network_def'; use the config.json written by pipeline.train")
    return cfg


def _ckpt_candidates(ckpt_dir: Path, ema: bool) -> list[tuple[int, Path]]:
    out = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and bool(m.group(1)) == ema:
                out.append((int(m.group(2)), p))
    return sorted(out)


def find_checkpoint(run_dir: str | os.PathLike, ckpt: str | os.PathLike | None = None, weights: str = "ema") -> Path:
    """Checkpoint file of a run: ``ckpt`` itself, or the latest ``vqvae_ema*_step*.pt`` / ``vqvae_step*.pt``.

    Args:
        run_dir: run folder.
        ckpt: a file, a file name inside ``RUN_DIR/ckpts``, ``"latest"`` or None (latest).
        weights: "ema" or "model" (which latest file; EMA falls back to plain weights when absent).
    """
    run_dir = Path(run_dir)
    if ckpt not in (None, "latest"):
        p = Path(ckpt)
        for cand in (p, run_dir / "ckpts" / p.name):
            if cand.is_file():
                return cand
        raise TokenizerError(f"{p}: checkpoint not found; pass an existing file or --ckpt latest")
    found = _ckpt_candidates(run_dir / "ckpts", ema=(weights == "ema"))
    if not found and weights == "ema":
        found = _ckpt_candidates(run_dir / "ckpts", ema=False)
    if not found:
        raise TokenizerError(f"{run_dir / 'ckpts'}: no vqvae_*step*.pt checkpoint; train first or pass --ckpt FILE")
    return found[-1][1]


TRUST_HINT = "write plain values, or pass --trust-bundle (trust=True) if you wrote this file yourself"


def _lookup(cfg: Mapping, ref: str) -> Any:
    node: Any = cfg
    for part in ref.replace("::", "#").split("#"):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(ref)
    return node


def config_value(cfg: Mapping, key: str, source: Any = "config", depth: int = 0) -> Any:
    """``cfg[key]`` read as data: ``@`` references to other keys are followed, ``$`` / ``%``
    expressions and nested ``_target_`` objects are refused (never evaluated).

    Args:
        cfg: config dict (a run's config.json or a bundle's inference.json).
        key: key path (``a#b`` for nesting).
        source: where the config came from (for error messages).
    """
    try:
        node = _lookup(cfg, key)
    except KeyError:
        raise TokenizerError(f"{source}: has no '{key}'; use a run config.json or a bundle's configs/inference.json") from None

    def plain(v: Any, where: str, depth: int) -> Any:
        if depth > 20:
            raise TokenizerError(f"{source}: '{where}' refers to itself through @ references; write its value")
        if isinstance(v, str) and v.startswith("@"):
            return config_value(cfg, v[1:], source, depth + 1)
        if isinstance(v, str) and v.startswith(("$", "%")):
            raise TokenizerError(f"{source}: '{where}' is an expression ({v[:40]!r}), which is not run from a file; {TRUST_HINT}")
        if isinstance(v, Mapping):
            if "_target_" in v and where != "network_def":
                raise TokenizerError(f"{source}: '{where}' builds an object ({v['_target_']!r}), which is not run from a file; {TRUST_HINT}")
            return {str(k): plain(x, f"{where}#{k}", depth) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x, f"{where}#{i}", depth) for i, x in enumerate(v)]
        return v

    return plain(node, key, depth)


def resolved_network_def(cfg: Mapping, source: Any = "config", trust: bool = False) -> dict:
    """``network_def`` of a config as plain values (``@`` references filled in).

    The config is read as data: ``$`` expressions are refused and ``_target_`` must name a model
    class of the ``networks`` package. ``trust=True`` evaluates it with MONAI's ConfigParser instead.

    Args:
        cfg: config dict holding ``network_def`` (a run's config.json or a bundle config).
        source: where the config came from (for error messages).
        trust: evaluate ``$`` expressions (only for a file the user wrote).
    """
    if "network_def" not in cfg:
        raise TokenizerError(f"{source}: has no 'network_def'; use a run config.json or a bundle's configs/inference.json")
    if not trust:
        plain = config_value(cfg, "network_def", source)
        _network_class(plain, source)
        return plain
    from monai.bundle import ConfigParser

    try:
        comp = ConfigParser(dict(cfg)).get_parsed_content("network_def", instantiate=False)
    except Exception as e:
        raise TokenizerError(f"{source}: network_def cannot be resolved ({_last_line(e)}); fix network_def") from None
    plain = comp.get_config() if hasattr(comp, "get_config") else comp
    return json.loads(json.dumps(plain, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _network_class(net_def: Mapping, source: Any) -> type:
    """The model class named by ``network_def#_target_``: a ``torch.nn.Module`` of the ``networks`` package."""
    import networks

    target = str(net_def.get("_target_", ""))
    name = target[len("networks."):] if target.startswith("networks.") else ""
    cls = getattr(networks, name, None) if name and "." not in name else None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TokenizerError(f"{source}: network_def#_target_ {target!r} is not a model of the networks package "
                             f"(e.g. networks.SparseVQVAE); {TRUST_HINT}")
    return cls


def build_network(cfg: Mapping, source: Any = "config", trust: bool = False) -> torch.nn.Module:
    """Build the model of ``network_def`` (read as data, see :func:`resolved_network_def`).

    Args:
        cfg: config dict holding ``network_def``.
        source: where the config came from (for error messages).
        trust: evaluate the config with MONAI's ConfigParser (only for a file the user wrote).
    """
    plain = resolved_network_def(cfg, source, trust)
    try:
        if trust:
            from monai.bundle import ConfigParser

            import networks  # noqa: F401  (the package of the _target_)

            return ConfigParser({"network_def": plain}).get_parsed_content("network_def", instantiate=True)
        cls = _network_class(plain, source)
        return cls(**{k: v for k, v in plain.items() if not str(k).startswith("_")})
    except TokenizerError:
        raise
    except Exception as e:  # bad kwargs, missing package
        raise TokenizerError(f"{source}: network_def cannot be built ({_last_line(e)}); fix network_def or install ctvq") from None


def _template_preprocessing() -> Any:
    """The ``preprocessing`` section of the repository's bundle template (what export ships)."""
    path = Path(__file__).resolve().parents[1] / "bundles" / "ct_vqvae" / "inference.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("preprocessing")
    except (OSError, ValueError):
        return None


def _extract_state_dict(obj: Any, path: Path) -> dict:
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = dict(obj)
    elif isinstance(obj, Mapping):
        for key in ("state_dict", "model", "network", "ema", "vae"):
            if isinstance(obj.get(key), Mapping):
                return _extract_state_dict(obj[key], path)
        raise TokenizerError(f"{path}: holds no model state dict (keys {sorted(obj)[:5]}); pass a vqvae_*step*.pt checkpoint")
    else:
        raise TokenizerError(f"{path}: holds a {type(obj).__name__}, not a state dict; pass a vqvae_*step*.pt checkpoint")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_weights(net: torch.nn.Module, ckpt: str | os.PathLike, config_path: Any = "the config") -> dict:
    """Load a checkpoint into ``net``, refusing one of another model size with one clear line.

    Missing buffers (e.g. usage counters not kept in EMA files) are allowed; missing or
    extra parameters and any shape difference are not.

    Args:
        net: the model built from the matching config.
        ckpt: state-dict file.
        config_path: the config the model came from (named in errors).

    Returns:
        the state dict that was loaded.
    """
    path = Path(ckpt)
    if not path.is_file():
        raise TokenizerError(f"{path}: checkpoint not found; pass an existing vqvae_*step*.pt file")
    from pipeline.io_utils import CheckpointError, load_torch

    try:
        obj = load_torch(path, "re-copy or re-export it")
    except CheckpointError as e:
        raise TokenizerError(str(e)) from None
    sd = _extract_state_dict(obj, path)
    own = net.state_dict()
    params = {n for n, _ in net.named_parameters()}
    shape_diff = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    shape_diff.sort(key=lambda d: (d[0] not in params, d[0]))  # name a weight before a buffer
    missing = [k for k in params if k not in sd]
    extra = [k for k in sd if k not in own]
    if shape_diff or missing or extra:
        parts = []
        if shape_diff:
            k, a, b = shape_diff[0]
            parts.append(f"{len(shape_diff)} shape mismatches, e.g. {k} {list(a)} vs model {list(b)}")
        if missing:
            parts.append(f"{len(missing)} missing weights, e.g. {sorted(missing)[0]}")
        if extra:
            parts.append(f"{len(extra)} unexpected weights, e.g. {sorted(extra)[0]}")
        raise TokenizerError(
            f"{path}: does not match the model of {config_path} ({'; '.join(parts)}); "
            "use the config.json of the run that wrote this checkpoint (or its exported bundle)"
        )
    net.load_state_dict(sd, strict=False)
    return {k: v for k, v in sd.items()}


def _codebook_id(net: torch.nn.Module) -> str:
    """Short hash of what maps codes to vectors: the quantizer's parameters (codebooks, projections)."""
    h = hashlib.sha1()
    for _, w in sorted(net.vq.named_parameters()):
        h.update(w.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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
    from transforms import Sparsify

    import warnings

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


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ------------------------------------------------------------------------------------------ tokens


@dataclass
class CTTokens:
    """Tokens of one scan plus what is needed to go back.

    Attributes:
        coords: [M, 3] int latent cell (i, j, k) of each token.
        indices: int code indices, [M] (one level) or [M, D] (residual levels, coarsest first).
        window: the window the codes describe.
        resolution: cube side R of the processed grid.
        latent_shape: latent grid (R / 8 per axis).
        cube_affine: 4x4 voxel-to-RAS affine of the cube grid.
        source_affine, source_shape: the RAS-oriented scan grid the cube was fitted to.
        original_affine, original_shape: the grid of the file as loaded (for ``--original-grid``).
        source: the scan's path (or "").
        num_embeddings: codebook size; codebook: short hash of the codebook that made the codes.
    """

    coords: np.ndarray
    indices: np.ndarray
    window: WindowSpec
    resolution: int
    latent_shape: tuple
    cube_affine: np.ndarray
    source_affine: np.ndarray | None = None
    source_shape: tuple | None = None
    original_affine: np.ndarray | None = None
    original_shape: tuple | None = None
    source: str = ""
    num_embeddings: int = 0
    codebook: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.indices))

    @property
    def depth(self) -> int:
        """Residual levels the tokens hold (1 for single-level codes)."""
        return 1 if np.ndim(self.indices) == 1 else int(np.shape(self.indices)[1])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokens as a compressed .npz (atomically)."""
        from pipeline.io_utils import atomic_path

        arrays = {
            "format": np.array(TOKENS_FORMAT),
            "coords": self.coords.astype(np.int16 if max(self.latent_shape) < 32768 else np.int32),
            "indices": self.indices.astype(np.int32),
            "window_name": np.array(self.window.name),
            "window_width": np.array(float(self.window.width)),
            "window_level": np.array(float(self.window.level)),
            "resolution": np.array(int(self.resolution)),
            "latent_shape": np.asarray(self.latent_shape, np.int32),
            "cube_affine": np.asarray(self.cube_affine, np.float64),
            "source": np.array(str(self.source)),
            "num_embeddings": np.array(int(self.num_embeddings)),
            "codebook": np.array(str(self.codebook)),
            "depth": np.array(self.depth),
        }
        for key in ("source_affine", "original_affine"):
            if getattr(self, key) is not None:
                arrays[key] = np.asarray(getattr(self, key), np.float64)
        for key in ("source_shape", "original_shape"):
            if getattr(self, key) is not None:
                arrays[key] = np.asarray(getattr(self, key), np.int64)
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CTTokens":
        """Read a token file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: token file not found; write it with `./run.sh encode SCAN {path.name} --bundle DIR`")
        try:
            z = np.load(path, allow_pickle=False)
            fmt = str(z["format"]) if "format" in z.files else ""
        except Exception as e:
            raise TokenizerError(f"{path}: not a token file ({type(e).__name__}); encode the scan again") from None
        if fmt != TOKENS_FORMAT:
            raise TokenizerError(f"{path}: not a ctvq token file (format {fmt!r}); encode the scan again with pipeline.infer encode")
        get = lambda k: z[k] if k in z.files else None  # noqa: E731
        return cls(
            coords=z["coords"].astype(np.int32),
            indices=z["indices"].astype(np.int64),
            window=_window(str(z["window_name"]), float(z["window_width"]), float(z["window_level"])),
            resolution=int(z["resolution"]),
            latent_shape=tuple(int(v) for v in z["latent_shape"]),
            cube_affine=z["cube_affine"],
            source_affine=get("source_affine"),
            source_shape=tuple(int(v) for v in get("source_shape")) if get("source_shape") is not None else None,
            original_affine=get("original_affine"),
            original_shape=tuple(int(v) for v in get("original_shape")) if get("original_shape") is not None else None,
            source=str(z["source"]),
            num_embeddings=int(z["num_embeddings"]),
            codebook=str(z["codebook"]),
        )


# --------------------------------------------------------------------------------------- tokenizer


def _affine_np(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    return np.asarray(_np(x), dtype=np.float64).reshape(4, 4)


class Tokenizer:
    """Scans to tokens and back with a trained sparse VQ-VAE.

    Args:
        network: the model (``networks.SparseVQVAE``) with its weights loaded.
        window: the window the model was trained on.
        resolution: cube side R (default: the model's latent resolution times 8).
        device: torch device (default: CUDA when present, else CPU).
        tile: latent tile edge of the tiled Encode/Decode ("auto": 32 on CUDA, 16 on CPU;
            None: whole volume in one piece).
        amp: fp16 autocast for Encode/Decode (default: on for CUDA, off on CPU).
        preprocessing: dictionary transform from ``{"image": path}`` to ``{"image": window, "body_mask"}``
            (default: :func:`preprocessing_transforms`).
        source: where the model came from (named in errors).
        ckpt_path: optional state-dict file loaded into ``network`` (as a bundle config does).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        window: Any,
        resolution: int | None = None,
        device: str | torch.device | None = None,
        tile: int | str | None = "auto",
        preprocessing: Any = None,
        source: str = "model",
        ckpt_path: str | os.PathLike | None = None,
        amp: bool | None = None,
    ):
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cuda = self.device.type == "cuda"
        self.amp = cuda if amp is None else bool(amp) and cuda
        if tile == "auto":
            tile = DEFAULT_TILE_CUDA if cuda else DEFAULT_TILE
        if ckpt_path is not None:
            load_weights(network, ckpt_path, source)
            source = str(ckpt_path)
        self.network = network.to(self.device).eval()
        self.window = parse_window(window)
        factor = int(getattr(network, "factor", 8))
        self.resolution = int(resolution or int(getattr(network, "resolution", 64)) * factor)
        self.tile = int(tile) if tile else None
        self.source = source
        self._preprocessing = preprocessing
        self.codebook = _codebook_id(network)
        self.num_embeddings = int(network.vq.num_embeddings)
        self.depth = int(getattr(network, "vq_depth", 1))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_checkpoint(
        cls,
        ckpt: str | os.PathLike,
        config: str | os.PathLike | Mapping | None = None,
        device: str | torch.device | None = None,
        trust: bool = False,
        **kwargs: Any,
    ) -> "Tokenizer":
        """Model rebuilt from the run's ``config.json`` ``network_def`` plus a checkpoint.

        Args:
            ckpt: ``RUN_DIR/ckpts/vqvae[_ema...]_stepNNNNNNN.pt``, or a run folder (latest EMA weights).
            config: run config (default: ``RUN_DIR/config.json`` two levels above the checkpoint).
            device: torch device.
            trust: evaluate ``$`` expressions of the config (only for a file you wrote).
            kwargs: passed to :class:`Tokenizer` (``tile``, ``resolution``, ``window``).
        """
        ckpt = Path(ckpt)
        if ckpt.is_dir():
            run_dir = ckpt
            ckpt = find_checkpoint(run_dir)
        else:
            run_dir = ckpt.parent.parent
            if not ckpt.is_file():
                raise TokenizerError(f"{ckpt}: checkpoint not found; pass an existing vqvae_*step*.pt file")
        if isinstance(config, Mapping):
            cfg, cfg_src = dict(config), "the given config"
        else:
            cfg_path = Path(config) if config is not None else run_dir / "config.json"
            if not cfg_path.is_file():
                raise TokenizerError(f"{cfg_path}: run config not found next to {ckpt.name}; pass --config RUN_DIR/config.json")
            cfg, cfg_src = load_run_config(cfg_path), str(cfg_path)
        net = build_network(cfg, cfg_src, trust)
        load_weights(net, ckpt, cfg_src)
        window = kwargs.pop("window", None) or window_from_config(cfg)
        kwargs.setdefault("resolution", cfg.get("resolution"))
        return cls(net, window, device=device, source=str(ckpt), **kwargs)

    @classmethod
    def from_bundle(cls, bundle_dir: str | os.PathLike, device: str | torch.device | None = None, trust: bool = False,
                    **kwargs: Any) -> "Tokenizer":
        """Model, window and settings of a MONAI bundle (``configs/inference.json`` + ``models/model.pt``).

        A bundle from elsewhere is untrusted input: its config is read as data (``network_def``,
        ``window``, ``resolution``, ``tile``; ``$`` expressions refused) and the scans go through
        :func:`preprocessing_transforms`, not the bundle's ``preprocessing`` section. ``trust=True``
        evaluates the config with MONAI's ConfigParser and builds its ``preprocessing``.

        Args:
            bundle_dir: bundle folder (an exported bundle, or a folder holding inference.json and models/).
            device: torch device.
            trust: evaluate the bundle's expressions and transforms (only for a bundle you wrote).
            kwargs: passed to :class:`Tokenizer` (``tile``).
        """
        root = Path(bundle_dir)
        if not root.is_dir():
            raise TokenizerError(f"{root}: bundle folder not found; export one with `./run.sh export --run RUN_DIR --out {root}`")
        cfg_file = next((p for p in (root / "configs" / "inference.json", root / "inference.json") if p.is_file()), None)
        if cfg_file is None:
            raise TokenizerError(f"{root / 'configs' / 'inference.json'}: missing from the bundle; re-export it with `./run.sh export`")
        weights = root / "models" / "model.pt"
        if not weights.is_file():
            raise TokenizerError(f"{weights}: missing from the bundle; re-export it with `./run.sh export` (or copy models/model.pt)")
        try:
            with open(cfg_file, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{cfg_file}: cannot be read ({type(e).__name__}: {e}); re-export the bundle") from None
        if not isinstance(cfg, dict):
            raise TokenizerError(f"{cfg_file}: is not a JSON object; re-export the bundle")
        cfg["bundle_root"] = str(root)
        net = build_network(cfg, str(cfg_file), trust)
        load_weights(net, weights, str(cfg_file))
        settings = {k: config_value(cfg, k, cfg_file) for k in ("window", "window_type", "resolution", "tile") if k in cfg}
        window = window_from_config(settings)
        resolution = kwargs.pop("resolution", None) or settings.get("resolution")
        if "tile" not in kwargs and "tile" in settings:
            kwargs["tile"] = settings["tile"]
        pre = None
        if trust and "preprocessing" in cfg:
            from monai.bundle import ConfigParser

            try:
                pre = ConfigParser(cfg).get_parsed_content("preprocessing")
            except Exception as e:
                raise TokenizerError(f"{cfg_file}: 'preprocessing' cannot be built ({_last_line(e)}); re-export the bundle") from None
        elif "preprocessing" in cfg and cfg["preprocessing"] != _template_preprocessing():
            logger.warning(f"{cfg_file}: its 'preprocessing' differs from ctvq's and is not run (a bundle is read as data); "
                           "scans go through the standard transforms; pass --trust-bundle to run it if you wrote it")
        return cls(net, window, resolution=resolution, device=device, preprocessing=pre, source=str(root), **kwargs)

    # ------------------------------------------------------------------ files
    def run_files(
        self,
        input_files: Sequence[str | os.PathLike] | str,
        output_dir: str | os.PathLike,
        mode: str = "encode",
        original_grid: bool = False,
    ) -> list[Path]:
        """Encode scans to ``<output_dir>/<name>_tokens.npz`` or decode token files to ``<name>_recon.nii.gz``.

        Args:
            input_files: scan paths (encode) or token files (decode); one path or a list.
            output_dir: output folder (created).
            mode: "encode" or "decode".
            original_grid: decode onto the scan's own grid.

        Returns:
            the written files.
        """
        if isinstance(input_files, (str, os.PathLike)):
            input_files = [input_files]
        if mode not in ("encode", "decode"):
            raise TokenizerError(f"mode {mode!r} is unknown; use 'encode' or 'decode'")
        out_dir = Path(output_dir)
        written = []
        for f in input_files:
            name = Path(f).name
            for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".zip", ".npz"):
                if name.endswith(ext):
                    name = name[: -len(ext)]
                    break
            if mode == "decode" and name.endswith("_tokens"):
                name = name[: -len("_tokens")]  # tokens/scan_tokens.npz -> scan_recon.nii.gz
            if mode == "encode":
                written.append(self.encode(f).save(out_dir / f"{name}_tokens.npz"))
            else:
                hu, aff = self.decode_hu(f, original_grid=original_grid)
                written.append(save_nifti(out_dir / f"{name}_recon.nii.gz", hu, aff))
        return written

    # ------------------------------------------------------------------ preprocessing
    @property
    def preprocessing(self):
        if self._preprocessing is None:
            self._preprocessing = preprocessing_transforms(self.window, self.resolution)
        return self._preprocessing

    def preprocess(self, scan: Any) -> dict:
        """Scan path or HU MetaTensor (1, X, Y, Z) -> {"image": window (1, R, R, R), "body_mask"}.

        Args:
            scan: a path (DICOM folder/zip, NIfTI, NRRD, MHA) or a loaded HU MetaTensor.
        """
        try:
            return self._preprocess(scan)
        except RuntimeError as e:  # monai's Compose wraps errors as "applying transform ..."
            cause = e
            while cause is not None and isinstance(cause, RuntimeError) and "applying transform" in str(cause):
                cause = cause.__cause__
            if cause is not None and cause is not e:
                raise cause from None
            raise

    def _preprocess(self, scan: Any) -> dict:
        pre = self.preprocessing
        if isinstance(scan, (str, os.PathLike)):
            return pre({"image": str(scan)})
        from monai.data import MetaTensor

        if not isinstance(scan, MetaTensor):
            raise TypeError("encode takes a scan path or a MetaTensor from transforms.LoadCT")
        steps = list(getattr(pre, "transforms", [pre]))
        if steps and type(steps[0]).__name__ in ("LoadCTd", "LoadImaged"):
            steps = steps[1:]
        meta = {k: v for k, v in scan.meta.items() if k != "affine"}  # given as affine= below
        meta.setdefault("original_affine", scan.affine.clone())
        meta.setdefault("original_shape", [int(s) for s in scan.shape[-3:]])
        scan = MetaTensor(scan.as_tensor().float(), affine=scan.affine, meta=meta)
        d = {"image": scan}
        for t in steps:
            d = t(d)
        return d

    # ------------------------------------------------------------------ encode
    def _check_resolution(self, shape: Sequence[int], what: str) -> None:
        if tuple(int(s) for s in shape[-3:]) != (self.resolution,) * 3:
            raise TokenizerError(
                f"{what}: volume is {tuple(shape[-3:])} but the model works on {self.resolution}^3; "
                f"preprocess with --resolution {self.resolution} or use a model trained at this resolution"
            )

    def encode_arrays(self, window: Any, body_mask: Any, **geometry: Any) -> CTTokens:
        """Window volume + body mask on the cube grid -> tokens (used for processed datasets).

        Args:
            window: window values (R, R, R) or (1, R, R, R).
            body_mask: body mask of the same shape.
            geometry: CTTokens fields (``cube_affine``, ``source_affine``, ``source_shape``,
                ``original_affine``, ``original_shape``, ``source``).
        """
        self._check_resolution(np.shape(window), geometry.get("source") or "input")
        coords, feats = sparsify(window, body_mask, self.device)
        return self.encode_sparse(coords, feats, **geometry)

    @torch.no_grad()
    def encode_sparse(self, coords: Any, feats: Any, **geometry: Any) -> CTTokens:
        """Support voxels of one scan (``transforms.Sparsify`` output) -> tokens.

        Args:
            coords: [N, 3] voxel (i, j, k) on the R^3 cube.
            feats: [N, 1] window values.
            geometry: CTTokens fields (see :meth:`encode_arrays`).
        """
        from networks import make_sparse

        coords = torch.as_tensor(coords).to(torch.int32).reshape(-1, 3)
        feats = torch.as_tensor(feats).float().reshape(-1, 1)
        R = self.resolution
        factor = int(getattr(self.network, "factor", 8))
        if len(coords) and (int(coords.max()) >= R or int(coords.min()) < 0):
            raise TokenizerError(f"{geometry.get('source') or 'input'}: voxel coordinates outside the {R}^3 cube; preprocess at --resolution {R}")
        idx = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32, device=coords.device), coords], 1)
        if len(coords) == 0:
            latent = (R // factor,) * 3
            tc, ti = np.zeros((0, 3), np.int32), np.zeros(0, np.int64)
        else:
            x = make_sparse(feats.to(self.device), idx.to(self.device), [R, R, R], 1)
            with self._autocast():
                tok = self.network.Encode(x, tile=self.tile)
            tc = tok.coords[:, 1:].cpu().numpy().astype(np.int32)
            ti = tok.indices.cpu().numpy().astype(np.int64)
            latent = tuple(int(s) for s in tok.latent_shape)
        cube_affine = geometry.get("cube_affine")
        return CTTokens(
            coords=tc,
            indices=ti,
            window=self.window,
            resolution=R,
            latent_shape=latent,
            cube_affine=_affine_np(cube_affine) if cube_affine is not None else np.eye(4),
            source_affine=_affine_np(geometry.get("source_affine")),
            source_shape=tuple(int(v) for v in geometry["source_shape"][-3:]) if geometry.get("source_shape") is not None else None,
            original_affine=_affine_np(geometry.get("original_affine")),
            original_shape=tuple(int(v) for v in geometry["original_shape"][-3:]) if geometry.get("original_shape") is not None else None,
            source=str(geometry.get("source") or ""),
            num_embeddings=self.num_embeddings,
            codebook=self.codebook,
        )

    def encode(self, scan: Any) -> CTTokens:
        """Scan (path or HU MetaTensor) -> :class:`CTTokens`.

        Args:
            scan: a path (DICOM folder/zip, NIfTI, NRRD, MHA) or a loaded HU MetaTensor.

        Raises:
            transforms.CTLoadError: the preprocessing refuses the scan.
        """
        d = self.preprocess(scan)
        img = d["image"]
        meta = dict(getattr(img, "meta", {}) or {})
        geometry = dict(
            cube_affine=meta.get("cube_affine", getattr(img, "affine", None)),
            source_affine=meta.get("source_affine"),
            source_shape=meta.get("source_shape"),
            original_affine=meta.get("original_affine"),
            original_shape=meta.get("original_shape"),
            source=str(meta.get("filename_or_obj", scan if isinstance(scan, (str, os.PathLike)) else "")),
        )
        for w in meta.get("load_warnings", []):
            logger.warning(f"{geometry['source']}: {w}")
        self._check_resolution(np.shape(img), geometry["source"] or "input")
        if "coords" in d and "feats" in d:
            return self.encode_sparse(d["coords"], d["feats"], **geometry)
        return self.encode_arrays(img, d["body_mask"], **geometry)

    # ------------------------------------------------------------------ decode
    def _check_tokens(self, tokens: CTTokens) -> None:
        if tokens.codebook and tokens.codebook != self.codebook:
            raise TokenizerError(
                f"{tokens.source or 'tokens'}: were made by another model (codebook {tokens.codebook}, this model "
                f"{self.codebook}); decode with the bundle that encoded them"
            )
        if not tokens.window.same_as(self.window):
            raise TokenizerError(
                f"tokens are in window {tokens.window.name} (W{tokens.window.width:g}/L{tokens.window.level:g}) but the "
                f"model is {self.window.name} (W{self.window.width:g}/L{self.window.level:g}); decode with the {tokens.window.name} model"
            )
        if len(tokens) and int(tokens.indices.max()) >= self.num_embeddings:
            raise TokenizerError(f"token index {int(tokens.indices.max())} >= codebook size {self.num_embeddings}; decode with the model that encoded them")
        if tokens.resolution != self.resolution:
            raise TokenizerError(f"tokens are for a {tokens.resolution}^3 cube, the model for {self.resolution}^3; decode with the model that encoded them")
        latent = (self.resolution // int(getattr(self.network, "factor", 8)),) * 3
        if tuple(int(v) for v in tokens.latent_shape) != latent:
            raise TokenizerError(f"{tokens.source or 'tokens'}: latent grid {tuple(tokens.latent_shape)} but the model's is {latent}; "
                                 "decode with the model that encoded them")
        if tokens.depth > self.depth:
            raise TokenizerError(f"{tokens.source or 'tokens'}: {tokens.depth} code levels but the model has {self.depth}; "
                                 "decode with the model that encoded them")
        coords, idx = np.asarray(tokens.coords), np.asarray(tokens.indices)
        if coords.ndim != 2 or coords.shape[1] != 3 or len(coords) != len(idx):
            raise TokenizerError(f"{tokens.source or 'tokens'}: coords {coords.shape} do not match indices {idx.shape}; "
                                 "the token file is damaged, encode the scan again")
        outside = int(np.count_nonzero(np.any((coords < 0) | (coords >= np.asarray(latent)), axis=1))) if len(coords) else 0
        if outside or (len(idx) and int(idx.min()) < 0):
            raise TokenizerError(f"{tokens.source or 'tokens'}: {outside} of {len(coords)} tokens lie outside the {latent} latent grid "
                                 "(or have negative codes); the token file is damaged, encode the scan again")

    @torch.no_grad()
    def decode(self, tokens: CTTokens | str | os.PathLike, depth: int | None = None) -> np.ndarray:
        """Tokens -> window values (R, R, R) float32 in [0, 1] (0 outside the decoded cells).

        Args:
            tokens: :class:`CTTokens` or a token file path.
            depth: decode only the first ``depth`` residual levels (None: all the tokens hold).
        """
        if not isinstance(tokens, CTTokens):
            tokens = CTTokens.load(tokens)
        self._check_tokens(tokens)
        if depth is not None and not 1 <= int(depth) <= tokens.depth:
            raise TokenizerError(f"--depth {depth}: {tokens.source or 'the tokens'} hold {tokens.depth} level(s); "
                                 f"pass a depth from 1 to {tokens.depth}")
        R = self.resolution
        if len(tokens) == 0:
            return np.zeros((R, R, R), np.float32)
        from networks import Tokens
        from networks.ops import in_box, linearize

        coords = torch.as_tensor(tokens.coords, dtype=torch.int32)
        coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1)
        tok = Tokens(coords.to(self.device), torch.as_tensor(tokens.indices, dtype=torch.int64).to(self.device), 1, tuple(tokens.latent_shape))
        with self._autocast():
            rec = self.network.Decode(tok, tile=self.tile, depth=None if tokens.depth == 1 else depth)
        # scattered into the cube where the reconstruction is (the GPU), one copy to the host;
        # voxels outside the cube go to one spare element at the end
        inside = in_box(rec.indices[:, 1:], (0, 0, 0), (R, R, R))
        flat = torch.where(inside, linearize(rec.indices, (R, R, R)), R**3)
        cube = torch.zeros(R**3 + 1, dtype=torch.float32, device=rec.features.device)
        cube.scatter_(0, flat, rec.features[:, 0].float().clamp_(0.0, 1.0))
        return cube[:-1].view(R, R, R).cpu().numpy()

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.amp)

    def to_hu(self, window_values: np.ndarray) -> np.ndarray:
        """Window values -> HU: ``level - width / 2 + v * width``."""
        return (self.window.lower + window_values * self.window.width).astype(np.float32)

    def decode_hu(self, tokens: CTTokens | str | os.PathLike, original_grid: bool = False,
                  depth: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokens -> (HU volume, 4x4 RAS affine), on the cube grid or the scan's original grid.

        Args:
            tokens: :class:`CTTokens` or a token file path.
            original_grid: resample onto the grid and affine of the scan as loaded.
            depth: decode only the first ``depth`` residual levels (None: all).
        """
        if not isinstance(tokens, CTTokens):
            tokens = CTTokens.load(tokens)
        hu = self.to_hu(self.decode(tokens, depth))
        if not original_grid:
            return hu, np.asarray(tokens.cube_affine, np.float64)
        target_aff = tokens.original_affine if tokens.original_affine is not None else tokens.source_affine
        target_shape = tokens.original_shape if tokens.original_shape is not None else tokens.source_shape
        if target_aff is None or target_shape is None:
            raise TokenizerError("tokens carry no source geometry; decode without --original-grid (cube grid)")
        from transforms import resample_to_source

        meta = {"cube_affine": tokens.cube_affine, "source_affine": target_aff, "source_shape": list(target_shape)}
        out = resample_to_source(hu, meta, mode="bilinear", padding_value=float(self.window.lower))
        return np.asarray(_np(out), np.float32), np.asarray(target_aff, np.float64)


def save_nifti(path: str | os.PathLike, volume: np.ndarray, affine: np.ndarray, dtype=np.int16) -> Path:
    """Write a volume as NIfTI with the given RAS affine (atomically).

    Args:
        path: output .nii or .nii.gz.
        volume: (X, Y, Z) array.
        affine: 4x4 voxel-to-RAS affine.
        dtype: stored dtype (int16 for HU).
    """
    import nibabel as nib

    from pipeline.io_utils import atomic_path

    path = Path(path)
    arr = np.asarray(volume)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        arr = np.clip(np.round(arr), info.min, info.max)
    img = nib.Nifti1Image(arr.astype(dtype), np.asarray(affine, np.float64))
    img.set_qform(np.asarray(affine, np.float64), code=1)
    img.set_sform(np.asarray(affine, np.float64), code=1)
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    with atomic_path(path) as tmp:
        t = tmp.with_name(tmp.name + suffix)
        nib.save(img, str(t))
        os.replace(t, tmp)
    return path


# ------------------------------------------------------------------------------------------- CLI


@contextlib.contextmanager
def cli_errors():
    """Turn known failures into one line on stderr and exit code 2 (``CTVQ_DEBUG=1`` keeps tracebacks)."""
    try:
        from transforms import CTLoadError
    except Exception:  # pragma: no cover
        CTLoadError = TokenizerError  # type: ignore
    try:
        yield
    except (TokenizerError, CTLoadError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("CTVQ_DEBUG"):
            raise
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


def _tokenizer_from_args(a) -> Tokenizer:
    kw: dict[str, Any] = {}
    if a.tile is not None:
        kw["tile"] = a.tile or None
    if a.bundle:
        return Tokenizer.from_bundle(a.bundle, device=a.device, trust=a.trust_bundle, **kw)
    if a.ckpt:
        return Tokenizer.from_checkpoint(a.ckpt, config=a.config, device=a.device, trust=a.trust_bundle, **kw)
    raise TokenizerError("no model given; pass --bundle DIR (an exported bundle) or --ckpt RUN_DIR/ckpts/FILE.pt")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.infer", description="Encode CT scans to tokens and decode them back.")
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
    e.add_argument("out", help="output token file (.npz)")
    model_args(e)
    d = sub.add_parser("decode", help="tokens .npz -> NIfTI in HU")
    d.add_argument("tokens", help="token file from encode")
    d.add_argument("out", help="output .nii.gz")
    d.add_argument("--original-grid", action="store_true", help="resample onto the scan's own grid and affine")
    d.add_argument("--depth", type=int, default=None,
                   help="decode the first DEPTH residual code levels (default: all the token file holds)")
    model_args(d)
    a = p.parse_args(argv)
    with cli_errors():
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

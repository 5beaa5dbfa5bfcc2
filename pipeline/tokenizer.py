"""Scans to tokens and back with a trained sparse VQ-VAE (``Tokenizer``).

A scan goes through the preprocessing transforms (``pipeline.infer.preprocessing_transforms``)
and the model's tiled ``Encode``; tokens go through the tiled ``Decode`` into the cube, and back
to HU (``HU = level - width / 2 + v * width``) on the cube grid or the scan's own grid.

The window parsing, the preprocessing transforms and the tile defaults come from ``pipeline.infer``
(the command line), which loads this module when its ``Tokenizer`` is first used.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import quiet_fx_notice
from pipeline.infer import DEFAULT_TILE, DEFAULT_TILE_CUDA
from pipeline.io_utils import TokenizerError, save_nifti
from pipeline.config_data import config_value, last_line
from pipeline.runs import codebook_id, load_bundle, load_run_model, load_weights
from pipeline.tokens import CTTokens
from transforms import window_to_hu

__all__ = ["DEFAULT_TILE", "DEFAULT_TILE_CUDA", "Tokenizer", "resolve_device"]

logger = logging.getLogger("ctvq.infer")

quiet_fx_notice()


def _template_preprocessing() -> Any:
    """The ``preprocessing`` section of the repository's bundle template (what export ships)."""
    path = Path(__file__).resolve().parents[1] / "bundles" / "ct_vqvae" / "inference.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("preprocessing")
    except (OSError, ValueError):
        return None


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _affine_np(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    return np.asarray(_np(x), dtype=np.float64).reshape(4, 4)


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The device to run on (default: CUDA when present); one line for a name torch does not know or a
    GPU this machine does not have."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise TokenizerError(f"device {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TokenizerError(f"device {spec!r}: no CUDA GPU is visible here; use cpu")
    return device


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
        self.device = resolve_device(device)
        cuda = self.device.type == "cuda"
        if isinstance(tile, int) and tile < 0:
            raise TokenizerError(f"tile {tile}: give a latent tile edge >= 1 (latent cells), or 0 for whole scans untiled")
        self.amp = cuda if amp is None else bool(amp) and cuda
        if tile == "auto":
            tile = DEFAULT_TILE_CUDA if cuda else DEFAULT_TILE
        if ckpt_path is not None:
            load_weights(network, ckpt_path, source)
            source = str(ckpt_path)
        from pipeline.infer import parse_window

        self.network = network.to(self.device).eval()
        self.window = parse_window(window)
        factor = int(getattr(network, "factor", 8))
        self.resolution = int(resolution or int(getattr(network, "resolution", 64)) * factor)
        self.tile = int(tile) if tile else None
        self.source = source
        self._preprocessing = preprocessing
        self.codebook = codebook_id(network)
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
        from pipeline.infer import window_from_config

        net, cfg, ckpt = load_run_model(ckpt, config, trust)
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
        from pipeline.infer import window_from_config

        net, cfg, cfg_file = load_bundle(bundle_dir, trust)
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
                raise TokenizerError(f"{cfg_file}: 'preprocessing' cannot be built ({last_line(e)}); re-export the bundle") from None
        elif "preprocessing" in cfg and cfg["preprocessing"] != _template_preprocessing():
            logger.warning(f"{cfg_file}: its 'preprocessing' differs from ctvq's and is not run (a bundle is read as data); "
                           "scans go through the standard transforms; pass --trust-bundle to run it if you wrote it")
        return cls(net, window, resolution=resolution, device=device, preprocessing=pre, source=str(Path(bundle_dir)), **kwargs)

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

        A bad input is logged in one line and skipped; the others are still written, and a
        :class:`TokenizerError` at the end counts the failures.
        """
        from pipeline.config_data import last_line

        if isinstance(input_files, (str, os.PathLike)):
            input_files = [input_files]
        if mode not in ("encode", "decode"):
            raise TokenizerError(f"mode {mode!r} is unknown; use 'encode' or 'decode'")
        out_dir = Path(output_dir)
        written, failed = [], []
        for f in input_files:
            name = Path(f).name
            for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".zip", ".npz"):
                if name.endswith(ext):
                    name = name[: -len(ext)]
                    break
            if mode == "decode" and name.endswith("_tokens"):
                name = name[: -len("_tokens")]  # tokens/scan_tokens.npz -> scan_recon.nii.gz
            try:
                if mode == "encode":
                    written.append(self.encode(f).save(out_dir / f"{name}_tokens.npz"))
                else:
                    hu, aff = self.decode_hu(f, original_grid=original_grid)
                    written.append(save_nifti(out_dir / f"{name}_recon.nii.gz", hu, aff))
            except (ValueError, OSError) as e:  # TokenizerError and CTLoadError are ValueErrors
                failed.append(f)
                logger.error(f"skipped {f}: {last_line(e)}")
                continue
            logger.info(f"{mode}d {f} -> {written[-1]}")
        if failed:
            raise TokenizerError(f"{len(failed)} of {len(input_files)} input(s) failed, e.g. {failed[0]} (see the lines "
                                 f"above); {len(written)} written to {out_dir}")
        return written

    # ------------------------------------------------------------------ preprocessing
    @property
    def preprocessing(self):
        if self._preprocessing is None:
            from pipeline.infer import preprocessing_transforms

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
        from pipeline.infer import sparsify

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
        coords = torch.as_tensor(coords).to(torch.int32).reshape(-1, 3)
        R = self.resolution
        factor = int(getattr(self.network, "factor", 8))
        if len(coords) and (int(coords.max()) >= R or int(coords.min()) < 0):
            raise TokenizerError(f"{geometry.get('source') or 'input'}: voxel coordinates outside the {R}^3 cube; preprocess at --resolution {R}")
        if len(coords) == 0:
            latent = (R // factor,) * 3
            tc, ti = np.zeros((0, 3), np.int32), np.zeros(0, np.int64)
        else:
            x = self._sparse_input(coords, feats)
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
    @staticmethod
    def _load_tokens(tokens: CTTokens | str | os.PathLike) -> tuple[CTTokens, str]:
        """The tokens, and how errors name them: the token file, else the scan they came from."""
        if isinstance(tokens, CTTokens):
            return tokens, f"the tokens of {tokens.source}" if tokens.source else "the tokens"
        return CTTokens.load(tokens), str(tokens)

    def _check_tokens(self, tokens: CTTokens, name: str) -> None:
        if tokens.codebook and tokens.codebook != self.codebook:
            raise TokenizerError(
                f"{name}: tokens made by another model (codebook {tokens.codebook}, this model "
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
            raise TokenizerError(f"{name}: latent grid {tuple(tokens.latent_shape)} but the model's is {latent}; "
                                 "decode with the model that encoded them")
        if tokens.depth > self.depth:
            raise TokenizerError(f"{name}: {tokens.depth} code levels but the model has {self.depth}; "
                                 "decode with the model that encoded them")
        coords, idx = np.asarray(tokens.coords), np.asarray(tokens.indices)
        if coords.ndim != 2 or coords.shape[1] != 3 or len(coords) != len(idx):
            raise TokenizerError(f"{name}: coords {coords.shape} do not match indices {idx.shape}; "
                                 "the token file is damaged, encode the scan again")
        outside = int(np.count_nonzero(np.any((coords < 0) | (coords >= np.asarray(latent)), axis=1))) if len(coords) else 0
        if outside or (len(idx) and int(idx.min()) < 0):
            raise TokenizerError(f"{name}: {outside} of {len(coords)} tokens lie outside the {latent} latent grid "
                                 "(or have negative codes); the token file is damaged, encode the scan again")

    @torch.no_grad()
    def decode(self, tokens: CTTokens | str | os.PathLike, depth: int | None = None) -> np.ndarray:
        """Tokens -> window values (R, R, R) float32 in [0, 1] (0 outside the decoded cells).

        Args:
            tokens: :class:`CTTokens` or a token file path.
            depth: decode only the first ``depth`` residual levels (None: all the tokens hold).
        """
        return self._decode(*self._load_tokens(tokens), depth)

    def _decode(self, tokens: CTTokens, name: str, depth: int | None) -> np.ndarray:
        self._check_tokens(tokens, name)
        if depth is not None and not 1 <= int(depth) <= tokens.depth:
            raise TokenizerError(f"--depth {depth}: {name} holds {tokens.depth} level(s); "
                                 f"pass a depth from 1 to {tokens.depth}")
        R = self.resolution
        if len(tokens) == 0:
            return np.zeros((R, R, R), np.float32)
        from networks import Tokens

        coords = torch.as_tensor(tokens.coords, dtype=torch.int32)
        coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1)
        tok = Tokens(coords.to(self.device), torch.as_tensor(tokens.indices, dtype=torch.int64).to(self.device), 1, tuple(tokens.latent_shape))
        with self._autocast():
            rec = self.network.Decode(tok, tile=self.tile, depth=None if tokens.depth == 1 else depth)
        return self._to_cube(rec)

    @torch.no_grad()
    def latents(self, window: Any, body_mask: Any) -> torch.Tensor:
        """The encoder's continuous latents of one scan (before quantisation): [M, D] fp32 on the
        tokenizer's device, one row per token :meth:`encode_arrays` would give."""
        from pipeline.infer import sparsify

        coords, feats = sparsify(window, body_mask, self.device)
        if len(coords) == 0:
            return torch.zeros(0, int(self.network.latent_channels), device=self.device)
        with self._autocast():
            return self.network.encode_latent(self._sparse_input(coords, feats), tile=self.tile).features.float()

    @torch.no_grad()
    def reconstruct_unquantized(self, window: Any, body_mask: Any) -> np.ndarray:
        """Window values decoded from the encoder's continuous latents, the quantiser left out: the
        fidelity the autoencoder allows, against which the tokens' loss to quantisation shows."""
        from pipeline.infer import sparsify

        coords, feats = sparsify(window, body_mask, self.device)
        if len(coords) == 0:
            return np.zeros((self.resolution,) * 3, np.float32)
        with self._autocast():
            x = self._sparse_input(coords, feats)
            rec = self.network.decode_latent(self.network.encode_latent(x, tile=self.tile), tile=self.tile)
        return self._to_cube(rec)

    def _sparse_input(self, coords: torch.Tensor, feats: Any):
        """One scan's support voxels (coords [N, 3] on the cube, feats [N, 1]) as the model's input."""
        from networks import make_sparse

        idx = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32, device=coords.device), coords.to(torch.int32)], 1)
        feats = torch.as_tensor(feats).float().reshape(-1, 1)
        return make_sparse(feats.to(self.device), idx.to(self.device), [self.resolution] * 3, 1)

    def _to_cube(self, rec) -> np.ndarray:
        """A decoded sparse volume -> (R, R, R) float32 window values in [0, 1], 0 elsewhere."""
        from networks.ops import in_box, linearize

        R = self.resolution
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
        """Window values -> HU: ``level - width / 2 + v * width`` (:func:`transforms.window_to_hu`)."""
        return window_to_hu(window_values, self.window.width, self.window.level).astype(np.float32)

    def decode_hu(self, tokens: CTTokens | str | os.PathLike, original_grid: bool = False,
                  depth: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokens -> (HU volume, 4x4 RAS affine), on the cube grid or the scan's original grid.

        Args:
            tokens: :class:`CTTokens` or a token file path.
            original_grid: resample onto the grid and affine of the scan as loaded.
            depth: decode only the first ``depth`` residual levels (None: all).
        """
        tokens, name = self._load_tokens(tokens)
        hu = self.to_hu(self._decode(tokens, name, depth))
        if not original_grid:
            return hu, np.asarray(tokens.cube_affine, np.float64)
        target_aff = tokens.original_affine if tokens.original_affine is not None else tokens.source_affine
        target_shape = tokens.original_shape if tokens.original_shape is not None else tokens.source_shape
        if target_aff is None or target_shape is None:
            raise TokenizerError("tokens carry no source geometry; decode without --original-grid (cube grid)")
        from transforms import resample_to_source

        meta = {"cube_affine": tokens.cube_affine, "source_affine": target_aff, "source_shape": list(target_shape)}
        out = resample_to_source(hu, meta, mode="bilinear", padding_value=self.window.low)
        return np.asarray(_np(out), np.float32), np.asarray(target_aff, np.float64)

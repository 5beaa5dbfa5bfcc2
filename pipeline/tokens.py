"""The token file of one scan (``CTTokens``, a compressed ``.npz``): latent coordinates [M, 3],
code indices [M] (or [M, D] for D residual levels), the window, and the geometry to go back
(cube affine, source and original grids), plus the codebook hash of the model that made them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.io_utils import TokenizerError, atomic_path
from transforms import WindowSpec

__all__ = ["TOKENS_FORMAT", "CTTokens"]

TOKENS_FORMAT = "ctvq-tokens-1"


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
        source: the scan's path (or ""); a saved file keeps its last part only, as token files
            are shared and clinical folder names often identify the patient.
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
            "source": np.array(Path(str(self.source)).name if self.source else ""),
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
        from pipeline.infer import parse_window

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
            window=parse_window({"name": str(z["window_name"]), "width": float(z["window_width"]), "level": float(z["window_level"])}),
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

"""Chunked, compressed 3-D arrays in one file: a training crop decodes only the chunks it touches.

File: ``CTVQCHK1``, the header length (8 bytes, little-endian), a JSON header (shape, dtype,
chunk edge, numcodecs codec config, ``axes``: the array's axes in its memory order, byte offset
and length of every chunk in C order over the chunk grid of those axes), then the compressed
chunks. Chunks are cut in the array's own memory order (a Fortran-ordered cube is not
transposed, which would cost more than compressing it). Chunks are Blosc (LZ4, bit-shuffle) by default: on
int16 CT they compress about 2.3x and decode at several GB/s (bench/README.md, "Processed
layout"). Writes are atomic (temporary name, then rename).

    save_chunked(path, array)
    ChunkedArray(path).read(((i0, i1), (j0, j1), (k0, k1)))   # any box, inside or partly outside
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from pathlib import Path
from typing import Sequence

import numcodecs
import numpy as np
from numcodecs import Blosc

from pipeline.io_utils import DataFileError, atomic_path

__all__ = ["CHUNK", "CODEC", "save_chunked", "ChunkedArray"]

numcodecs.blosc.use_threads = False  # context-based calls: no global thread pool, safe in forked workers
MAGIC = b"CTVQCHK1"
CHUNK = 32
CODEC = {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": Blosc.BITSHUFFLE, "blocksize": 0}


def _grid(shape: Sequence[int], chunk: int) -> list[range]:
    return [range(0, int(s), chunk) for s in shape]


def save_chunked(path: str | os.PathLike, array: np.ndarray, dtype=None, chunk: int = CHUNK) -> int:
    """Write ``array`` (any memory order) as chunks of ``chunk``^3, cast to ``dtype`` per chunk.

    Returns:
        the file size in bytes.
    """
    dtype = np.dtype(dtype or array.dtype)
    codec = numcodecs.get_codec(dict(CODEC))
    axes = sorted(range(array.ndim), key=lambda d: (-array.strides[d], d))
    stored = array.transpose(axes)
    blobs, index, offset = [], [], 0
    for i, j, k in itertools.product(*_grid(stored.shape, chunk)):
        part = np.ascontiguousarray(stored[i:i + chunk, j:j + chunk, k:k + chunk], dtype=dtype)
        blob = codec.encode(part)
        blobs.append(blob)
        index.append([offset, len(blob)])
        offset += len(blob)
    header = json.dumps({"shape": [int(s) for s in array.shape], "dtype": dtype.str, "chunk": chunk,
                         "codec": CODEC, "axes": axes, "chunks": index}).encode()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            for blob in blobs:
                f.write(blob)
    return Path(path).stat().st_size


class ChunkedArray:
    """Read side of :func:`save_chunked`: ``shape``, ``dtype`` and :meth:`read` of a box."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(16)
                if head[:8] != MAGIC:
                    raise ValueError("not a ctvq chunked array")
                (n,) = struct.unpack("<Q", head[8:16])
                meta = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise self._damaged(e) from None
        self.data_start = 16 + n
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["dtype"])
        self.chunk = int(meta["chunk"])
        self.codec = numcodecs.get_codec(dict(meta["codec"]))
        self.index = meta["chunks"]
        self.axes = list(meta.get("axes", range(len(self.shape))))
        self.stored_shape = tuple(self.shape[a] for a in self.axes)
        self.grid = [max(1, -(-s // self.chunk)) for s in self.stored_shape]

    def _damaged(self, e: BaseException) -> DataFileError:
        what = " ".join(str(e).split())[:100] or type(e).__name__
        return DataFileError(f"{self.path}: damaged chunked array ({what}); rerun ./run.sh preprocess on its dataset "
                             "(it redoes the case) or delete the case folder")

    def read(self, box: Sequence[Sequence[int]] | None = None, fill=0) -> np.ndarray:
        """The values inside ``box`` ((lo, hi) per axis, may reach outside the array: ``fill`` there)."""
        box = [(0, s) for s in self.shape] if box is None else [(int(a), int(b)) for a, b in box]
        out = self._read_stored([box[a] for a in self.axes], fill)
        return out.transpose(np.argsort(self.axes))

    def _read_stored(self, box: list[tuple[int, int]], fill) -> np.ndarray:
        out = np.full([b - a for a, b in box], fill, dtype=self.dtype)
        inner = [(max(a, 0), min(b, s)) for (a, b), s in zip(box, self.stored_shape)]
        if any(a >= b for a, b in inner):
            return out
        c = self.chunk
        ranges = [range(a // c, (b - 1) // c + 1) for a, b in inner]
        with open(self.path, "rb") as f:
            for ci, cj, ck in itertools.product(*ranges):
                offset, nbytes = self.index[(ci * self.grid[1] + cj) * self.grid[2] + ck]
                f.seek(self.data_start + offset)
                lo = (ci * c, cj * c, ck * c)
                shape = [min(c, s - l) for s, l in zip(self.stored_shape, lo)]
                try:
                    part = np.frombuffer(self.codec.decode(f.read(nbytes)), dtype=self.dtype).reshape(shape)
                except (RuntimeError, ValueError) as e:
                    raise self._damaged(e) from None
                src, dst = [], []
                for ax, (a, b) in enumerate(inner):
                    s0, s1 = max(a, lo[ax]), min(b, lo[ax] + shape[ax])
                    src.append(slice(s0 - lo[ax], s1 - lo[ax]))
                    dst.append(slice(s0 - box[ax][0], s1 - box[ax][0]))
                out[tuple(dst)] = part[tuple(src)]
        return out

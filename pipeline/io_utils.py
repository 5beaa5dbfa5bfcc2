"""Atomic file writes: every output is written under a temporary name, then renamed.

A reader (or a rerun after a crash) therefore sees either the old file, the new file, or
nothing, never a half-written one. Temporary names start with ``.`` and contain ``.tmp-``
so they are easy to recognise and clean up (:func:`remove_stale_tmp`).

Typical use::

    save_npy(case_dir / "ct.npy", array)              # whole array at once
    with open_npy_atomic(path, shape, np.float16) as out:  # filled slab by slab
        for sl in slabs:
            out[sl] = compute(sl)
    save_json(case_dir / "case.json", info)
    save_csv(ds_dir / "metadata.csv", rows, columns)
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

__all__ = [
    "TMP_TAG",
    "tmp_name",
    "atomic_path",
    "save_bytes",
    "save_text",
    "save_json",
    "load_json",
    "save_csv",
    "save_npy",
    "open_npy_atomic",
    "remove_stale_tmp",
    "rmtree_quiet",
    "CheckpointError",
    "TokenizerError",
    "DataFileError",
    "load_npy",
    "load_torch",
    "save_nifti",
    "FolderLock",
]

TMP_TAG = ".tmp-"


def tmp_name(path: str | os.PathLike) -> Path:
    """Temporary sibling of ``path`` (same folder, so ``os.replace`` is atomic).

    Args:
        path: final destination.
    """
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Context manager yielding a temporary path that replaces ``path`` on success.

    The parent folder is created. On an exception the temporary file is removed and
    ``path`` is left untouched.

    Args:
        path: final destination.
        fsync: flush the file (and folder) to disk before the rename (survives power loss,
            costs time on big files; a killed process is safe without it).
    """
    path = Path(path)
    if path.is_dir():  # os.replace would fail only after the caller's work; say so before it
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file to write", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: destination file.
        data: content.
        fsync: see :func:`atomic_path`.
    """
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def save_text(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    """Write a UTF-8 text file atomically.

    Args:
        path: destination file.
        text: content.
        fsync: see :func:`atomic_path`.
    """
    return save_bytes(path, text.encode("utf-8"), fsync=fsync)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # torch tensors
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON; convert it to a list, number or str")


def save_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, fsync: bool = False) -> Path:
    """Write ``obj`` as JSON atomically (numpy scalars/arrays and paths are converted).

    Args:
        path: destination file.
        obj: JSON-serialisable object.
        indent: JSON indentation (None for compact).
        fsync: see :func:`atomic_path`.
    """
    text = json.dumps(obj, indent=indent, default=_json_default, allow_nan=True)
    return save_text(path, text + "\n", fsync=fsync)


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file.

    Args:
        path: file to read.
    """
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_csv(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    fsync: bool = False,
) -> Path:
    """Write rows (dicts) as CSV atomically.

    Args:
        path: destination file.
        rows: one mapping per row; missing keys are written empty, extra keys appended as
            columns in first-seen order.
        columns: leading column order (default: first-seen key order).
        fsync: see :func:`atomic_path`.
    """
    rows = list(rows)
    cols = list(columns or [])
    for row in rows:
        for key in row:
            if key not in cols:
                cols.append(key)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return save_text(path, buf.getvalue(), fsync=fsync)


def save_npy(path: str | os.PathLike, array: Any, dtype: Any = None, fsync: bool = False) -> Path:
    """Save an array as ``.npy`` atomically.

    Args:
        path: destination file (``.npy``).
        array: numpy array or torch tensor (moved to CPU).
        dtype: cast to this dtype while writing (no extra full-size copy when the array
            already has it).
        fsync: see :func:`atomic_path`.
    """
    if hasattr(array, "detach"):  # torch tensor / MetaTensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if dtype is not None and array.dtype != np.dtype(dtype):
        with open_npy_atomic(path, array.shape, dtype, fsync=fsync) as out:
            step = max(1, (1 << 24) // max(1, int(np.prod(array.shape[1:], dtype=np.int64))))
            for start in range(0, array.shape[0] if array.ndim else 1, step):
                if array.ndim:
                    out[start : start + step] = array[start : start + step]
                else:
                    out[...] = array
        return Path(path)
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            _write_npy(f, array)
    return Path(path)


def _write_npy(f, array: np.ndarray) -> None:
    """Write ``array`` as .npy in its own memory order (C or Fortran), never transposing it.

    C- and F-contiguous arrays go straight to ``np.lib.format.write_array``. A strided view
    (e.g. a crop of a padded buffer) is written slab by slab in the order its strides suggest,
    with ``fortran_order`` set accordingly, so the file reads back as the same array.
    """
    fmt = np.lib.format
    if array.ndim < 2 or array.flags.c_contiguous or array.flags.f_contiguous:
        fmt.write_array(f, array, allow_pickle=False)
        return
    strides = [abs(s) for s in array.strides]
    fortran = strides[0] < strides[-1]
    data = array.T if fortran else array  # C-like traversal of memory order
    header = fmt.header_data_from_array_1_0(array)
    header["fortran_order"] = bool(fortran)
    fmt.write_array_header_1_0(f, header)
    per_row = max(1, int(np.prod(data.shape[1:])) * data.itemsize)
    step = max(1, (16 << 20) // per_row)
    for s in range(0, data.shape[0], step):
        f.write(np.ascontiguousarray(data[s : s + step]).data)


class _NpyOut:
    """Writable ``.npy`` opened under a temporary name (see :func:`open_npy_atomic`)."""

    def __init__(self, path: Path, shape: Sequence[int], dtype: Any, fsync: bool):
        self.path = Path(path)
        self.tmp = tmp_name(self.path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))

    def commit(self) -> None:
        self.array.flush()
        mm = getattr(self.array, "_mmap", None)
        del self.array
        if mm is not None:
            mm.close()
        if self.fsync:
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            del self.array
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


@contextlib.contextmanager
def open_npy_atomic(path: str | os.PathLike, shape: Sequence[int], dtype: Any, fsync: bool = False):
    """Open a ``.npy`` for writing in place (memory-mapped), renamed into ``path`` on exit.

    Lets a caller fill a big array slab by slab without holding it in memory twice.

    Args:
        path: destination file.
        shape: array shape.
        dtype: array dtype.
        fsync: see :func:`atomic_path`.

    Yields:
        a writable ``numpy.memmap``.
    """
    out = _NpyOut(Path(path), shape, dtype, fsync)
    try:
        yield out.array
    except BaseException:
        out.abort()
        raise
    out.commit()


def remove_stale_tmp(folder: str | os.PathLike, recursive: bool = True) -> int:
    """Delete temporary files left behind by a killed writer.

    Only call this when no other process writes into ``folder``.

    Args:
        folder: folder to clean.
        recursive: also clean sub-folders.

    Returns:
        number of files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    walker = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for root, _dirs, files in walker:
        for name in files:
            if name.startswith(".") and TMP_TAG in name:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(root, name))
                    removed += 1
    return removed


def rmtree_quiet(path: str | os.PathLike) -> None:
    """Remove a folder tree, ignoring a missing path.

    Args:
        path: folder to remove.
    """
    shutil.rmtree(path, ignore_errors=True)


class DataFileError(ValueError):
    """A processed data file that cannot be read (message: the file and the fix)."""


def load_npy(path: str | os.PathLike, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of a processed ``.npy`` (no pickles), errors as one :class:`DataFileError` line.

    Args:
        path: the file.
        mmap_mode: ``"r"`` to memory-map it.
    """
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except PermissionError:
        raise DataFileError(f"{path}: no permission to read it; fix its permissions (chmod a+r)") from None
    except (ValueError, OSError, EOFError) as e:  # truncated ("mmap length is greater than file size"), bad header
        what = " ".join(str(e).split())[:100] or type(e).__name__
        raise DataFileError(f"{path}: damaged array ({what}); rerun ./run.sh preprocess on its dataset "
                            "(it redoes the case) or delete the case folder") from None


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (message: the file and the fix)."""


class TokenizerError(ValueError):
    """A model, bundle, checkpoint or token file that cannot be used (message: the file and the fix)."""


def load_torch(path: str | os.PathLike, fix: str = "resume from an earlier step (--ckpt N) or re-copy the run folder") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, errors as one :class:`CheckpointError` line.

    Only tensors, numbers, strings, lists, tuples and dicts load: a file that needs anything else
    (e.g. a crafted pickle that would run code) is refused, never executed.

    Args:
        path: checkpoint file.
        fix: what the user should do when the file cannot be read (ends the message).
    """
    import pickle

    import torch

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty checkpoint file (0 bytes, an interrupted copy?); {fix}")
        return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found; {fix}") from None
    except PermissionError:
        raise CheckpointError(f"{path}: no permission to read the checkpoint; fix its permissions (chmod u+r)") from None
    except pickle.UnpicklingError as e:
        what = " ".join(str(e).split("\n")[0].split())[:160]
        raise CheckpointError(f"{path}: refused: the checkpoint holds more than tensors and numbers ({what}); "
                              f"only load files you trust, {fix}") from None
    except Exception as e:  # truncated zip, bad magic number, short read
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: {type(e).__name__}); {fix}") from None


def save_nifti(path: str | os.PathLike, volume: np.ndarray, affine: np.ndarray, dtype=np.int16) -> Path:
    """Write a volume as NIfTI with the given RAS affine (atomically).

    Args:
        path: output .nii or .nii.gz.
        volume: (X, Y, Z) array.
        affine: 4x4 voxel-to-RAS affine.
        dtype: stored dtype (int16 for HU).
    """
    import nibabel as nib

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


class FolderLock:
    """Exclusive advisory lock on a folder (``flock`` on ``folder/name``), released by the OS when the
    process ends, even by kill -9. Taking a lock this process already holds on the same folder is a
    no-op. Use ``acquire()`` / ``release()`` or ``with FolderLock(...):``.

    Args:
        folder: the folder to lock (created).
        name: lock file name inside it.
        busy: message of the ``FileExistsError`` raised when another process holds the lock.
        wait: block until the lock is free instead of raising.
    """

    _held: dict[str, int] = {}

    def __init__(self, folder: str | os.PathLike, name: str, busy: str = "", wait: bool = False):
        self.path = Path(folder) / name
        self.busy = busy
        self.wait = wait

    def acquire(self) -> "FolderLock":
        import fcntl

        key = str(self.path.resolve())
        if key in FolderLock._held:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise FileExistsError(self.busy) from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder released (and removed) the file meanwhile: lock the new one
        FolderLock._held[key] = fd
        return self

    def release(self) -> None:
        """Removes the lock file (while still holding it) and unlocks."""
        fd = FolderLock._held.pop(str(self.path.resolve()), None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

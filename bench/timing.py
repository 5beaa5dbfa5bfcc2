"""Timing and failure handling of the bench scripts: device-synchronised repeats, peak memory,
a configuration's failure as a result row, the whole script's time budget."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.common import free_memory, sync


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """``torch.cuda.max_memory_allocated`` since the last :func:`reset_peak`; None on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


@dataclass
class Timing:
    """Wall-clock statistics of a repeated, device-synchronised call."""

    median_s: float
    mean_s: float
    min_s: float
    max_s: float
    n: int
    warmup: int
    peak_bytes: int | None
    times_s: list[float] = field(default_factory=list)
    capped: bool = False  # fewer than the asked repeats because of the per-configuration time cap
    warmup_only: bool = False  # one call outlasted the cap: the (untuned) warm-up calls are the sample

    @classmethod
    def of(cls, times: list[float], warmup: int, device: torch.device, **flags: bool) -> "Timing":
        """Statistics of ``times`` (seconds), with the device's peak memory so far."""
        return cls(median_s=statistics.median(times), mean_s=statistics.fmean(times), min_s=min(times),
                   max_s=max(times), n=len(times), warmup=warmup, peak_bytes=peak_bytes(device),
                   times_s=[round(t, 6) for t in times], **flags)

    @property
    def label(self) -> str:
        """The ``n`` column: timed calls, flagged when the cap cut them short."""
        if self.warmup_only:
            return f"{self.n} (warm-up only)"
        return f"{self.n}" + (" (capped)" if self.capped else "")


def _timed_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call, bracketed by device synchronisation."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 20,
            max_seconds: float | None = None, min_repeats: int = 3) -> Timing:
    """Time ``fn`` after warm-up: each call is bracketed by device synchronisation.

    Peak memory is ``max_memory_allocated`` over warm-up and timed calls (weights, optimizer state
    and activations included). When ``max_seconds`` is given and the calls are slow, fewer than
    ``repeats`` calls are timed (never fewer than ``min_repeats``) and ``capped`` is set.

    Args:
        fn: the call to time (one training step, one encode, ...).
        device: where it runs; CUDA is synchronised before and after every call.
        warmup: untimed calls first (cuDNN autotuning, allocator, rulebooks).
        repeats: timed calls wanted; the median is reported.
        max_seconds: soft time cap for this configuration (warm-up included); when one warm-up
            call already outlasts it, that call is the sample (``warmup_only``, an upper bound).
        min_repeats: the fewest timed calls kept when the cap shortens the run.
    """
    reset_peak(device)
    start = time.perf_counter()
    last = 0.0
    done = 0
    warm_times = []
    for _ in range(max(0, warmup)):
        last = _timed_call(fn, device)
        warm_times.append(last)
        done += 1
        if max_seconds is not None and time.perf_counter() - start > max_seconds / 3:
            break  # slow configuration: one warm-up call is enough to compile, tune and allocate
    if max_seconds is not None and warm_times and time.perf_counter() - start > max_seconds:
        # one call is longer than the cap: report the warm-up call itself (an upper bound) and stop
        return Timing.of(warm_times, 0, device, capped=True, warmup_only=True)
    n = repeats
    capped = False
    if max_seconds is not None and last > 0:
        left = max_seconds - (time.perf_counter() - start)
        fit = int(left // last)
        if fit < repeats:
            n = min(repeats, max(min_repeats, fit))
            capped = n < repeats
    times = [_timed_call(fn, device) for _ in range(max(1, n))]
    return Timing.of(times, done, device, capped=capped)


def is_oom(exc: BaseException) -> bool:
    """True for CUDA (or spconv) out-of-memory errors."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "cudaerrormemoryallocation" in text


def describe_failure(exc: BaseException) -> str:
    """Short status text for a failed configuration: ``OOM`` or ``error: Type: message``."""
    if is_oom(exc):
        return "OOM"
    if type(exc).__name__ == "SparseInt32LimitError":
        return "int32 limit: " + " ".join(str(exc).split())[:160]
    msg = " ".join(str(exc).split())
    return f"error: {type(exc).__name__}: {msg[:160]}"


def run_guarded(fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Run one configuration; an exception becomes ``{"status": "OOM" | "error: ..."}``.

    Memory is released afterwards either way, so the next configuration starts clean.
    """
    try:
        out = fn()
        out.setdefault("status", "ok")
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is a result row
        out = {"status": describe_failure(exc)}
        del exc
    free_memory(device)
    return out


class Budget:
    """Wall-clock budget of a whole script: later configurations are skipped, not started."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def exhausted(self) -> bool:
        return self.left() <= 0

    def per_config(self, cap: float) -> float:
        """Time cap for the next configuration: ``cap``, less when the budget is nearly spent."""
        return max(1.0, min(cap, self.left()))

"""Cases run on worker processes: a fair share of threads each, a crashed worker fails only its case."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import torch

from pipeline.discovery import Case
from pipeline.io_utils import rmtree_quiet
from pipeline.preprocess.case import case_row, process_case

__all__ = ["run_pool"]


def _worker_init(threads: int, parent_pid: int) -> None:
    """Worker start: die with the parent (Linux), keep BLAS/torch threads to a fair share."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a killed job leaves no orphan writer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides on Ctrl-C
    torch.set_num_threads(max(1, threads))
    if os.getppid() != parent_pid:  # the parent died before PR_SET_PDEATHSIG was armed
        os._exit(1)


def run_pool(tasks: list[dict], num_workers: int, record) -> None:
    """Run tasks on ``num_workers`` processes, at most ``num_workers`` in flight; a worker
    that dies (crash, out of memory) fails only its case (each in-flight case is retried once)."""
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
        **case_row(case), "error": "worker process died while processing this case (crash or out of memory); "
                                   "rerun with fewer workers or check the file"}})

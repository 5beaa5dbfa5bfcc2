"""Training handlers (ignite style ``attach(engine)``): log lines, TensorBoard, EMA, checkpoints,
samples and validation. Only rank 0 writes files.

Order in ``train#handlers``: ``EMAHandler`` and ``CodebookRefitHandler`` before ``CheckpointHandler``
(which saves the EMA, and the book refitted at the end).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events

from pipeline import distributed as D
from pipeline.config_data import setting_hint
from pipeline.io_utils import atomic_path
from pipeline.runs import ema_ckpt_name, misc_ckpt_name, model_ckpt_name

__all__ = [
    "tb_writer",
    "StepLogHandler",
    "EMAHandler",
    "CheckpointHandler",
    "SampleHandler",
    "ValidationHandler",
    "save_torch",
    "KMeansProgressHandler",
    "CodebookRefitHandler",
    "densify_crop",
]

logger = logging.getLogger("ctvq.train")


def tb_writer(engine, output_dir: str | os.PathLike):
    """The engine's shared TensorBoard ``SummaryWriter`` under ``output_dir/tb_logs`` (rank 0; None elsewhere)."""
    if not D.is_main():
        return None
    w = getattr(engine, "tb_writer", None)
    if w is None:
        from torch.utils.tensorboard import SummaryWriter

        resumed = getattr(engine, "resumed_step", None)  # steps an interrupted run logged past it are hidden
        w = SummaryWriter(log_dir=str(Path(output_dir) / "tb_logs"), purge_step=resumed + 1 if resumed else None)
        engine.tb_writer = w
        engine.add_event_handler(Events.COMPLETED, lambda e: w.flush())
    return w


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary name, then rename."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


class StepLogHandler:
    """Every ``interval`` steps: ``Step N: loss=... recon=... vq=... commitment=...`` in the log, and
    losses, lr, grad norm and codebook perplexity / usage in TensorBoard.

    Args:
        output_dir: run folder (TensorBoard under ``tb_logs/``).
        interval: ``i_log``.
    """

    def __init__(self, output_dir: str | os.PathLike, interval: int = 100) -> None:
        self.output_dir = output_dir
        self.interval = max(1, int(interval))
        self._acc: dict[str, float] = {}
        self._n = 0
        self._points = 0
        self._t0 = time.perf_counter()
        self._step0: int | None = None  # the step this run started from (a resumed run: its checkpoint's)
        self._wait = 0.0  # seconds spent waiting for batches since the last log line
        self._wait_from = 0.0

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._first_step)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._batch_asked)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._batch_came)

    def _first_step(self, engine) -> None:
        if self._step0 is None:  # speed counts from here, not from step 0 or from when the handler was made
            self._step0, self._t0 = engine.state.iteration - 1, time.perf_counter()

    def _batch_asked(self, engine) -> None:
        self._wait_from = time.perf_counter()

    def _batch_came(self, engine) -> None:
        self._wait += time.perf_counter() - self._wait_from

    def __call__(self, engine) -> None:
        out = engine.state.output or {}
        if not out.get("skipped"):
            for k in ("loss", "recon", "vq", "commitment", "entropy", "grad_norm"):
                self._acc[k] = self._acc.get(k, 0.0) + float(out.get(k, 0.0))
            self._n += 1
        self._points += int(out.get("num_points", 0))
        step = engine.state.iteration
        if step % self.interval and step != engine.state.epoch_length:
            return
        n = max(1, self._n)
        avg = {k: v / n for k, v in self._acc.items()}
        now = time.perf_counter()
        seconds = max(now - self._t0, 1e-9)
        speed = {"steps_per_s": (step - self._step0) / seconds, "voxels_per_s": self._points / seconds,
                 "data_wait": self._wait / seconds}
        self._acc, self._n, self._points, self._t0, self._step0, self._wait = {}, 0, 0, now, step, 0.0
        if D.is_distributed() and avg:  # mean over ranks (every rank reaches this line)
            keys = sorted(avg)
            t = torch.tensor([avg[k] for k in keys], dtype=torch.float64, device=engine.device)
            torch.distributed.all_reduce(t)
            avg = dict(zip(keys, (t / D.world_size()).tolist()))
        vq = getattr(getattr(engine, "model", None), "vq", None)
        usage = vq.usage_stats() if vq is not None and hasattr(vq, "usage_stats") else None
        if vq is not None and hasattr(vq, "reset_usage"):
            vq.reset_usage()
        if not D.is_main():
            return
        msg = (f"Step {step}: loss={avg.get('loss', float('nan')):.6g} recon={avg.get('recon', float('nan')):.6g} "
               f"vq={avg.get('vq', float('nan')):.6g} commitment={avg.get('commitment', float('nan')):.6g} "
               + (f"entropy={avg['entropy']:.4g} " if avg.get("entropy") else "")
               + f"lr={out.get('lr', 0.0):.3g} grad_norm={avg.get('grad_norm', float('nan')):.4g}")
        if usage is not None and engine.quantize:
            msg += f" perplexity={usage['perplexity']:.1f} usage={usage['usage']:.3f}"
            if len(usage.get("levels", [])) > 1:  # residual levels: the fields above are level 1's
                msg += " levels_perplexity=" + "/".join(f"{u['perplexity']:.0f}" for u in usage["levels"])
        msg += (f" steps/s={speed['steps_per_s']:.2f} voxels/s={speed['voxels_per_s']:.3g}"
                f" data_wait={100 * speed['data_wait']:.0f}%")
        if torch.cuda.is_available() and engine.device.type == "cuda":
            msg += f" peak_mem={torch.cuda.max_memory_allocated(engine.device) / 2**30:.2f}GiB"
        logger.info(msg)
        w = tb_writer(engine, self.output_dir)
        for k, v in avg.items():
            w.add_scalar(f"train/{k}", v, step)
        w.add_scalar("train/lr", out.get("lr", 0.0), step)
        for k, v in speed.items():
            w.add_scalar(f"speed/{k}", v, step)
        w.add_scalar("train/nonfinite_steps", getattr(engine.state, "nonfinite_steps", 0), step)
        if usage is not None and engine.quantize:
            w.add_scalar("codebook/perplexity", usage["perplexity"], step)
            w.add_scalar("codebook/usage", usage["usage"], step)
            w.add_scalar("codebook/codes_used", usage["codes_used"], step)
            for level, u in enumerate(usage.get("levels", [])):  # residual quantizers: every level
                for key in ("perplexity", "usage", "codes_used"):
                    w.add_scalar(f"codebook/level{level + 1}/{key}", u[key], step)  # levels count from 1, as the log


def _steps(n: int) -> str:
    return f"{n} step" + ("" if n == 1 else "s")


class KMeansProgressHandler:
    """Progress of the codebook's k-means initialisation (stage 1): how full the quantizer's reservoir
    of encoder outputs is, a line before the step that runs k-means (it can take minutes) and its time.
    The trainer attaches it when the codebook waits for k-means."""

    #: what a run whose reservoir does not grow is told (crops too small for the k-means margin)
    NO_GROWTH = ("no encoder output reached it in {steps}: are the crops smaller than twice "
                 "network_def#vq_crop_margin latent cells? lower the margin or raise dataset#args#max_points")

    def __init__(self, every_fraction: float = 0.25) -> None:
        self.every = float(every_fraction)
        self._shown = -1.0
        self._level = None  # the codebook the figures below are of; each level collects anew
        self._before = 0
        self._growth = 0  # the most one step added: whether the next step may run k-means
        self._collected, self._steps = 0, 0  # their mean: the steps still to go
        self._t0: float | None = None

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._completed)
        engine.add_event_handler(Events.COMPLETED, self._finished)

    def _track(self, vq) -> None:
        """Start the figures of codebook ``vq`` afresh when it is not the one they were of."""
        if vq is not self._level:
            self._level, self._shown, self._t0 = vq, -1.0, None
            self._before, self._growth, self._collected, self._steps = int(vq.reservoir.shape[0]), 0, 0, 0

    def _finished(self, engine) -> None:
        """A run that ends before k-means says so: its checkpoint holds an untrained codebook."""
        vq = self._vq(engine)
        if vq is None or vq._py_initialized or not D.is_main():
            return
        n = int(vq.reservoir.shape[0])
        levels = self._levels(engine)
        which = f" level {levels.index(vq) + 1} of {len(levels)}" if len(levels) > 1 else ""
        start = (f"Training ended before k-means initialised the codebook{which} ({n:,} of "
                 f"{vq.kmeans_init_points:,} encoder outputs collected), so that codebook is untrained in this checkpoint")
        if vq is self._level and self._steps and not self._collected:
            logger.warning(f"{start}; {self.NO_GROWTH.format(steps=_steps(self._steps))}")
            return
        per_step = self._per_step()
        later = levels[levels.index(vq) + 1:]  # each later level fills its own reservoir after this one's k-means
        left = math.ceil((vq.kmeans_init_points - n) / per_step) + sum(math.ceil(q.kmeans_init_points / per_step) for q in later)
        unfrozen = setting_hint("frozen_parts", '["Encoder"]')
        logger.warning(f"{start}; raise max_steps by about {left} (or max_minutes) and train this stage again, or "
                       f"start the next stage from it with {unfrozen}: it runs k-means on its first steps")

    def _per_step(self) -> float:
        """Encoder outputs the current level's reservoir gained per step so far, on average."""
        return max(self._collected / max(1, self._steps), 1e-3)

    @staticmethod
    def _levels(engine) -> list:
        """The model's codebooks that k-means initialises, coarsest first (a frozen one never is)."""
        vq = getattr(engine.model, "vq", None)
        return [m for m in vq.modules() if hasattr(m, "_py_initialized") and hasattr(m, "reservoir")
                and not m.book_frozen] if vq is not None else []

    def _vq(self, engine):
        """The first codebook still waiting for k-means (the last one once all are initialised)."""
        levels = self._levels(engine)
        return next((m for m in levels if not m._py_initialized), levels[-1] if levels else None)

    def _started(self, engine) -> None:
        vq = self._vq(engine)
        if vq is None or vq._py_initialized:
            return
        self._track(vq)
        if self._t0 is not None:
            return
        self._before = int(vq.reservoir.shape[0])
        if self._growth and self._before + self._growth >= vq.kmeans_init_points:
            self._t0 = time.perf_counter()
            if D.is_main():
                logger.info(f"Step {engine.state.iteration}: k-means initialisation of the codebook: "
                            f"{vq.num_embeddings:,} codes from {vq.kmeans_init_points:,} encoder outputs, "
                            f"{vq.kmeans_iters} iterations (this step takes longer)...")

    def _completed(self, engine) -> None:
        vq = self._vq(engine)
        if vq is None:
            return
        if vq._py_initialized:
            if 0 <= self._shown < 2 and D.is_main():  # seen collecting: a resumed run stays quiet
                took = f" in {time.perf_counter() - self._t0:.1f} s" if self._t0 is not None else ""
                logger.info(f"Step {engine.state.iteration}: codebook initialised by k-means{took}")
            self._shown = 2
            return
        if vq is not self._level:  # the level before ran k-means this step: this one collects from the next
            self._track(vq)
            return
        n = int(vq.reservoir.shape[0])
        self._growth = max(self._growth, n - self._before)
        self._collected += n - self._before
        self._steps += 1
        frac = n / max(1, vq.kmeans_init_points)
        if frac - self._shown >= self.every or self._shown < 0:
            self._shown = frac
            left = (f"about {math.ceil((vq.kmeans_init_points - n) / self._per_step())} more steps" if self._collected
                    else self.NO_GROWTH.format(steps=_steps(self._steps)))
            if D.is_main():
                logger.info(f"Step {engine.state.iteration}: collecting encoder outputs for the k-means codebook: "
                            f"{n:,} of {vq.kmeans_init_points:,} ({left})")


class EMAHandler:
    """Exponential moving average of the model's floating-point state (``engine.ema``).

    The decay warms up: at update ``n`` of the run it is ``min(rate, (1 + n) / (10 + n))``, so
    the average follows the weights closely at first (about ``rate`` after ``10 / (1 - rate)``
    updates). Without the warm-up a run's early jumps never reach the average: stage 1 replaces
    the random codebook by k-means centres at its first step, and with a fixed 0.9999 the
    ``vqvae_ema`` checkpoint of a 10k-step run would still hold mostly the random codebook.

    Args:
        rate: largest decay per step (``ema_rate``, e.g. 0.9999).
        warmup: use the warm-up decay (default True); False uses ``rate`` from the first update.
    """

    def __init__(self, rate: float = 0.9999, warmup: bool = True) -> None:
        self.rate = float(rate)
        self.warmup = bool(warmup)
        self.shadow: dict[str, torch.Tensor] = {}
        self.model = None

    def attach(self, engine) -> None:
        self.model = engine.model
        self.reset()
        engine.ema = self
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def reset(self) -> None:
        """Copies the current weights into the average."""
        self.shadow = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def decay(self, updates: int) -> float:
        """Decay used at the ``updates``-th update (1-based) of the run."""
        if not self.warmup:
            return self.rate
        return min(self.rate, (1.0 + updates) / (10.0 + updates))

    @torch.no_grad()
    def __call__(self, engine) -> None:
        if (engine.state.output or {}).get("skipped"):
            return
        weight = 1.0 - self.decay(int(engine.state.iteration))
        floats, targets = [], []
        for k, v in self.model.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                floats.append(s)
                targets.append(v.detach())
            else:
                s.copy_(v)
        if floats:
            torch._foreach_lerp_(floats, targets, weight)  # one fused update instead of one per tensor

    def state_dict(self) -> dict[str, torch.Tensor]:
        """EMA weights, loadable into the model (``vqvae_ema<rate>_step*.pt``)."""
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for k, v in sd.items():
            if k in self.shadow:
                self.shadow[k].copy_(v.to(self.shadow[k].device))


class CodebookRefitHandler:
    """At the end of training, fit the codebook again, by k-means, to the latents of whole training scans.

    Training quantises the latents of crops. Near a crop face that cuts the scan they see a context
    cut by the crop, which no cell of a whole scan sees, and the book that training leaves holds many
    codes whole scans seldom use (``network_def#vq_crop_margin`` keeps those cells out of the
    codebook's losses; this handler fits the book to what inference will quantise). When training
    completes (before the final checkpoint: list it before ``CheckpointHandler``), it encodes up to
    ``max_cases`` of the run's training cases whole, as ``./run.sh encode`` does, keeps up to
    ``max_rows`` latents spread evenly over them, and sets the book to their k-means centres
    (:meth:`networks.quantizer.VectorQuantizer.refit`, residual levels in turn; FSQ has no book and is
    kept). The EMA weights get the same book; it is fitted to the live encoder's latents, which are
    the EMA's when the encoder is frozen (stage 1; the shipped stage 2 keeps this book). Rank 0 fits alone, then shares the
    quantizer's state. Anything that goes wrong (a case that cannot be read, no memory) is logged in
    one line and the trained book is kept, so the run still ends with its checkpoint.

    Args:
        data_dir: the processed training folder (``data_dir``).
        window_type: the run's window.
        enabled: False leaves the trained book (``refit_codebook``).
        max_cases: at most this many training cases, drawn at random (``refit_max_cases``).
        max_rows: at most this many latents in the k-means.
        iters: Lloyd iterations.
        seed: draws of cases and rows, and k-means' start.
    """

    #: fewer latents than this many per code leave the trained book in place (k-means would fit noise)
    MIN_ROWS_PER_CODE = 4

    def __init__(self, data_dir: str | os.PathLike, window_type: str, enabled: bool = True, max_cases: int = 64,
                 max_rows: int = 2_097_152, iters: int = 20, seed: int = 42) -> None:
        if int(max_cases) < 1 or int(max_rows) < 1:
            raise ValueError(f"refit_max_cases={max_cases} and max_rows={max_rows} must be >= 1 (refit_codebook=false "
                             "turns the refit off)")
        self.data_dir = data_dir
        self.window_type = window_type
        self.enabled = bool(enabled)
        self.max_cases = int(max_cases)
        self.max_rows = int(max_rows)
        self.iters = int(iters)
        self.seed = int(seed)

    def attach(self, engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.COMPLETED, self)

    def _cases(self, engine, resolution: int) -> list[dict]:
        """The run's training cases (all processed cases when the loader does not say), at most ``max_cases``."""
        import random

        from pipeline.evaluate import find_cases

        cases = find_cases(self.data_dir, self.window_type, resolution)
        dataset = getattr(getattr(engine, "data_loader", None), "dataset", None)
        keys = {c["key"] for c in getattr(dataset, "cases", None) or []}
        if keys:
            cases = [c for c in cases if c["case"] in keys]
        if len(cases) > self.max_cases:
            cases = sorted(random.Random(self.seed).sample(cases, self.max_cases), key=lambda c: c["case"])
        return cases

    def _latents(self, engine, device: torch.device) -> tuple[torch.Tensor, int]:
        """Latents of whole training scans (at most ``max_rows``, spread evenly) and how many scans gave them."""
        from pipeline.processed import load_case
        from pipeline.tokenizer import Tokenizer

        tok = Tokenizer(engine.model, self.window_type, device=device)
        cases = self._cases(engine, tok.resolution)
        per_case = -(-self.max_rows // max(1, len(cases)))
        generator = torch.Generator(device=tok.device).manual_seed(self.seed)
        parts = []
        for case in cases:
            try:
                data = load_case(case)
                z = tok.latents(data["window"], data["mask"])
            except (OSError, ValueError, KeyError) as e:
                logger.warning(f"codebook refit: skipping {case['case']} ({case['dir']}): {e}")
                continue
            if z.shape[0] > per_case:
                z = z[torch.randperm(z.shape[0], device=z.device, generator=generator)[:per_case]]
            parts.append(z)
        rows = torch.cat(parts) if parts else torch.zeros(0, int(engine.model.latent_channels), device=tok.device)
        return rows, len(parts)

    def _fit(self, engine, vq, device: torch.device) -> str | None:
        """Rank 0: the book refitted in place and the line that says so, or None (book as trained)."""
        from networks.quantizer import perplexity_of

        def usage(rows: torch.Tensor) -> dict:
            codes = vq.quantize_indices(rows)
            return perplexity_of(torch.bincount(codes if codes.dim() == 1 else codes[:, 0], minlength=vq.num_embeddings).double())

        start = time.perf_counter()
        rows, scans = self._latents(engine, device)
        if rows.shape[0] < self.MIN_ROWS_PER_CODE * vq.num_embeddings:
            logger.warning(f"codebook refit: {rows.shape[0]:,} latents from {scans} training scans under {self.data_dir} "
                           f"are fewer than {self.MIN_ROWS_PER_CODE} per code ({vq.num_embeddings:,} codes); the trained "
                           "book is kept")
            return None
        before = usage(rows)
        vq.refit(rows, self.iters, torch.Generator(device=device).manual_seed(self.seed))
        after = usage(rows)
        return (f"Step {engine.state.iteration}: codebook refitted by k-means to {rows.shape[0]:,} latents of {scans} "
                f"whole training scans in {time.perf_counter() - start:.1f} s: codes used on them "
                f"{before['codes_used']:,} -> {after['codes_used']:,} of {vq.num_embeddings:,}, perplexity "
                f"{before['perplexity']:.0f} -> {after['perplexity']:.0f}")

    @torch.no_grad()
    def __call__(self, engine) -> None:
        model = engine.model
        vq = model.vq
        if not any(hasattr(m, "embeddings") for m in vq.modules()):
            logger.info("codebook refit: this quantizer has no codebook (fsq); kept as trained")
            return
        was_training = model.training
        device = next(model.parameters()).device
        state = {k: v.clone() for k, v in vq.state_dict().items()}
        line = None
        if D.is_main():
            try:
                line = self._fit(engine, vq, device)
            except Exception as e:  # noqa: BLE001  the trained book and the final checkpoint must not be lost to it
                vq.load_state_dict(state)
                logger.error(f"codebook refit failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}); the trained "
                             "book is kept and saved; set refit_codebook to false to skip the refit")
        done = torch.tensor([float(line is not None)], device=device)
        D.broadcast(done)
        if float(done) > 0:
            for tensor in vq.state_dict().values():  # rank 0's refitted quantizer on every rank
                D.broadcast(tensor)
            if getattr(engine, "ema", None) is not None:
                fitted = model.state_dict()
                for key, value in engine.ema.shadow.items():
                    if key.startswith("vq."):
                        value.copy_(fitted[key])
            engine.state.codebook_refitted = True
            if line is not None:
                logger.info(line)
        model.train(was_training)


class CheckpointHandler:
    """Writes ``ckpts/vqvae_step%07d.pt``, ``vqvae_ema<rate>_step%07d.pt`` and ``misc_step%07d.pt``
    every ``interval`` steps and at the end (atomically, rank 0 only).

    Args:
        output_dir: run folder.
        interval: ``i_save``.
        ema_rate: rate written in the EMA file name (``vqvae_ema0.9999_step...``).
    """

    def __init__(self, output_dir: str | os.PathLike, interval: int = 10000, ema_rate: float = 0.9999) -> None:
        self.ckpt_dir = Path(output_dir) / "ckpts"
        self.interval = max(1, int(interval))
        self.ema_rate = ema_rate

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        step = int(engine.state.iteration)
        if D.is_main():
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            written = (self.ckpt_dir / misc_ckpt_name(step)).is_file() and (self.ckpt_dir / model_ckpt_name(step)).is_file()
            if written and not getattr(engine.state, "codebook_refitted", False):
                pass  # already written at this step (end of training on an i_save step)
            else:
                misc = engine.misc_state()
                save_torch({k: v.detach().cpu() for k, v in engine.model.state_dict().items()},
                           self.ckpt_dir / model_ckpt_name(step))
                if getattr(engine, "ema", None) is not None:
                    save_torch(engine.ema.state_dict(), self.ckpt_dir / ema_ckpt_name(step, self.ema_rate))
                # misc last: a step counts as saved once its misc file exists
                save_torch(misc, self.ckpt_dir / misc_ckpt_name(step))
                logger.info(f"Saved checkpoint step {step} to {self.ckpt_dir}")
        D.barrier()


def densify_crop(indices: torch.Tensor, features: torch.Tensor, box, batch_index: int = 0) -> np.ndarray:
    """Dense float32 array of one sample's sparse values inside ``box`` (lo, hi); 0 elsewhere."""
    box = [int(b) for b in box]
    lo = np.array(box[:3])
    shape = tuple(np.array(box[3:]) - lo)
    out = np.zeros(shape, np.float32)
    sel = indices[:, 0] == batch_index
    ijk = indices[sel, 1:].long().cpu().numpy() - lo
    val = features[sel].detach().float().cpu().numpy().reshape(-1)
    keep = np.all((ijk >= 0) & (ijk < np.array(shape)), axis=1)
    out[tuple(ijk[keep].T)] = val[keep]
    return out


def _recon_dense(engine, batch: dict, quantize: bool | None = None):
    from pipeline.dataset import to_sparse_tensor

    net = engine.model
    was = net.training
    net.eval()
    try:
        with torch.no_grad(), engine._autocast():
            x = to_sparse_tensor(batch, engine.device)
            recon, _ = net(x, quantize=engine.quantize if quantize is None else quantize)
    finally:
        net.train(was)
    return x, recon


class SampleHandler:
    """Every ``interval`` steps: three-plane picture (input / reconstruction / error) of the first
    sample of the batch, to TensorBoard and ``samples/step%07d.png``.

    Args:
        output_dir: run folder.
        interval: ``i_sample``.
    """

    def __init__(self, output_dir: str | os.PathLike, interval: int = 1000) -> None:
        self.output_dir = Path(output_dir)
        self.interval = max(1, int(interval))

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine) -> None:
        if not D.is_main():
            return
        from pipeline.dataset import batch_split
        from pipeline.visualize import save_three_plane, three_plane_image

        step = engine.state.iteration
        one = batch_split(engine.state.batch, engine.state.batch["batch_size"])[0]
        x, recon = _recon_dense(engine, one)
        box = one["box"][0]
        inp = densify_crop(x.indices, x.features, box)
        rec = densify_crop(recon.indices, recon.features, box)
        mask = inp > 0
        lo, hi = [int(v) for v in box[:3]], [int(v) for v in box[3:]]
        where = ", ".join(f"{a} {l}:{h}" for a, l, h in zip("ijk", lo, hi))
        size = "x".join(str(int(v)) for v in one["spatial_shape"])
        title = f"step {step} {one['case_id'][0]}: crop {where} of the {size} scan (RAS voxels)"
        img = three_plane_image(inp, rec, mask=mask, title=title)
        tb_writer(engine, self.output_dir).add_image("samples/three_plane", img, step, dataformats="HWC")
        save_three_plane(self.output_dir / "samples" / f"step{step:07d}.png", inp, rec, mask=mask, title=title)


class ValidationHandler:
    """Every ``interval`` steps: PSNR, SSIM (3D) and MAE in HU inside the body on held-out cases
    (one fixed crop per case), logged and written to TensorBoard under ``val/``.

    Args:
        data_loader: loader over the validation dataset (``split="val"``, fixed crops).
        output_dir: run folder.
        interval: ``i_val`` (0 disables).
        max_cases: cap on validated cases per round.
        ssim: compute SSIM (slowest part).
    """

    def __init__(self, data_loader, output_dir: str | os.PathLike, interval: int = 5000, max_cases: int = 8,
                 ssim: bool = True) -> None:
        self.data_loader = data_loader
        self.output_dir = output_dir
        self.interval = int(interval)
        self.max_cases = int(max_cases)
        self.ssim = ssim
        self.last: dict[str, float] = {}

    def attach(self, engine) -> None:
        if self.interval > 0 and self.data_loader is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine) -> None:
        if not D.is_main():
            D.barrier()
            return
        from pipeline.dataset import batch_split
        from pipeline.metrics import volume_metrics

        vq = getattr(engine.model, "vq", None)
        saved_usage = vq.usage_counts.clone() if vq is not None and hasattr(vq, "usage_counts") else None
        rows = []
        for batch in self.data_loader:
            for one in batch_split(batch, batch["batch_size"]):
                if len(rows) >= self.max_cases:
                    break
                x, recon = _recon_dense(engine, one)
                box = one["box"][0]
                inp = densify_crop(x.indices, x.features, box)
                rec = densify_crop(recon.indices, recon.features, box)
                # body mask of the crop: the support of the input is inside the body; the dataset's
                # crop region also gives the full mask
                ds = self.data_loader.dataset
                mask = None
                try:
                    idx = [c["key"] for c in ds.cases].index(one["case_id"][0])
                    _, mask = ds.load_region(idx, box.tolist())
                except (ValueError, AttributeError):
                    pass
                if mask is None:
                    mask = inp > 0
                width, level = one["window"][0]
                m = volume_metrics(np.clip(rec, 0, 1), inp, {"width": width, "level": level}, body_mask=mask,
                                   ssim=self.ssim and min(inp.shape) >= 11)
                rows.append(m)
            if len(rows) >= self.max_cases:
                break
        if saved_usage is not None:
            vq.usage_counts.copy_(saved_usage)  # validation forwards don't count as training usage
        keys = ("psnr_body", "ssim_body", "mae_hu_body", "psnr", "ssim")
        avg = {}
        for k in keys:
            vals = [r[k] for r in rows if k in r and r[k] is not None and not math.isnan(float(r[k]))]
            if vals:
                avg[k] = float(np.mean(vals))
        self.last = avg
        step = engine.state.iteration
        logger.info(
            f"Validation step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in avg.items()) + f" ({len(rows)} case(s))"
        )
        w = tb_writer(engine, self.output_dir)
        for k, v in avg.items():
            w.add_scalar(f"val/{k}", v, step)
        D.barrier()

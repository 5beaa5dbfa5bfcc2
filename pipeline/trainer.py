"""Sparse VQ-VAE trainer: a ``monai.engines.SupervisedTrainer`` with its own iteration.

One iteration = one optimizer step: the collated sparse batch is split by sample into
``batch_split`` micro-batches (gradient accumulation), each is moved to the device as a
``SparseConvTensor`` and run under autocast (fp16 with ``GradScaler`` or bf16; CUDA only, fp32
on CPU). The loss is ``recon + lambda_vq * vq + lambda_commitment * commitment + entropy`` (the
codebook usage loss, weighted by the quantizer's ``vq_entropy_weight``) with the
reconstruction compared to the input at the reconstruction's coordinates (0 outside the
support). Gradients are clipped; a step whose loss or gradient norm is not finite is skipped
on every rank and counted in ``engine.state.nonfinite_steps``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.engines import SupervisedTrainer

from networks.grid import GridBatch, supports_grid
from networks.quantizer import codebooks_initialised
from pipeline import distributed as D
from pipeline import quiet_fx_notice
from pipeline.config_data import config_flag
from pipeline.dataset import batch_crop_faces, batch_split, to_grid_batch, to_sparse_tensor
from pipeline.io_utils import CheckpointError
from pipeline.runs import load_matching, read_resume_state

quiet_fx_notice()

__all__ = ["SparseReconLoss", "SparseVQVAETrainer", "rng_state", "set_rng_state"]

logger = logging.getLogger("ctvq.train")


class SparseReconLoss(torch.nn.Module):
    """Reconstruction loss of a sparse reconstruction against the sparse input.

    Args:
        loss_type: "l1", "l2" or "l1_l2" (sum of both).
    """

    def __init__(self, loss_type: str = "l1") -> None:
        super().__init__()
        if loss_type not in ("l1", "l2", "l1_l2"):
            raise ValueError(f"loss_type must be 'l1', 'l2' or 'l1_l2', got '{loss_type}'")
        self.loss_type = loss_type

    @staticmethod
    def target(x, recon) -> torch.Tensor:
        """Input values at the reconstruction's coordinates (0 where the input has no voxel)."""
        from networks import sparse_lookup

        return sparse_lookup(x, recon.indices)

    def forward(self, recon, x) -> torch.Tensor:
        if isinstance(recon, GridBatch):  # the reconstruction's active voxels; the input is zero off its support
            keep = recon.active[..., None]
            err = (recon.values.float() - x.values.float()).masked_fill(~keep, 0)
            n = keep.sum().clamp_min(1)  # a masked mean without a host sync
        else:
            err = recon.features.float().reshape(-1, 1) - self.target(x, recon).float().reshape(-1, 1)
            n = max(1, err.shape[0])
        loss = err.new_zeros(())
        if self.loss_type in ("l1", "l1_l2"):
            loss = loss + err.abs().sum() / n
        if self.loss_type in ("l2", "l1_l2"):
            loss = loss + err.square().sum() / n
        return loss


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) random states as tensors, numbers and lists (loadable with
    ``torch.load(..., weights_only=True)``)."""
    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [int(version), list(words), gauss],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores :func:`rng_state`."""
    if "python" in state:
        version, words, gauss = state["python"]
        random.setstate((int(version), tuple(int(w) for w in words), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", np.asarray(n["keys"], dtype=np.int64).astype(np.uint32), int(n["pos"]),
                             int(n["has_gauss"]), float(n["cached_gaussian"])))
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


#: Lowest fp16 loss scale. The reconstruction loss is a mean over millions of voxels, so a voxel's
#: gradient is ~3e-7 before scaling: below about this scale fp16 holds it only as a subnormal
#: (losing precision), and near 1 it flushes to zero. A step whose gradient
#: is non-finite halves the scale, and these steps recur at any scale (2-3 % of steps on real CT), so
#: without a floor the scale only falls: in a 4-minute H200 run 24 skipped steps took it from 2^16 to
#: 2^-8, the gradient norm fell from 1.4 to 0.002 and the loss rose again.
MIN_LOSS_SCALE = 2.0**10


def update_loss_scale(scaler: torch.amp.GradScaler, floor: float = MIN_LOSS_SCALE) -> None:
    """``scaler.update()``, never below ``floor``."""
    scaler.update()
    if scaler.is_enabled() and scaler.get_scale() < floor:
        scaler.update(floor)


def check_resolution(model: torch.nn.Module, dataset) -> None:
    """Refuse a dataset preprocessed at another cube size than the model's (it would train, slowly,
    on a grid the model does not know, and evaluation would then refuse it)."""
    data_res = getattr(dataset, "resolution", None)
    latent, factor = getattr(model, "resolution", None), getattr(model, "factor", None)
    if not (data_res and latent and factor):
        return
    cube = int(latent) * int(factor)
    if int(data_res) != cube:
        where = (getattr(dataset, "datasets", None) or ["the training data"])[0]
        raise ValueError(f"{where}: preprocessed at {data_res}^3 but the model works on {cube}^3; preprocess with "
                         f"--resolution {cube} or set network_def#resolution={int(data_res) // int(factor)}")


class SparseVQVAETrainer(SupervisedTrainer):
    """Trains a sparse VQ-VAE on ``sparse_collate`` batches, one optimizer step per iteration.

    Args:
        device: training device.
        max_steps: optimizer steps (the engine runs one epoch of ``max_steps`` iterations).
        max_minutes: stop earlier, with a checkpoint, once this much training time has passed
            (None: no limit); the time counts from the first step, set-up excluded.
        train_data_loader: loader yielding ``sparse_collate`` batches (endless ``StepSampler``).
        network: the model (maybe DDP-wrapped).
        optimizer: built from the parameters left trainable.
        loss_function: ``SparseReconLoss``.
        lr_scheduler: stepped once per step (optional).
        lambda_vq: codebook loss weight.
        lambda_commitment: commitment loss weight.
        quantize: False bypasses the quantizer (stage 0).
        batch_split: micro-batches per step (gradient accumulation).
        grad_clip: max gradient norm (0 or None: no clipping, the norm is still logged).
        amp: mixed precision on CUDA.
        amp_dtype: "float16" (with GradScaler) or "bfloat16".
        train_handlers: ignite / MONAI handlers.
        seed: recorded for reproducibility.
        grid_training: run the conv levels as dense ops over each crop's box (``networks.grid``: the
            same result, a fraction of the time on a GPU); models without that path train sparse.
        graph_training: with ``grid_training`` on a GPU, replay each step's forward, loss and backward
            from a CUDA graph (``pipeline.graph_step``: the same result; 2.6-5.5x faster steps on small
            crops, little on the default 2 M-voxel ones, at more memory); one process,
            ``batch_split`` 1 and no ``use_checkpoint`` only, otherwise steps run eagerly.
        compile_grid: with ``grid_training``, compile the conv levels with ``torch.compile``
            (``SparseVQVAE.compile_grid``: the same result, norms, SiLU and masks fused; the first
            steps of the first two crop shapes compile, minutes on two CPU cores); one process only.
        run_folder: the ``pipeline.run_folder.RunFolder`` of this run (what :meth:`resume` restores; its lock is
            released after :meth:`run`). The bundle configs name it first among the arguments, so the run
            folder and its log exist before the data loader reads the dataset.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_steps: int,
        train_data_loader,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable | None = None,
        lr_scheduler=None,
        lambda_vq: float = 1.0,
        lambda_commitment: float = 0.25,
        quantize: bool = True,
        batch_split: int = 1,
        grad_clip: float | None = 1.0,
        amp: bool = True,
        amp_dtype: str = "float16",
        train_handlers: Sequence | None = None,
        seed: int = 0,
        max_minutes: float | None = None,
        run_folder=None,
        grid_training: bool = True,
        graph_training: bool = False,
        compile_grid: bool = False,
    ) -> None:
        device = torch.device(device)
        super().__init__(
            device=device,
            max_epochs=1,
            epoch_length=int(max_steps),
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function or SparseReconLoss("l1"),
            amp=False,
            decollate=False,
            train_handlers=None,
        )
        self.device = device
        self.model = D.unwrap(network)
        self.lr_scheduler = lr_scheduler
        self.lambda_vq = float(lambda_vq)
        self.lambda_commitment = float(lambda_commitment)
        self.quantize = bool(quantize)
        self.batch_split = max(1, int(batch_split))
        self.grad_clip = float(grad_clip) if grad_clip else 0.0
        self.use_amp = bool(amp) and device.type == "cuda"
        self.amp_dtype = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
                          "bf16": torch.bfloat16}[str(amp_dtype)]
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.seed = int(seed)
        self.state.nonfinite_steps = 0
        self.ema = None  # set by EMAHandler
        self.run_folder = run_folder
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.grid_training = config_flag("grid_training", grid_training) and supports_grid(self.model)
        check_resolution(self.model, getattr(train_data_loader, "dataset", None))
        if self.grid_training and config_flag("compile_grid", compile_grid):
            if D.is_distributed():
                logger.warning("compile_grid: off with several processes (only tested in one); the grid path runs eagerly")
            else:
                self.model.compile_grid()
        self.graph_steps = None
        if self.grid_training and config_flag("graph_training", graph_training):
            from pipeline.graph_step import GraphedSteps

            checkpointing = any(getattr(m, "use_checkpoint", False) for m in self.model.modules())
            why_not = next((why for off, why in ((device.type != "cuda", "no CUDA device"),
                                                 (D.is_distributed(), "several processes"),
                                                 (self.batch_split != 1, f"batch_split {self.batch_split}"),
                                                 (checkpointing, "use_checkpoint")) if off), None)
            if why_not:
                logger.warning("graph_training: off with %s (it needs one CUDA process, batch_split 1 and no "
                               "use_checkpoint); steps run eagerly", why_not)
            else:
                self.graph_steps = GraphedSteps(self.model, self.trainable, self._grid_terms, self.grad_scaler)
        self.max_seconds = float(max_minutes) * 60.0 if max_minutes else None
        self.started_at: float | None = None
        if train_handlers:
            self._register_handlers(list(train_handlers))
        vq = getattr(self.model, "vq", None)
        if self.quantize and vq is not None and not codebooks_initialised(vq):
            from pipeline.handlers import KMeansProgressHandler

            KMeansProgressHandler().attach(self)

    # -- one step ----------------------------------------------------------------------------
    def _autocast(self):
        if self.use_amp:  # a CUDA graph cannot hold autocast's weight cache
            return torch.autocast(device_type="cuda", dtype=self.amp_dtype, cache_enabled=self.graph_steps is None)
        return contextlib.nullcontext()

    def compute_losses(self, batch: dict, network: torch.nn.Module | None = None) -> tuple[dict, Any, Any]:
        """Forward pass and loss terms of one (micro-)batch; returns (terms, input, recon)."""
        if self.grid_training:
            x = to_grid_batch(batch, self.device, self.model.factor)
            terms, recon = self._terms(x, network or self.network)
        else:
            x = to_sparse_tensor(batch, self.device)
            faces = batch_crop_faces(batch, self.model.factor, self.device)
            terms, recon = self._terms(x, network or self.network, **({} if faces is None else {"crop_faces": faces}))
        return terms, x, recon

    def _grid_terms(self, x: GridBatch) -> dict:
        """Loss terms of a grid batch with every latent cell a token (what ``graph_steps`` replays)."""
        return self._terms(x, self.model, all_cells=True)[0]

    def _terms(self, x, net: torch.nn.Module, **forward) -> tuple[dict, Any]:
        with self._autocast():
            recon, losses = net(x, quantize=self.quantize, **forward)
        rec = self.loss_function(recon, x)
        vq = losses.get("vq", rec.new_zeros(())).float()
        com = losses.get("commitment", rec.new_zeros(())).float()
        entropy = losses.get("entropy", rec.new_zeros(())).float()  # weighted by the quantizer
        total = rec + self.lambda_vq * vq + self.lambda_commitment * com + entropy
        return {"loss": total, "recon": rec, "vq": vq, "commitment": com, "entropy": entropy}, recon

    def _iteration(self, engine, batchdata: dict[str, Any]) -> dict:
        self.network.train()
        parts = batch_split(batchdata, self.batch_split)
        bsz = max(1, int(batchdata["batch_size"]))
        graphs = self.graph_steps  # zeroes the gradients itself, never setting them to None
        if graphs is None:
            self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "recon": 0.0, "vq": 0.0, "commitment": 0.0, "entropy": 0.0}
        finite = True
        ddp = isinstance(self.network, torch.nn.parallel.DistributedDataParallel)
        for i, part in enumerate(parts):
            sync = (not ddp) or i == len(parts) - 1
            ctx = contextlib.nullcontext() if sync else self.network.no_sync()
            weight = part["batch_size"] / bsz
            with ctx:
                if graphs is not None:  # forward and backward (batch_split is 1 here)
                    terms = graphs(to_grid_batch(part, self.device, self.model.factor))
                else:
                    terms, _, _ = self.compute_losses(part)
                    self.grad_scaler.scale(terms["loss"] * weight).backward()
                # one device->host copy per micro-batch (float64 holds every term exactly)
                vals = torch.stack([terms[k].detach().double().reshape(()) for k in sums]).tolist()
                finite = finite and math.isfinite(vals[0])
            for k, v in zip(sums, vals):
                sums[k] += v * weight
        self.grad_scaler.unscale_(self.optimizer)
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip) if self.trainable else torch.zeros(())
        grad_norm = float(grad_norm)
        ok = finite and math.isfinite(grad_norm)
        if D.is_distributed():
            flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            ok = bool(flag.item() > 0)
        if ok:
            self.grad_scaler.step(self.optimizer)
        else:
            self.optimizer.zero_grad(set_to_none=graphs is None)
            engine.state.nonfinite_steps = getattr(engine.state, "nonfinite_steps", 0) + 1
            logger.warning(
                f"Step {engine.state.iteration}: non-finite loss or gradient (loss={sums['loss']}, grad_norm={grad_norm}); "
                f"step skipped ({engine.state.nonfinite_steps} so far"
                + (f", loss scale {self.grad_scaler.get_scale():g})" if self.grad_scaler.is_enabled() else ")")
            )
        update_loss_scale(self.grad_scaler)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self._check_time_budget(engine)
        return {
            **sums,
            "grad_norm": grad_norm,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "skipped": not ok,
            "num_points": int(sum(batchdata["num_points"])),
        }

    def _check_time_budget(self, engine) -> None:
        now = time.perf_counter()
        if self.started_at is None:
            self.started_at = now
        if self.max_seconds is None:
            return
        over = now - self.started_at >= self.max_seconds
        if D.is_distributed():  # every rank stops at the same step
            flag = torch.tensor([1.0 if over else 0.0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            over = bool(flag.item() > 0)
        if not over:
            return
        logger.info(f"Step {engine.state.iteration}: time budget of {self.max_seconds / 60:g} min reached; stopping with a checkpoint")
        engine.terminate()

    # -- checkpoint state --------------------------------------------------------------------
    def misc_state(self) -> dict:
        """Everything but the weights needed to resume at the current step."""
        step = int(self.state.iteration)
        sampler = getattr(self.data_loader, "sampler", None)
        return {
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.grad_scaler.state_dict(),
            "scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "sampler": {"start_step": step, "position": sampler.position(step) if hasattr(sampler, "position") else None,
                        "seed": getattr(sampler, "seed", None)},
            "rng": rng_state(),
            "nonfinite_steps": int(getattr(self.state, "nonfinite_steps", 0)),
            "world_size": D.world_size(),
        }

    def resume(self, run=None) -> int:
        """Restores weights, EMA, optimizer, scaler, scheduler, sampler position and RNG.

        Every file is read with ``weights_only=True``; an unreadable file or one of another model
        size ends in one :class:`~pipeline.io_utils.CheckpointError` line, before anything in the
        run folder changes (``config.json`` is written only after a successful resume).

        Args:
            run: ``pipeline.run_folder.RunFolder`` (no-op unless it resumes) or a checkpoint path
                (default: the trainer's ``run_folder``).

        Returns:
            the step training continues from.
        """
        if run is None:
            run = self.run_folder
        elif hasattr(run, "release"):
            self.run_folder = run
        path = getattr(run, "resume_ckpt", run)
        if path is None:
            return 0
        state = getattr(run, "resume_state", None) or read_resume_state(Path(path), getattr(run, "resume_step", 0))
        step, misc = state["step"], state["misc"]
        load_matching(self.model, state["model"], state["model_path"])
        try:
            self.optimizer.load_state_dict(misc["optimizer"])
            if misc.get("scaler"):
                self.grad_scaler.load_state_dict(misc["scaler"])
            if self.lr_scheduler is not None and misc.get("scheduler") is not None:
                self.lr_scheduler.load_state_dict(misc["scheduler"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"{state['misc_path']}: optimizer state does not fit this run ({type(e).__name__}: {' '.join(str(e).split())[:120]}); "
                "resume with the config of the run that wrote it (its config.json: frozen_parts, optimizer, lr_scheduler)"
            ) from None
        if self.ema is not None:
            if state["ema"] is not None:
                load_matching(self.ema, state["ema"], state["ema_path"])
            else:
                logger.warning(f"no EMA checkpoint for step {step}: EMA restarts from the current weights")
                self.ema.reset()
        sampler = getattr(self.data_loader, "sampler", None)
        if sampler is not None and hasattr(sampler, "start_step"):
            sampler.start_step = int(misc.get("sampler", {}).get("start_step", step))
        if misc.get("rng") is not None:
            set_rng_state(misc["rng"])
        self.state.iteration = int(misc["step"])
        self.resumed_step = self.state.iteration  # TensorBoard hides what an earlier run logged after it
        self.state.epoch = 0
        self.state.nonfinite_steps = int(misc.get("nonfinite_steps", 0))
        if hasattr(run, "commit"):
            run.commit()
        if self.state.iteration >= self.state.epoch_length:
            logger.warning(f"checkpoint step {step} >= max_steps {self.state.epoch_length}: nothing left to train")
        return self.state.iteration

    def run(self) -> None:  # noqa: D102
        from pipeline.run_folder import setup_done

        setup_done()
        cases = getattr(getattr(self.data_loader, "dataset", None), "cases", None)
        if self.run_folder is not None and cases is not None and D.is_main():  # what evaluate marks as seen in training
            from pipeline.io_utils import save_json

            save_json(Path(self.run_folder.output_dir) / "cases.json", {"train": sorted(c["key"] for c in cases)})
        try:
            if self.state.iteration >= (self.state.epoch_length or 0) and self.state.iteration > 0:
                return
            # The DataLoader forks its workers next. Unreachable cycles holding CUDA tensors (an earlier
            # stage run in this process) must be freed here: a worker whose collector frees one aborts.
            gc.collect()
            super().run()
            if self.started_at is not None:  # the clock starts after the first step
                seconds = time.perf_counter() - self.started_at
                logger.info(f"Training finished: {self.state.iteration} steps, {seconds:.1f} s after the first step")
                if self.graph_steps is not None:
                    logger.info(f"{self.graph_steps.replays} steps replayed from CUDA graphs")
        finally:
            if self.run_folder is not None:
                self.run_folder.release()

"""Grid training steps replayed as CUDA graphs.

On small crops a training step of this model is bound by launching its ~700 small kernels, not by
arithmetic (eagerly a 64^3 crop took 36 ms, a 128^3 one 50 ms). With ``all_cells=True`` the
model's grid forward has shapes fixed by the grid's and no host sync, so forward, loss and
backward can be recorded once as a CUDA graph and then replayed with one launch. What stays
outside the graph: the optimizer step (GradScaler's inf check syncs), and the codebook's
bookkeeping (``SparseVQVAE.finish_quantizer_step``: usage counts, reservoir, dead-code restarts).

Grids are padded (with inactive voxels, which change nothing) to a bucket: each edge rounded up
to ``bucket`` voxels. A bucket is captured the second time it comes (the first step of a shape
runs eagerly, the same computation, and sets up what capture needs); at most ``max_graphs``
buckets get a graph, only those of at most ``max_voxels`` voxels per batch. The graphs share one
memory pool (so they hold the memory of the largest, not the sum): safe because they never run
at once and each replay's outputs are read before the next replay. Everything else runs eagerly:
every step until the codebook is initialised (k-means reads the first steps' latents on the
host), and every step of a model with residual depth dropout (its depth is drawn on the host).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from networks.grid import GridBatch
from networks.quantizer import codebooks_initialised

__all__ = ["GraphedSteps"]

logger = logging.getLogger("ctvq.train")


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: GridBatch  # the static input the graph reads
    terms: dict  # the static loss terms it writes
    pending: list  # (quantizer, its bookkeeping tensors) the graph writes


class GraphedSteps:
    """Forward, loss and backward of grid training steps, replayed from CUDA graphs where it can.

    Args:
        model: a ``networks.SparseVQVAE`` with the grid path (the unwrapped module).
        params: the trainable parameters (their gradients are zeroed by each step, never set to None,
            so the graphs keep writing where the optimizer reads).
        terms_of: ``GridBatch -> dict`` of 0-dim loss terms with ``"loss"`` (the model called with
            ``all_cells=True`` under an autocast with ``cache_enabled=False``).
        scaler: the ``torch.amp.GradScaler`` that scales ``"loss"`` for the backward pass.
        enabled: False runs every step eagerly (CPU, several processes, checkpointing).
        bucket, max_graphs, max_voxels: see the module notes.
    """

    def __init__(self, model, params, terms_of: Callable[[GridBatch], dict], scaler, enabled: bool = True,
                 bucket: int = 32, max_graphs: int = 6, max_voxels: int = 2 * 192**3):
        self.model = model
        self.params = list(params)
        self.terms_of = terms_of
        self.scaler = scaler
        self.enabled = bool(enabled)
        self.bucket = int(bucket)
        self.max_graphs = int(max_graphs)
        self.max_voxels = int(max_voxels)
        self.graphs: dict[tuple, _Graph | None] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self.seen: Counter = Counter()
        self.replays = 0

    def _shape(self, x: GridBatch) -> tuple:
        b, *edges = x.active.shape
        step = math.lcm(self.bucket, int(self.model.factor))  # the grid must stay whole latent cells
        return (b, *(-(-int(e) // step) * step for e in edges))

    @staticmethod
    def _padded(x: GridBatch, shape: tuple) -> GridBatch:
        if tuple(x.active.shape) == shape:
            return x
        pad = []  # F.pad counts from the last axis: nothing before, the bucket's excess after
        for have, want in zip(reversed(x.active.shape[1:]), reversed(shape[1:])):
            pad += [0, want - have]
        return GridBatch(F.pad(x.values, [0, 0, *pad]), F.pad(x.active, pad), x.origin.clone(), x.spatial_shape,
                         None if x.crop_faces is None else x.crop_faces.clone())

    @staticmethod
    def _load(into: GridBatch, x: GridBatch) -> None:
        """``x`` into a graph's static input; what lies beyond it is zeroed (an earlier, larger grid of
        the same bucket left values there)."""
        at = tuple(slice(0, n) for n in x.active.shape)
        if tuple(into.active.shape) != tuple(x.active.shape):
            into.values.zero_()
            into.active.zero_()
        into.values[at].copy_(x.values)
        into.active[at].copy_(x.active)
        into.origin.copy_(x.origin)
        if into.crop_faces is not None and x.crop_faces is not None:
            into.crop_faces.copy_(x.crop_faces)

    def _zero_grads(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)

    def _ready(self) -> bool:
        """Whether the step can be captured yet: every codebook initialised, and no residual depth
        dropout (its depth is drawn on the host, so a graph would keep the depth of its capture)."""
        return (codebooks_initialised(self.model.vq)
                and not any(getattr(m, "depth_dropout", False) and getattr(m, "depth", 1) > 1 for m in self.model.vq.modules()))

    def __call__(self, x: GridBatch) -> dict:
        """One step's forward, loss and backward (gradients left in ``params``' ``.grad``); returns the terms."""
        shape = self._shape(x)
        entry = self.graphs.get(shape)
        if entry is None and self._should_capture(shape):
            entry = self.graphs[shape] = self._capture(self._padded(x, shape))
        if entry is not None:
            self._load(entry.inputs, x)
            entry.graph.replay()
            self.replays += 1
            for quantizer, pending in entry.pending:
                quantizer.finish_step(pending)
            return entry.terms
        if self._ready():  # an eager step warms up the code a capture records (the usage loss runs once initialised)
            self.seen[shape] += 1
        self._zero_grads()
        terms = self.terms_of(self._padded(x, shape))
        self.scaler.scale(terms["loss"]).backward()
        self.model.finish_quantizer_step()
        return terms

    def _should_capture(self, shape: tuple) -> bool:
        voxels = math.prod(shape[:4])
        captured = sum(g is not None for g in self.graphs.values())
        return (self.enabled and shape not in self.graphs and self.seen[shape] >= 1 and self._ready()
                and captured < self.max_graphs and voxels <= self.max_voxels)

    def _capture(self, x: GridBatch) -> _Graph | None:
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            # thread_local: the data loader's pin-memory thread keeps working during the capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self._zero_grads()
                terms = self.terms_of(x)
                self.scaler.scale(terms["loss"]).backward()
        except RuntimeError as e:  # something in the step syncs with the host: this shape stays eager
            cause = e.__context__ or e  # the error inside the capture, not the one ending it
            logger.warning(f"grid {tuple(x.active.shape)}: training step not captured as a CUDA graph, it runs "
                           f"eagerly ({type(cause).__name__}: {' '.join(str(cause).split())[:300]})")
            self.model.vq.apply(lambda m: m.__dict__.pop("pending", None))
            return None
        pending = [(m, m.__dict__.pop("pending")) for m in self.model.vq.modules() if "pending" in m.__dict__]
        logger.info(f"grid {tuple(x.active.shape)}: training step captured as a CUDA graph")
        # capture records without running: this step's work is the first replay, in __call__
        return _Graph(graph, x, terms, pending)

"""Vector quantizer with straight-through gradients, k-means init, dead-code restart and usage stats.

How the trainer uses it:

- ``z_q, indices, losses = vq(z)`` inside the model's forward; ``losses["vq"]`` (codebook loss,
  ``||sg[z] - e||^2``) and ``losses["commitment"]`` (``||z - sg[e]||^2``) are unweighted.
  With ``codebook_update="ema"`` the codebook follows EMA cluster means and ``losses["vq"]`` is 0.
- K-means initialisation: with ``kmeans_init=True`` (model kwarg ``vq_kmeans_init``) the quantizer
  collects encoder outputs into a reservoir during its first training forwards and, as soon as
  the reservoir holds ``kmeans_init_points`` vectors, runs k-means on it and writes the centres into
  the codebook (automatic, nothing for the trainer to call). ``vq.kmeans_init_from_reservoir()``
  does it on demand (after feeding ``vq.collect(z)``), e.g. right after loading pretrained weights.
- Dead codes: every ``restart_every`` training steps, codes unused for ``dead_code_steps`` steps are
  re-seeded with random recent encoder outputs from the reservoir (``restart_every=0`` disables).
  With ``dead_code_share`` > 0, so are codes still used but rarely: those whose recent usage (an
  average over about the last ``dead_code_steps`` steps) is below that share of the average code's.
  The usage loss cannot move such codes (a far code gets no soft assignment, so no gradient); the
  restart draws them from the reservoir, in proportion to where encoder outputs lie, so the book
  leaves the tails of the training scans for the content most scans hold (see Jukebox's threshold
  restarts, Dhariwal et al. 2020).
- Usage: ``usage_stats()`` -> perplexity, share of codes used and count used since
  ``reset_usage()``.
- Usage loss: with ``entropy_weight > 0`` the forward also returns ``losses["entropy"]`` (already
  weighted): the mean entropy of each vector's soft assignment to the codes minus the entropy of
  their mean assignment, over at most ``entropy_rows`` vectors of the batch, divided by log K.
  Minimising it keeps each assignment sharp and spreads the vectors over the whole book, as the
  entropy penalty of lookup-free quantisation (MAGVIT-v2) does; the soft assignment is a softmax of
  minus the squared distances over ``entropy_temperature`` times their mean nearest distance, so it
  does not depend on the latents' scale. The mean assignment is taken per sample (the default
  ``entropy_scope="sample"``, with ``vq(z, groups=batch_index, num_groups=B)``; each sample weighted
  by its share of the rows), so every crop has to spread over the book by itself: a batch of two
  scans cannot score well by giving each scan its own half of the codes, which a single new scan
  would then leave unused. ``entropy_scope="batch"`` (or no ``groups``) takes it over the batch.

Variants (``build_quantizer``): the plain lookup above (``vq_type="vq"``, codebook
``embeddings.weight`` [K, D]); a factorised lookup (``"factorized"``: project D -> ``lookup_dim``,
l2-normalise, look up in an l2-normalised codebook [K, lookup_dim], project back; k-means, restarts
and the reservoir live in the lookup space); a shared-map lookup (``"simvq"``: the codes are a fixed
[K, D] basis times one learned D x D map, so the codebook loss moves every code at once and none is
left behind; k-means sets the basis and resets the map to identity); finite scalar quantisation (``"fsq"``,
:class:`FSQuantizer`: no codebook, no auxiliary loss); and residual depth
(:class:`ResidualQuantizer`: D quantizers, each on what the earlier ones left, codes [N, D]).

Distances and losses are computed in fp32 with autocast off. Under ``torch.distributed`` the
usage counts and EMA statistics are all-reduced, and k-means / restarts run on rank 0 and are
broadcast, so every rank keeps the same codebook.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

__all__ = ["VectorQuantizer", "FSQuantizer", "ResidualQuantizer", "build_quantizer", "kmeans", "codebooks_initialised",
           "QUANTIZERS", "ENTROPY_SCOPES"]

logger = logging.getLogger(__name__)


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def codebooks_initialised(quantizer: nn.Module) -> bool:
    """Whether every codebook in ``quantizer`` (one, or the levels of a residual one) has had its
    k-means initialisation (a host-side flag: no GPU sync)."""
    return all(getattr(m, "_py_initialized", True) for m in quantizer.modules())


def weighted_mse(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of rows [N, D], each row weighted (None: ``F.mse_loss``)."""
    if weights is None:
        return F.mse_loss(a, b)
    w = weights.float()
    return ((a - b).square().sum(1) * w).sum() / (w.sum() * a.shape[1]).clamp_min(1.0)


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of the nearest codebook row for each row of ``z`` (fp32, rows in chunks)."""
    z = z.float()
    e = codebook.float()
    e2 = (e * e).sum(1)
    out = []
    for s in range(0, z.shape[0], chunk):  # bounded memory: chunk x K distances
        zc = z[s : s + chunk]
        d = e2[None, :] - 2.0 * zc @ e.t()  # ||z||^2 is constant per row
        out.append(d.argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means (k-means++-free: random init from the data); empty clusters re-seeded.

    Args:
        x: [M, D] data (fp32).
        k: number of centres.
        iters: Lloyd iterations.
    Returns:
        [k, D] centres.
    """
    x = x.float()
    m = x.shape[0]
    if m == 0:
        raise ValueError("k-means needs data: the reservoir is empty; run training forwards or vq.collect(z) first.")
    perm = torch.randint(m, (k,), device=x.device, generator=generator) if m < k else torch.randperm(m, device=x.device, generator=generator)[:k]
    c = x[perm].clone()
    for _ in range(iters):
        c = lloyd_step(x, c, generator)
    return c


def lloyd_step(x: torch.Tensor, c: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Centres moved to the means of their nearest rows; a centre with none drawn again from the rows."""
    k = c.shape[0]
    a = nearest_code(x, c)
    sums = torch.zeros_like(c).index_add_(0, a, x)
    cnt = torch.bincount(a, minlength=k).float()
    empty = cnt == 0
    return torch.where(empty[:, None], x[torch.randint(x.shape[0], (k,), device=x.device, generator=generator)],
                       sums / cnt.clamp_min(1)[:, None])


def perplexity_of(counts: torch.Tensor) -> dict:
    """``{"perplexity", "usage", "codes_used"}`` of a code-count vector (floats)."""
    total = counts.sum()
    if float(total) == 0:
        return {"perplexity": 0.0, "usage": 0.0, "codes_used": 0}
    p = counts / total
    p = p[p > 0]
    used = int((counts > 0).sum())
    return {"perplexity": float((-(p * p.log()).sum()).exp()), "usage": used / counts.numel(), "codes_used": used}


#: rows of the usage loss's soft assignments computed at once (each chunk holds rows x K floats)
ENTROPY_CHUNK = 1024


def _soft_assignment(zl: torch.Tensor, codes: torch.Tensor, sq: torch.Tensor, scale: torch.Tensor,
                     member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft assignment of rows ``zl`` to ``codes`` (softmax of minus squared distances / ``scale``):
    the weighted sum of the rows' entropies and each sample's weighted sum of assignments [G, K]."""
    # -||z - c||^2 / scale up to a per-row constant, which the softmax ignores
    logits = torch.addmm(-sq / scale, zl * (2.0 / scale), codes.t())
    p = torch.softmax(logits, 1)
    entropy = torch.logsumexp(logits, 1) - torch.linalg.vecdot(p, logits)
    return (entropy * member.sum(0)).sum(), member @ p


class VectorQuantizer(nn.Module):
    """Codebook ``embeddings.weight`` [K, D] with straight-through quantisation.

    Args:
        num_embeddings: K codes.
        embedding_dim: D (the encoder's latent channels).
        codebook_update: ``"gradient"`` (codebook loss trains the codebook) or ``"ema"``.
        ema_decay: decay of the EMA statistics.
        kmeans_init: initialise the codebook by k-means on collected encoder outputs.
        kmeans_init_points: reservoir size that triggers the automatic k-means.
        kmeans_iters: Lloyd iterations.
        reservoir_size: capacity of the reservoir of recent encoder outputs.
        restart_every: check for dead codes every this many training steps (0: never).
        dead_code_steps: a code unused this many steps is dead.
        dead_code_share: a code whose recent usage is below this share of the average code's is
            restarted too (0: only unused codes).
        lookup_dim: factorised lookup in an l2-normalised space of this size (None: plain lookup
            of the D-dimensional vectors, the default).
        shared_map: codes = ``embeddings.weight`` (fixed) @ ``code_map`` (learned, D x D), as SimVQ
            (Zhu et al. 2024); gradient codebook update only.
        entropy_weight: weight of the usage loss (0: none).
        entropy_temperature: softness of the usage loss's assignments, relative to the mean nearest
            squared distance.
        entropy_rows: vectors of a batch the usage loss looks at (a random subset of larger batches).
        entropy_scope: ``"sample"`` (default: the mean assignment per sample, weighted by its share of
            the rows; without ``groups`` in the forward the batch is one sample) or ``"batch"``.
    """

    def __init__(
        self,
        num_embeddings: int = 8192,
        embedding_dim: int = 32,
        codebook_update: str = "gradient",
        ema_decay: float = 0.99,
        kmeans_init: bool = False,
        kmeans_init_points: int = 65536,
        kmeans_iters: int = 10,
        reservoir_size: int = 65536,
        restart_every: int = 0,
        dead_code_steps: int = 1000,
        dead_code_share: float = 0.0,
        eps: float = 1e-5,
        lookup_dim: int | None = None,
        shared_map: bool = False,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.1,
        entropy_rows: int = 4096,
        entropy_scope: str = "sample",
    ):
        super().__init__()
        if codebook_update not in ("gradient", "ema"):
            raise ValueError(f"codebook_update={codebook_update!r} is not one of 'gradient', 'ema'.")
        if not entropy_weight >= 0:
            raise ValueError(f"network_def#vq_entropy_weight={entropy_weight}: the usage loss's weight must be >= 0 "
                             "(0 turns it off, the configs ship 0.1)")
        if not entropy_temperature > 0 or int(entropy_rows) < 1:
            raise ValueError(f"network_def#vq_entropy_temperature={entropy_temperature} must be > 0 and "
                             f"network_def#vq_entropy_rows={entropy_rows} >= 1")
        if not 0.0 <= dead_code_share < 1.0:
            raise ValueError(f"network_def#vq_dead_code_share={dead_code_share} must be in [0, 1): the share of the "
                             "average code's usage below which a code is restarted (0 turns it off)")
        if entropy_scope not in ENTROPY_SCOPES:
            raise ValueError(f"network_def#vq_entropy_scope={entropy_scope!r} is not one of {list(ENTROPY_SCOPES)}.")
        if shared_map and (codebook_update != "gradient" or lookup_dim):
            raise ValueError("vq_type='simvq' learns its codes through one shared map: set codebook_update='gradient' "
                             "and no lookup_dim.")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.codebook_update = codebook_update
        self.ema_decay = ema_decay
        self.kmeans_init = kmeans_init
        self.kmeans_init_points = min(kmeans_init_points, reservoir_size)
        self.kmeans_iters = kmeans_iters
        self.reservoir_size = reservoir_size
        self.restart_every = restart_every
        self.dead_code_steps = dead_code_steps
        self.dead_code_share = float(dead_code_share)
        self.eps = eps
        self.lookup_dim = lookup_dim
        self.entropy_weight = float(entropy_weight)
        self.entropy_temperature = float(entropy_temperature)
        self.entropy_rows = int(entropy_rows)
        self.entropy_scope = entropy_scope
        if lookup_dim:
            self.in_proj = nn.Linear(embedding_dim, lookup_dim)
            self.out_proj = nn.Linear(lookup_dim, embedding_dim)
        dim = lookup_dim or embedding_dim
        self.code_dim = dim

        self.embeddings = nn.Embedding(num_embeddings, dim)
        self.shared_map = shared_map
        if shared_map:
            nn.init.normal_(self.embeddings.weight, std=dim**-0.5)
            self.code_map = nn.Linear(dim, dim, bias=False)
            nn.init.eye_(self.code_map.weight)
        else:
            nn.init.uniform_(self.embeddings.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)
        if not self.optimizer_trains_codebook:
            self.embeddings.weight.requires_grad_(False)
        self.register_buffer("ema_cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("ema_embed_sum", self.embeddings.weight.detach().clone())
        self.register_buffer("usage_counts", torch.zeros(num_embeddings, dtype=torch.float64))
        self.register_buffer("last_used", torch.zeros(num_embeddings, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        # recent usage per code (EMA over about dead_code_steps steps) and the step each code got its
        # vector: not saved, so checkpoints keep their keys; a loaded model starts a new window
        self.register_buffer("recent_usage", torch.zeros(num_embeddings), persistent=False)
        self.register_buffer("born", torch.zeros(num_embeddings, dtype=torch.long), persistent=False)
        # reservoir of recent encoder outputs: a plain attribute, not a buffer, so that DDP's
        # buffer broadcast never sees its rank-dependent size (not saved in checkpoints)
        self.reservoir = torch.zeros(0, dim)
        self._py_step = 0
        self._py_initialized = not kmeans_init
        # set by a stage's frozen_parts ["vq"]: training counts usage but moves no code (no EMA,
        # restart or k-means), as requires_grad alone would leave restarts and EMA running
        self.book_frozen = False

    @property
    def optimizer_trains_codebook(self) -> bool:
        """False when ``embeddings.weight`` must stay out of the optimizer (EMA statistics or the fixed
        basis of the shared map update it)."""
        return self.codebook_update == "gradient" and not self.shared_map

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._py_initialized = bool(self.initialized)
        self._py_step = int(self.step)
        self.recent_usage.zero_()
        self.born.fill_(self._py_step)

    # ------------------------------------------------------------------ reservoir
    @torch.no_grad()
    def collect(self, z: torch.Tensor) -> None:
        """Offer encoder outputs [N, D] to the reservoir (random subset once full)."""
        z = z.detach().float().reshape(-1, self.code_dim)
        if z.shape[0] == 0:
            return
        cap = self.reservoir_size
        if z.shape[0] > cap:
            z = z[torch.randperm(z.shape[0], device=z.device)[:cap]]
        res = self.reservoir.to(z.device)
        free = cap - res.shape[0]
        if free > 0:
            res = torch.cat([res, z[:free]], 0)
            z = z[free:]
        if z.shape[0]:
            # replace random slots: keeps a mix of older and recent outputs
            slots = torch.randint(cap, (z.shape[0],), device=z.device)
            res[slots] = z
        self.reservoir = res

    def _reservoir_ready(self) -> bool:
        """True once every rank's reservoir holds ``kmeans_init_points`` (same answer on all ranks)."""
        n = self.reservoir.shape[0]
        if _dist():  # during the first steps only: one tiny all-reduce
            t = torch.tensor([n], device=self.embeddings.weight.device, dtype=torch.long)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            n = int(t)
        return n >= self.kmeans_init_points

    @torch.no_grad()
    def kmeans_init_from_reservoir(self, iters: int | None = None) -> None:
        """Set the codebook to k-means centres of the reservoir (rank 0, then broadcast)."""
        if self.reservoir.shape[0] == 0 and (not _dist() or dist.get_rank() == 0):
            raise ValueError("vq reservoir is empty: run training forwards or vq.collect(z) before k-means init.")
        centres = None
        if not _dist() or dist.get_rank() == 0:
            centres = kmeans(self.reservoir, self.num_embeddings, iters or self.kmeans_iters)
        self._set_codes(centres)
        logger.info("vq: k-means initialised %d codes from %d encoder outputs", self.num_embeddings, self.reservoir.shape[0])
        if self.reservoir.shape[0] < self.num_embeddings:
            logger.warning("vq: k-means had %d encoder outputs for %d codes, so many codes start as copies of the same "
                           "output; set network_def#vq_kmeans_init_points to at least %d", self.reservoir.shape[0],
                           self.num_embeddings, 4 * self.num_embeddings)

    @torch.no_grad()
    def refit(self, z: torch.Tensor, iters: int = 20, generator: torch.Generator | None = None) -> None:
        """Set the codebook to k-means centres of encoder outputs ``z`` [N, D]: the book fitted again,
        after training, to the latents of whole scans (``pipeline.handlers.CodebookRefitHandler``).
        This process fits alone, also under ``torch.distributed``: the caller shares the result."""
        centres = kmeans(self.to_lookup(z.to(self.embeddings.weight.device)), self.num_embeddings, iters, generator)
        self._set_codes(centres, broadcast=False)

    @torch.no_grad()
    def _set_codes(self, centres: torch.Tensor | None, broadcast: bool = True) -> None:
        """New code vectors [K, code_dim] (rank 0's; None on the others) and a fresh start for every
        statistic that follows the codes."""
        if centres is not None:
            self.embeddings.weight.data.copy_(centres.to(self.embeddings.weight.dtype))
        if broadcast and _dist():
            dist.broadcast(self.embeddings.weight.data, 0)
        if self.shared_map:
            nn.init.eye_(self.code_map.weight)
        self.ema_embed_sum.copy_(self.embeddings.weight.data.float())
        self.ema_cluster_size.fill_(1.0)
        self.initialized.fill_(True)
        self._py_initialized = True
        self.last_used.fill_(self._py_step)
        self.recent_usage.zero_()
        self.born.fill_(self._py_step)

    @torch.no_grad()
    def rarely_used(self) -> torch.Tensor:
        """[K] bool: codes of at least ``dead_code_steps`` steps whose recent usage is below
        ``dead_code_share`` of the average such code's (none while ``dead_code_share`` is 0)."""
        age = self.step - self.born
        settled = age >= self.dead_code_steps
        if self.dead_code_share <= 0:
            return torch.zeros_like(settled)
        decay = 1.0 - 1.0 / self.dead_code_steps
        usage = self.recent_usage / (1.0 - decay ** age.clamp_min(1).double()).float()  # EMA bias corrected
        average = (usage * settled).sum() / settled.sum().clamp_min(1)
        return settled & (usage < self.dead_code_share * average)

    @torch.no_grad()
    def restart_dead_codes(self) -> int:
        """Re-seed from the reservoir the codes unused for ``dead_code_steps`` steps and, with
        ``dead_code_share``, the rarely used ones; returns how many."""
        unused = (self.step - self.last_used) >= self.dead_code_steps
        rare = self.rarely_used() & ~unused
        dead = unused | rare
        n = int(dead.sum())  # sync: runs every `restart_every` steps only; same on all ranks
        if n == 0:
            return 0
        w = self.embeddings.weight.data
        if (not _dist() or dist.get_rank() == 0) and self.reservoir.shape[0] > 0:
            pick = torch.randint(self.reservoir.shape[0], (n,), device=w.device)
            new = self.reservoir.to(w.device)[pick]
            new = new + 0.01 * new.std() * torch.randn_like(new)
            if self.shared_map:  # the basis rows whose mapped codes land on the picked outputs
                new = torch.linalg.solve(self.code_map.weight.float(), new.T).T
            w[dead] = new.to(w.dtype)
        if _dist():
            dist.broadcast(w, 0)
        self.ema_embed_sum[dead] = w[dead].float()
        self.ema_cluster_size[dead] = 1.0
        self.last_used[dead] = self.step
        self.recent_usage[dead] = 0.0
        self.born[dead] = self.step
        if self.dead_code_share > 0:
            logger.info("vq: restarted %d dead codes (%d rarely used)", n, int(rare.sum()))
        else:
            logger.info("vq: restarted %d dead codes", n)
        return n

    # ------------------------------------------------------------------ stats
    def reset_usage(self) -> None:
        """Start a new usage window for :meth:`usage_stats`."""
        self.usage_counts.zero_()

    @torch.no_grad()
    def usage_stats(self) -> dict:
        """``{"perplexity", "usage", "codes_used"}`` since the last :meth:`reset_usage` (floats)."""
        return perplexity_of(self.usage_counts)

    # ------------------------------------------------------------------ forward
    def codes(self) -> torch.Tensor:
        """The codebook as looked up: [K, code_dim] fp32 (rows l2-normalised when factorised)."""
        w = self.embeddings.weight.float()
        if self.shared_map:
            return self.code_map(w)
        return F.normalize(w, dim=1) if self.lookup_dim else w

    def to_lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder vectors [N, D] -> the space codes are looked up in (fp32)."""
        z = z.float()
        return F.normalize(self.in_proj(z), dim=1) if self.lookup_dim else z

    def from_lookup(self, e: torch.Tensor) -> torch.Tensor:
        """Looked-up vectors -> decoder inputs [N, D]."""
        return self.out_proj(e) if self.lookup_dim else e

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors [M, D] of ``indices`` [M]."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self.from_lookup(self.codes()[indices.long()])

    def quantize_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code index [N] of each row of ``z`` [N, D] (fp32)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return nearest_code(self.to_lookup(z), self.codes())

    def forward(self, z: torch.Tensor, groups: torch.Tensor | None = None, num_groups: int = 1,
                weights: torch.Tensor | None = None):
        """Quantise ``z`` [N, D]; ``groups`` [N] (sample of each row, < ``num_groups``) serves the
        usage loss of ``entropy_scope="sample"``.

        ``weights`` [N] (1 for a row that counts, 0 for one that does not; the latent cells of a
        dense grid outside the body) makes every loss a weighted mean and leaves the codebook's
        bookkeeping (usage counts, reservoir, dead-code restarts) to :meth:`finish_step`, so the
        forward has fixed shapes and no host sync once the codebook is initialised (a CUDA graph
        can hold it).

        Returns:
            z_q [N, D] (straight-through: forward = codes, gradient flows to ``z``), indices [N]
            int64, losses ``{"vq", "commitment"}`` (0-dim fp32, unweighted, in the lookup space), and
            in training with ``entropy_weight > 0`` ``"entropy"`` (weighted).
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            zl = self.to_lookup(z)
            if self.training and not self._py_initialized and not self.book_frozen:
                self.collect(zl if weights is None else zl[weights > 0])
                if self._reservoir_ready():
                    self.kmeans_init_from_reservoir()
            codes = self.codes()
            idx = nearest_code(zl.detach(), codes)
            e = codes[idx]
            commitment = weighted_mse(zl, e.detach(), weights)
            if self.codebook_update == "gradient":
                vq_loss = weighted_mse(e, zl.detach(), weights)
            else:
                vq_loss = zl.new_zeros(())
            losses = {"vq": vq_loss, "commitment": commitment}
            if self.training and self.entropy_weight > 0 and self._py_initialized:
                # a copy: _train_step below updates the codebook in place (EMA, restarts), which
                # autograd would not see in the backward pass
                losses["entropy"] = self.entropy_weight * self.usage_entropy(zl, codes.clone(), groups, num_groups, weights)
            if self.training:
                if weights is None:
                    self._train_step(zl.detach(), idx)
                else:
                    self.pending = (zl.detach(), idx, weights)
            z_q = self.from_lookup(zl + (e - zl).detach())
        return z_q.to(z.dtype), idx, losses

    @torch.no_grad()
    def finish_step(self, pending: tuple | None = None) -> None:
        """The bookkeeping a weighted training forward left (``pending``, default the last one's):
        usage counts, reservoir and dead-code restarts over the rows of weight > 0."""
        pending = pending or self.__dict__.pop("pending", None)
        if pending is not None:
            z, idx, weights = pending
            keep = weights > 0
            self._train_step(z[keep], idx[keep])

    def usage_entropy(self, zl: torch.Tensor, codes: torch.Tensor, groups: torch.Tensor | None = None,
                      num_groups: int = 1, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(mean per-vector entropy - entropy of the mean assignment, per sample of ``groups`` or over
        all rows) / log K: in [-1, 0], lower is sharper assignments spread over more codes
        (unweighted; rows of ``weights`` 0 do not count; see the module notes)."""
        if groups is None or self.entropy_scope != "sample":  # the batch as one sample
            groups, num_groups = torch.zeros(zl.shape[0], dtype=torch.long, device=zl.device), 1
        weighted = weights is not None
        if not weighted:
            weights = zl.new_ones(zl.shape[0])
        if zl.shape[0] > self.entropy_rows:
            # with weights, rows drawn with replacement: a fixed count without a host sync
            keep = (torch.randint(zl.shape[0], (self.entropy_rows,), device=zl.device) if weighted
                    else torch.randperm(zl.shape[0], device=zl.device)[: self.entropy_rows])
            zl, groups, weights = zl[keep], groups[keep], weights[keep]
        if zl.shape[0] == 0:
            return zl.new_zeros(())
        w = weights.float()
        total = w.sum().clamp_min(1.0)
        sq = (codes * codes).sum(1)
        with torch.no_grad():  # the temperature: a share of the mean nearest squared distance
            nearest = (zl * zl).sum(1) - torch.addmm(-sq, zl, codes.t(), alpha=2.0).amax(1)
            scale = (self.entropy_temperature * (nearest * w).sum() / total).clamp_min(1e-8)
        # member[g, i]: row i's weight in sample g (a comparison, not one_hot, which syncs to check its input)
        member = (groups.long()[None] == torch.arange(num_groups, device=zl.device)[:, None]).float() * w
        per_vector, sums = zl.new_zeros(()), zl.new_zeros(num_groups, codes.shape[0])
        for start in range(0, zl.shape[0], ENTROPY_CHUNK):
            part = slice(start, start + ENTROPY_CHUNK)
            # recomputed in the backward pass: a chunk's [rows, K] assignments are never all kept
            chunk_entropy, chunk_sums = torch.utils.checkpoint.checkpoint(
                _soft_assignment, zl[part], codes, sq, scale, member[:, part], use_reentrant=False, preserve_rng_state=False)
            per_vector, sums = per_vector + chunk_entropy, sums + chunk_sums
        counts = member.sum(1)
        mean_p = sums / counts.clamp_min(1.0)[:, None]
        of_means = -(mean_p * mean_p.clamp_min(1e-12).log()).sum(1)
        of_mean = (of_means * counts).sum() / counts.sum().clamp_min(1.0)  # each sample by its share of the rows
        return (per_vector / total - of_mean) / math.log(self.num_embeddings)

    @torch.no_grad()
    def _train_step(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        k = self.num_embeddings
        # index_add_ rather than bincount, which reads the largest index on the host first
        counts = torch.zeros(k, dtype=torch.float64, device=idx.device).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
        ema = self.codebook_update == "ema"
        if ema:
            sums = torch.zeros(k, self.code_dim, device=z.device).index_add_(0, idx, z)
        if _dist():
            dist.all_reduce(counts)
            if ema:
                dist.all_reduce(sums)
        self.usage_counts += counts
        if self.dead_code_share > 0:
            self.recent_usage.lerp_(counts.to(self.recent_usage.dtype), 1.0 / self.dead_code_steps)
        self.step += 1
        self._py_step += 1
        self.last_used.copy_(torch.where(counts > 0, self.step, self.last_used))
        if self.book_frozen:  # usage is still counted for the logs; the codes stay as they are
            return
        if ema:
            d = self.ema_decay
            self.ema_cluster_size.mul_(d).add_(counts.float(), alpha=1 - d)
            self.ema_embed_sum.mul_(d).add_(sums, alpha=1 - d)
            n = self.ema_cluster_size.sum()
            size = (self.ema_cluster_size + self.eps) / (n + k * self.eps) * n
            self.embeddings.weight.data.copy_(self.ema_embed_sum / size[:, None])
        if self.restart_every and self._py_step % self.restart_every == 0:
            self.collect(z)
            self.restart_dead_codes()
        elif self.restart_every:
            # keep recent outputs around for restarts (cheap: a random subset)
            self.collect(z[torch.randint(z.shape[0], (min(z.shape[0], 4096),), device=z.device)] if z.shape[0] else z)


class FSQuantizer(nn.Module):
    """Finite scalar quantisation: project D -> len(levels), bound each dimension to its number of
    levels, round (straight-through), project back. The code index is the mixed-radix number of the
    rounded digits: ``prod(levels)`` codes ((8, 8, 8, 4, 4): 8192), no codebook to learn, collapse
    or restart, no auxiliary loss (``losses`` are zeros).

    With ``fit_init`` (model kwarg ``vq_kmeans_init``, on in stage 1) the first training forward
    fits both projections to the encoder's outputs, as k-means fits a codebook: the input
    projection onto their ``len(levels)`` principal directions, each scaled to unit spread (so the
    bound spreads them over the levels), the output projection back. Without it, stage 1 starts
    from random projections of latents whose scale stage 0 left unconstrained, the bound
    saturates, and the codes collapse (29 of 8192 used in a 2-minute H200 run).

    Args:
        embedding_dim: D (the encoder's latent channels).
        levels: levels per scalar dimension.
        fit_init: fit the projections to the first training batch.
    """

    def __init__(self, embedding_dim: int = 32, levels=(8, 8, 8, 4, 4), fit_init: bool = False):
        super().__init__()
        lv = torch.tensor([int(v) for v in levels], dtype=torch.long)
        if (lv < 2).any():
            raise ValueError(f"fsq_levels={list(levels)}: every dimension needs at least 2 levels.")
        if len(lv) > embedding_dim:
            raise ValueError(f"fsq_levels has {len(lv)} dimensions, more than the {embedding_dim} latent channels.")
        self.embedding_dim = embedding_dim
        self.num_embeddings = int(lv.prod())
        self.kmeans_init = fit_init
        self.in_proj = nn.Linear(embedding_dim, len(lv))
        self.out_proj = nn.Linear(len(lv), embedding_dim)
        self.register_buffer("levels", lv, persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), 0), persistent=False)
        self.register_buffer("usage_counts", torch.zeros(self.num_embeddings, dtype=torch.float64))
        self.register_buffer("initialized", torch.tensor(not fit_init))
        self._py_initialized = not fit_init
        self.book_frozen = False  # set by a stage's frozen_parts ["vq"]: no fit in training

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "initialized", torch.tensor(True))  # saved before the fit existed: trained
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._py_initialized = bool(self.initialized)

    @torch.no_grad()
    def fit(self, z: torch.Tensor) -> None:
        """Fit both projections to encoder outputs ``z`` [N, D] (rank 0, then broadcast)."""
        k = len(self.levels)
        spread = torch.zeros(k)
        if not _dist() or dist.get_rank() == 0:
            z = z.detach().float().reshape(-1, self.embedding_dim)
            mean = z.mean(0)
            _, sv, v = torch.linalg.svd(z - mean, full_matrices=False)  # rows of v: principal directions
            spread = (sv[:k] / max(1, z.shape[0] - 1) ** 0.5).clamp_min(1e-6)
            directions = v[:k]
            self.in_proj.weight.copy_(directions / spread[:, None])
            self.in_proj.bias.copy_(-(directions @ mean) / spread)
            self.out_proj.weight.copy_(directions.t() * spread[None])
            self.out_proj.bias.copy_(mean)
        if _dist():
            for t in (self.in_proj.weight, self.in_proj.bias, self.out_proj.weight, self.out_proj.bias):
                dist.broadcast(t.data, 0)
        self.initialized.fill_(True)
        self._py_initialized = True
        logger.info("fsq: projections fitted to %d encoder outputs (spread along the %d principal directions: %s)",
                    z.shape[0], k, ", ".join(f"{float(v):.3g}" for v in spread))

    def _digits(self, z: torch.Tensor) -> torch.Tensor:
        """Rounded (straight-through) digits centred on 0: [N, len(levels)] fp32."""
        lv = self.levels.float()
        half = (lv - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        bounded = torch.tanh(self.in_proj(z.float()) + torch.atanh(offset / half)) * half - offset
        return bounded + (bounded.round() - bounded).detach()

    def _value(self, digits: torch.Tensor) -> torch.Tensor:
        return self.out_proj(digits / (self.levels // 2).float())

    def _index(self, digits: torch.Tensor) -> torch.Tensor:
        return ((digits.round().long() + self.levels // 2) * self.basis).sum(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=indices.device.type, enabled=False):
            digits = (indices.long()[:, None] // self.basis) % self.levels - self.levels // 2
            return self._value(digits.float())

    def quantize_indices(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._index(self._digits(z))

    def forward(self, z: torch.Tensor, groups: torch.Tensor | None = None, num_groups: int = 1,
                weights: torch.Tensor | None = None):
        """As :meth:`VectorQuantizer.forward`; ``groups`` is not used (no usage loss)."""
        if self.training and not self._py_initialized and not self.book_frozen:
            self.fit(z if weights is None else z[weights > 0])
        with torch.autocast(device_type=z.device.type, enabled=False):
            digits = self._digits(z)
            idx = self._index(digits.detach())
            if self.training:
                w = torch.ones_like(idx, dtype=torch.float64) if weights is None else weights.double()
                self.usage_counts.index_add_(0, idx, w)
            zero = z.new_zeros((), dtype=torch.float32)
            return self._value(digits).to(z.dtype), idx, {"vq": zero, "commitment": zero.clone()}

    def reset_usage(self) -> None:
        self.usage_counts.zero_()

    @torch.no_grad()
    def usage_stats(self) -> dict:
        return perplexity_of(self.usage_counts)


class ResidualQuantizer(nn.Module):
    """``depth`` quantizers, each quantising what the earlier ones left: codes [N, depth].

    The reconstruction of the first ``d`` levels is the sum of their code vectors, so one model
    decodes at any depth <= ``depth``. In training each step uses a random depth in [1, depth]
    (depth dropout, from torch's global generator, which ``set_determinism`` seeds alike on every
    rank) for the decoder's input, so every prefix is trained to stand on its own, while every level
    quantises (and learns its codes) each step; a level with k-means initialisation runs only once
    the levels before it are initialised. The codebook and usage losses are the means over the
    levels; the commitment loss pulls the encoder's output towards the sum of all levels' codes.

    Args:
        levels: the quantizers, coarsest first.
        depth_dropout: train on a random prefix of the levels.
    """

    def __init__(self, levels, depth_dropout: bool = True):
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.depth = len(self.levels)
        self.depth_dropout = depth_dropout
        self.num_embeddings = self.levels[0].num_embeddings
        self.kmeans_init = any(getattr(q, "kmeans_init", False) for q in self.levels)

    def forward(self, z: torch.Tensor, groups: torch.Tensor | None = None, num_groups: int = 1,
                weights: torch.Tensor | None = None):
        d = self.depth
        if self.training and self.depth_dropout and d > 1:
            d = int(torch.randint(1, d + 1, ()))
        run = self.depth
        if self.training:  # a level waits for the k-means of the levels before it: its inputs depend on them
            ready = [codebooks_initialised(q) for q in self.levels]
            run = ready.index(False) + 1 if False in ready else self.depth
        d = min(d, run)
        residual, outs, idx = z, [], []
        losses = {"vq": z.new_zeros((), dtype=torch.float32)}
        for q in self.levels[:run]:
            zq, i, level_losses = q(residual, groups, num_groups, weights)
            residual = residual - zq.detach()
            outs.append(zq)
            idx.append(i)
            for k, v in level_losses.items():
                if k != "commitment":
                    losses[k] = losses.get(k, 0.0) + v / run
        with torch.autocast(device_type=z.device.type, enabled=False):
            # the encoder commits to what all levels together reconstruct, not to the first code,
            # so its output keeps the detail the deeper levels are there to code
            losses["commitment"] = weighted_mse(z.float(), sum(o.detach().float() for o in outs), weights)
        return sum(outs[:d]), torch.stack(idx, 1), losses

    @torch.no_grad()
    def refit(self, z: torch.Tensor, iters: int = 20, generator: torch.Generator | None = None) -> None:
        """Each level's codebook fitted again (:meth:`VectorQuantizer.refit`) to what the levels
        before it, already refitted, leave of ``z``; levels without a codebook are kept."""
        residual = z.float()
        for q in self.levels:
            if hasattr(q, "refit"):
                q.refit(residual, iters, generator)
            residual = residual - q.lookup(q.quantize_indices(residual))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Sum of the code vectors of the levels given: ``indices`` [M, d], d <= depth."""
        if indices.dim() == 1:
            indices = indices[:, None]
        return sum(q.lookup(indices[:, l]) for l, q in enumerate(self.levels[: indices.shape[1]]))

    def quantize_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Codes [N, depth]: level by level on the residual."""
        residual, idx = z.float(), []
        for q in self.levels:
            i = q.quantize_indices(residual)
            residual = residual - q.lookup(i)
            idx.append(i)
        return torch.stack(idx, 1)

    def reset_usage(self) -> None:
        for q in self.levels:
            q.reset_usage()

    @torch.no_grad()
    def usage_stats(self) -> dict:
        """The first level's usage, and every level's under ``"levels"``."""
        per_level = [q.usage_stats() for q in self.levels]
        return {**per_level[0], "levels": per_level}


#: what the usage loss spreads over the book: the whole batch, or each sample by itself
ENTROPY_SCOPES = ("batch", "sample")

#: quantizer kinds of ``network_def#vq_type``
QUANTIZERS = ("vq", "factorized", "simvq", "fsq")


def build_quantizer(vq_type: str = "vq", depth: int = 1, num_embeddings: int = 8192, embedding_dim: int = 32,
                    lookup_dim: int = 8, fsq_levels=(8, 8, 8, 4, 4), depth_dropout: bool = True, **vq_kwargs):
    """The model's ``vq``: one quantizer of ``vq_type``, or a :class:`ResidualQuantizer` of ``depth``
    of them. ``vq_kwargs`` go to :class:`VectorQuantizer` (k-means, restarts, EMA, usage loss); FSQ,
    which has no codebook, takes none but ``kmeans_init`` (its fit) and spreads over its grid without a
    usage loss."""
    if vq_type not in QUANTIZERS:
        raise ValueError(f"vq_type={vq_type!r} is not one of {list(QUANTIZERS)}; set network_def#vq_type to one of those.")
    if int(depth) < 1:
        raise ValueError(f"vq_depth={depth}: needs at least 1 level.")
    grid = int(torch.tensor(list(fsq_levels)).prod())
    if vq_type == "fsq" and grid != int(num_embeddings):
        raise ValueError(f"vq_type='fsq': fsq_levels {list(fsq_levels)} give {grid} codes but num_embeddings is "
                         f"{num_embeddings}; set network_def#fsq_levels to levels whose product is {num_embeddings} "
                         f"or network_def#num_embeddings={grid}.")

    def one():
        if vq_type == "fsq":
            return FSQuantizer(embedding_dim, fsq_levels, fit_init=bool(vq_kwargs.get("kmeans_init", False)))
        return VectorQuantizer(num_embeddings, embedding_dim, lookup_dim=lookup_dim if vq_type == "factorized" else None,
                               shared_map=vq_type == "simvq", **vq_kwargs)

    if int(depth) == 1:
        return one()
    return ResidualQuantizer([one() for _ in range(int(depth))], depth_dropout)

"""Training stages: starting weights, freezing, stage banner and model summary.

- stage 0: autoencoder pretraining, quantizer bypassed (``vq`` frozen).
- stage 1: load ``pretrained_vae_path``, freeze ``Encoder`` and ``Decoder``, train ``vq`` (the shipped
  ``stage1.json`` ends by fitting the book again to whole training scans: ``refit_codebook``).
- stage 2: joint training from a stage-1 checkpoint (``pretrained_vae_path`` or ``--load_dir``); the
  shipped ``stage2.json`` keeps ``Encoder`` and ``vq`` frozen (config key ``frozen_parts``), so the
  decoder trains on exactly the tokens stage 1's book gives.

Freezing happens in :func:`prepare_network`, before the optimizer is built (the bundle
configs build the optimizer from the parameters that still require grad), and the summary
file ``vqvae_model_summary.txt`` is written right after it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from networks.quantizer import VectorQuantizer, codebooks_initialised
from pipeline import distributed as D
from pipeline.config_data import setting_hint
from pipeline.io_utils import save_text
from pipeline.run_folder import RunFolder, resolved_config
from pipeline.runs import check_fit, check_window, load_partial

__all__ = [
    "PARTS",
    "STAGE_TITLES",
    "freeze_for_stage",
    "prepare_network",
    "stage_banner",
    "model_summary",
    "write_model_summary",
]

logger = logging.getLogger("ctvq.train")

STAGE_TITLES = {
    0: "Autoencoder pretraining: Encoder + Decoder (quantizer bypassed)",
    1: "Codebook training: Encoder and Decoder frozen, training vq",
    2: "Joint training: Encoder + Decoder + Codebook",
}


#: the model's top-level parts, as ``frozen_parts`` names them
PARTS = ("Encoder", "Decoder", "vq")


def freeze_for_stage(model: torch.nn.Module, training_stage: int, keep_trainable: list[str] | tuple = (),
                     frozen_parts: list[str] | tuple = ()) -> None:
    """Sets ``requires_grad`` per stage.

    Args:
        model: the model (with submodules ``Encoder``, ``Decoder``, ``vq``).
        training_stage: 0 freezes ``vq`` (bypassed), 1 freezes ``Encoder`` and ``Decoder``, 2 trains all.
        keep_trainable: parameter names left trainable in stage 1 (new layers the checkpoint lacked).
        frozen_parts: parts (of :data:`PARTS`) frozen on top of the stage's own (config key
            ``frozen_parts``; e.g. ``["Encoder", "vq"]`` in stage 2 trains the decoder on stage 1's tokens).
            A frozen ``vq`` also stops the quantizers' own updates (EMA, restarts, k-means, FSQ fit).
    """
    stage = int(training_stage)
    if stage not in (0, 1, 2):
        raise ValueError(f"training_stage must be 0, 1 or 2, got {training_stage}")
    if isinstance(frozen_parts, str) or not all(isinstance(p, str) for p in frozen_parts):
        raise ValueError(f"frozen_parts={frozen_parts!r}: needs a list of part names, e.g. frozen_parts='[\"Encoder\"]'")
    unknown = sorted(set(frozen_parts) - set(PARTS))
    if unknown:
        raise ValueError(f"frozen_parts {unknown}: not a part of the model; use some of {list(PARTS)}")
    keep = set(keep_trainable)
    for name, p in model.named_parameters():
        top = name.split(".", 1)[0]
        if top in frozen_parts:
            p.requires_grad_(False)
        elif stage == 0:
            p.requires_grad_(top != "vq")
        elif stage == 1:
            p.requires_grad_(top not in ("Encoder", "Decoder") or name in keep)
        else:
            p.requires_grad_(True)
    if frozen_parts and not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"frozen_parts {list(frozen_parts)} leaves nothing to train in stage {stage}; freeze fewer parts")
    for m in model.modules():  # an EMA codebook or a shared map's fixed basis is not the optimizer's
        if isinstance(m, VectorQuantizer) and not m.optimizer_trains_codebook:
            m.embeddings.weight.requires_grad_(False)
    vq = getattr(model, "vq", None)
    for m in vq.modules() if vq is not None else ():
        if hasattr(m, "book_frozen"):
            m.book_frozen = "vq" in frozen_parts


def prepare_network(
    network: torch.nn.Module,
    training_stage: int,
    pretrained_vae_path: str | None = None,
    run: RunFolder | None = None,
    output_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    frozen_parts: list[str] | tuple = (),
) -> torch.nn.Module:
    """Loads the stage's starting weights, freezes, prints the banner and writes the summary.

    Args:
        network: freshly built model.
        training_stage: 0, 1 or 2.
        pretrained_vae_path: weights to start from (stage 1: required unless resuming).
        run: the decision of :func:`prepare_run_folder` (resume / init checkpoint).
        output_dir: where ``vqvae_model_summary.txt`` goes (default ``run.output_dir``).
        device: move the model there.
        frozen_parts: see :func:`freeze_for_stage`.

    Returns:
        the same model, frozen for the stage (not yet wrapped in DDP).
    """
    stage = int(training_stage)
    pretrained = None if pretrained_vae_path in (None, "", "None", "null") else str(pretrained_vae_path)
    resuming = run is not None and run.resuming
    init_ckpt = run.init_ckpt if run is not None else None
    keep: list[str] = []
    if not resuming:
        src = init_ckpt or pretrained
        if stage == 1 and src is None:
            raise ValueError(
                "stage 1 trains the codebook on a frozen autoencoder and needs its weights: set pretrained_vae_path "
                "to a stage 0 checkpoint (outputs/<stage0 run>/ckpts/vqvae_stepNNNNNNN.pt, bundles/ct_vqvae/stage0.json) "
                "or a Direct3D-S2 VAE"
            )
        if stage == 2 and src is None:
            raise ValueError(
                "stage 2 starts from a stage 1 run: pass --load_dir <stage 1 output_dir> --ckpt latest "
                "or set pretrained_vae_path to its ckpts/vqvae_stepNNNNNNN.pt"
            )
        if src is not None:
            option = "the --load_dir checkpoint" if init_ckpt is not None else "pretrained_vae_path"
            config = resolved_config() or {}
            check_window(src, stage, option, config.get("window_type"))
            report = load_partial(network, src)
            check_fit(report, src, stage, option, config.get("network_def"))
            new = list(report.get("missing", [])) + [str(k).split(" ")[0] for k in report.get("reinitialized", [])]
            keep = [k for k in new if not k.startswith("vq.")]
            vq = getattr(network, "vq", None)
            for q in vq.modules() if stage == 1 and vq is not None else ():  # every level of a residual quantizer
                if getattr(q, "kmeans_init", False) and hasattr(q, "initialized"):
                    q.initialized.fill_(False)  # codebook of a stage-0 / foreign checkpoint: k-means it again
                    q._py_initialized = False
            logger.info(f"Loaded weights from {src} (missing {len(report.get('missing', []))}, unexpected {len(report.get('unexpected', []))})")
            if keep:
                logger.info(f"{len(keep)} parameter tensor(s) absent from the checkpoint were initialised anew "
                            f"and are trained, e.g. {keep[0]}")
    vq = getattr(network, "vq", None)
    if stage == 2 and "vq" in (frozen_parts or ()) and vq is not None and not codebooks_initialised(vq):
        unfrozen = setting_hint("frozen_parts", '["Encoder"]')
        raise ValueError(
            f"frozen_parts {list(frozen_parts)}: the codebook this stage starts from never got its k-means (its "
            f"stage 1 ended first; its log says so), and a frozen codebook stays as it is; train stage 1 longer, or "
            f"pass {unfrozen} so that this stage runs k-means on its first steps")
    freeze_for_stage(network, stage, keep, frozen_parts or ())
    if device is not None:
        network = network.to(device)
    for line in stage_banner(network, stage, frozen_parts or ()).splitlines():
        logger.info(line)
    out = output_dir or (run.output_dir if run is not None else None)
    if out is not None and D.is_main():
        write_model_summary(network, Path(out) / "vqvae_model_summary.txt")
    return network


# --------------------------------------------------------------------------- banner and summary
def _counts(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, train


def stage_banner(model: torch.nn.Module, training_stage: int, frozen_parts: list[str] | tuple = ()) -> str:
    """The stage banner of the log (``[Stage N] ...``, total and trainable parameters, trainable per part);
    in stage 2 the title names the ``frozen_parts``."""
    total, train = _counts(model)
    parts: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        part = parts.setdefault(name.split(".", 1)[0], [0, 0])
        part[0] += p.numel() if p.requires_grad else 0
        part[1] += p.numel()
    bar = "=" * 80
    title = STAGE_TITLES.get(int(training_stage), "")
    if int(training_stage) == 2 and frozen_parts:  # say what the joint stage really trains
        names = {"vq": "Codebook"}
        title = ("Joint training: " + " + ".join(names.get(k, k) for k in PARTS if k not in frozen_parts)
                 + f" ({', '.join(names.get(k, k) for k in PARTS if k in frozen_parts)} frozen)")
    return "\n".join(
        ["", bar, f"[Stage {int(training_stage)}] {title}", bar,
         f"Total parameters: {total:,}", f"Trainable parameters: {train:,}",
         "Trainable per part: " + ", ".join(f"{k} {t:,} of {n:,}" for k, (t, n) in parts.items()), bar, ""]
    )


def model_summary(model: torch.nn.Module) -> str:
    """Parameter table (Name, Shape, Type, Grad) and totals, as in ``vqvae_model_summary.txt``."""
    total, train = _counts(model)
    lines = [f"Model: {type(model).__name__}", "", "Parameters:", "=" * 80,
             f"{'Name':<72}{'Shape':<32}{'Type':<16}Grad"]
    for name, p in model.named_parameters():
        lines.append(f"{name:<72}{str(list(p.shape)):<32}{str(p.dtype):<16}{p.requires_grad}")
    lines += ["=" * 80, f"Total parameters: {total:,}", f"Trainable parameters: {train:,}",
              f"Frozen parameters: {total - train:,}", ""]
    return "\n".join(lines)


def write_model_summary(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Writes :func:`model_summary` to ``path`` atomically."""
    return save_text(path, model_summary(model))

"""A trained model on disk: the run folder's checkpoints and config, the network they describe,
and loading weights into it (strict for inference and resuming, partial to start a stage).

Run folder (``pipeline.train``)::

    RUN_DIR/config.json                   the resolved training config (``network_def``, window, stage)
    RUN_DIR/ckpts/vqvae_step0010000.pt    model weights of step 10000
    RUN_DIR/ckpts/vqvae_ema0.9999_step0010000.pt   EMA weights of the same step
    RUN_DIR/ckpts/misc_step0010000.pt     optimizer, scaler, scheduler, sampler, RNG: written last,
                                          so a step counts as saved once it exists

An exported bundle (``configs/inference.json`` + ``models/model.pt``) is read here too. Configs
from elsewhere are read as data (``pipeline.config_data``); ``trust=True`` evaluates them with MONAI.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.config_data import TRUST_HINT, config_value, last_line, setting_hint
from pipeline.io_utils import CheckpointError, TokenizerError, load_torch

__all__ = [
    "model_ckpt_name",
    "ema_ckpt_name",
    "misc_ckpt_name",
    "list_checkpoints",
    "find_checkpoint",
    "find_step_checkpoint",
    "run_stage",
    "read_resume_state",
    "load_run_config",
    "resolved_network_def",
    "build_network",
    "load_run_model",
    "load_run",
    "load_bundle",
    "load_weights",
    "load_matching",
    "load_partial",
    "check_fit",
    "codebook_id",
    "codebooks_initialised_in",
    "STAGE1_WITHOUT_KMEANS",
    "stage2_codebook_overrides",
]

_CKPT_RE = re.compile(r"^vqvae_(?:(ema[0-9.]+)_)?step(\d+)\.pt$")


# ----------------------------------------------------------------------------- checkpoint names


def model_ckpt_name(step: int) -> str:
    return f"vqvae_step{int(step):07d}.pt"


def ema_ckpt_name(step: int, rate: float) -> str:
    return f"vqvae_ema{rate:g}_step{int(step):07d}.pt"


def misc_ckpt_name(step: int) -> str:
    return f"misc_step{int(step):07d}.pt"


def _ema_files(ckpt_dir: Path, step: int) -> list[Path]:
    return sorted(ckpt_dir.glob(f"vqvae_ema*_step{int(step):07d}.pt"))


def _weight_files(ckpt_dir: Path, ema: bool) -> list[tuple[int, Path]]:
    """(step, file) of every model (or EMA) weights file in ``ckpt_dir``, oldest first."""
    out = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and bool(m.group(1)) == ema:
                out.append((int(m.group(2)), p))
    return sorted(out)


def list_checkpoints(run_dir: str | os.PathLike) -> list[int]:
    """Steps with a complete checkpoint set (model and misc) in ``run_dir/ckpts``."""
    ck = Path(run_dir) / "ckpts"
    return [step for step, p in _weight_files(ck, ema=False)
            if p.name == model_ckpt_name(step) and (ck / misc_ckpt_name(step)).is_file()]


def find_checkpoint(run_dir: str | os.PathLike, ckpt: str | os.PathLike | None = None, weights: str = "ema") -> Path:
    """Weights file of a run for inference and export: ``ckpt`` itself, or the latest
    ``vqvae_ema*_step*.pt`` / ``vqvae_step*.pt``.

    Args:
        run_dir: run folder.
        ckpt: a file, a file name inside ``RUN_DIR/ckpts``, a step number (as ``train --ckpt``),
            ``"latest"`` or None (latest).
        weights: "ema" or "model" (which file of a step; EMA falls back to plain weights when absent).
    """
    run_dir = Path(run_dir)
    is_step = ckpt is not None and re.fullmatch(r"[0-9]+", str(ckpt)) is not None and not Path(str(ckpt)).is_file()
    step = int(ckpt) if is_step else None
    if ckpt not in (None, "latest") and step is None:
        p = Path(ckpt)
        for cand in (p, run_dir / "ckpts" / p.name):
            if cand.is_file():
                return cand
        raise TokenizerError(f"{p}: checkpoint not found; pass an existing file, a step number or --ckpt latest")

    def files(ema: bool) -> list:
        return [(s, f) for s, f in _weight_files(run_dir / "ckpts", ema=ema) if step is None or s == step]

    found = files(ema=(weights == "ema"))
    if not found and weights == "ema":
        found = files(ema=False)
    if not found and step is not None:
        saved = sorted({s for s, _ in _weight_files(run_dir / "ckpts", ema=False) + _weight_files(run_dir / "ckpts", ema=True)})
        raise TokenizerError(f"{run_dir / 'ckpts'}: no weights of step {step} (steps saved: "
                             f"{', '.join(map(str, saved)) or 'none'}); pass one of those or --ckpt latest")
    if not found:
        raise TokenizerError(f"{run_dir / 'ckpts'}: no vqvae_*step*.pt checkpoint; train first or pass --ckpt FILE")
    return found[-1][1]


def find_step_checkpoint(run_dir: str | os.PathLike, ckpt: str | int | None = "latest") -> tuple[Path, int]:
    """Model weights of a saved step, to resume training or to start the next stage from.

    Args:
        run_dir: run folder (holding ``ckpts/``) or a checkpoint file.
        ckpt: "latest" or a step number (only complete sets count, see :func:`list_checkpoints`).

    Returns:
        (path, step).
    """
    run_dir = Path(run_dir)
    if run_dir.is_file():
        m = re.search(r"step(\d+)", run_dir.name)
        return run_dir, int(m.group(1)) if m else 0
    steps = list_checkpoints(run_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in '{run_dir}/ckpts' (expected vqvae_stepNNNNNNN.pt); check --load_dir")
    if ckpt in (None, "latest", "last"):
        step = steps[-1]
    else:
        step = int(ckpt)
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in '{run_dir}/ckpts' (have {steps[-5:]}); pass --ckpt latest")
    return run_dir / "ckpts" / model_ckpt_name(step), step


def run_stage(run_dir: Path) -> int | None:
    """``training_stage`` of a run folder's config.json, or None."""
    cfg = run_dir / "config.json"
    if cfg.is_file():
        try:
            return int(json.loads(cfg.read_text()).get("training_stage"))
        except (ValueError, TypeError, json.JSONDecodeError):
            return None
    return None


def read_resume_state(model_path: Path, step: int = 0) -> dict:
    """Reads the checkpoint set of one step (model, misc, EMA when present) with ``weights_only=True``.

    Raises:
        CheckpointError: a file is missing, truncated, empty or holds more than tensors and numbers.

    Returns:
        {"step", "model", "misc", "ema" (or None), "model_path", "misc_path", "ema_path"}.
    """
    model_path = Path(model_path)
    ck = model_path.parent
    step = int(step) or int(model_path.stem.rsplit("step", 1)[-1])
    misc_path = ck / misc_ckpt_name(step)
    older = f"--load_dir {ck.parent} --ckpt <an earlier step>"
    model = load_torch(model_path, f"resume from an earlier step ({older}) or delete this step's files")
    misc = load_torch(misc_path, f"resume from an earlier step ({older}); a misc file written before weights-only "
                                 "checkpoints cannot be resumed, start from its weights with --load_dir into a new --output_dir")
    if not isinstance(misc, dict) or "optimizer" not in misc or "step" not in misc:
        raise CheckpointError(f"{misc_path}: not a misc checkpoint of pipeline.trainer (no step / optimizer); {older}")
    hits = _ema_files(ck, step)
    ema = load_torch(hits[0], "delete it to restart the average from the weights, or resume from an earlier step") if hits else None
    for what, obj, p in (("model", model, model_path), ("EMA", ema, hits[0] if hits else None)):
        if obj is not None and not (isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())):
            raise CheckpointError(f"{p}: holds no {what} state dict; resume from another step ({older})")
    return {"step": step, "model": model, "misc": misc, "ema": ema, "model_path": model_path, "misc_path": misc_path,
            "ema_path": hits[0] if hits else None}


# ----------------------------------------------------------------------------- config and network


def load_run_config(run_dir: str | os.PathLike) -> dict:
    """``RUN_DIR/config.json`` (the resolved training config).

    Args:
        run_dir: run folder, or the config file itself.
    """
    p = Path(run_dir)
    cfg_path = p if p.is_file() else p / "config.json"
    if not cfg_path.is_file():
        raise TokenizerError(f"{cfg_path}: run config not found; pass the run folder written by pipeline.train (it holds config.json)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{cfg_path}: not valid JSON ({e}); restore the run's config.json") from None
    if "network_def" not in cfg:
        raise TokenizerError(f"{cfg_path}: has no 'network_def'; use the config.json written by pipeline.train")
    return cfg


def resolved_network_def(cfg: Mapping, source: Any = "config", trust: bool = False) -> dict:
    """``network_def`` of a config as plain values (``@`` references filled in).

    The config is read as data: ``$`` expressions are refused and ``_target_`` must name a model
    class of the ``networks`` package. ``trust=True`` evaluates it with MONAI's ConfigParser instead.

    Args:
        cfg: config dict holding ``network_def`` (a run's config.json or a bundle config).
        source: where the config came from (for error messages).
        trust: evaluate ``$`` expressions (only for a file the user wrote).
    """
    if "network_def" not in cfg:
        raise TokenizerError(f"{source}: has no 'network_def'; use a run config.json or a bundle's configs/inference.json")
    if not trust:
        plain = config_value(cfg, "network_def", source)
        _network_class(plain, source)
        return plain
    from monai.bundle import ConfigParser

    try:
        comp = ConfigParser(dict(cfg)).get_parsed_content("network_def", instantiate=False)
    except Exception as e:
        raise TokenizerError(f"{source}: network_def cannot be resolved ({last_line(e)}); fix network_def") from None
    plain = comp.get_config() if hasattr(comp, "get_config") else comp
    return json.loads(json.dumps(plain, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _network_class(net_def: Mapping, source: Any) -> type:
    """The model class named by ``network_def#_target_``: a ``torch.nn.Module`` of the ``networks`` package."""
    import networks

    target = str(net_def.get("_target_", ""))
    name = target[len("networks."):] if target.startswith("networks.") else ""
    cls = getattr(networks, name, None) if name and "." not in name else None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TokenizerError(f"{source}: network_def#_target_ {target!r} is not a model of the networks package "
                             f"(e.g. networks.SparseVQVAE); {TRUST_HINT}")
    return cls


def build_network(cfg: Mapping, source: Any = "config", trust: bool = False) -> torch.nn.Module:
    """Build the model of ``network_def`` (read as data, see :func:`resolved_network_def`).

    Args:
        cfg: config dict holding ``network_def``.
        source: where the config came from (for error messages).
        trust: evaluate the config with MONAI's ConfigParser (only for a file the user wrote).
    """
    plain = resolved_network_def(cfg, source, trust)
    try:
        if trust:
            from monai.bundle import ConfigParser

            import networks  # noqa: F401  (the package of the _target_)

            return ConfigParser({"network_def": plain}).get_parsed_content("network_def", instantiate=True)
        cls = _network_class(plain, source)
        return cls(**{k: v for k, v in plain.items() if not str(k).startswith("_")})
    except TokenizerError:
        raise
    except Exception as e:  # bad kwargs, missing package
        raise TokenizerError(f"{source}: network_def cannot be built ({last_line(e)}); fix network_def or install ctvq") from None


def load_run_model(ckpt: str | os.PathLike, config: str | os.PathLike | Mapping | None = None,
                   trust: bool = False) -> tuple[torch.nn.Module, dict, Path]:
    """The model of a training run with a checkpoint's weights.

    Args:
        ckpt: ``RUN_DIR/ckpts/vqvae[_ema...]_stepNNNNNNN.pt``, or a run folder (its latest EMA weights).
        config: run config (default: ``RUN_DIR/config.json`` two levels above the checkpoint).
        trust: evaluate ``$`` expressions of the config (only for a file you wrote).

    Returns:
        (model, config dict, checkpoint file).
    """
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        run_dir = ckpt
        ckpt = find_checkpoint(run_dir)
    else:
        run_dir = ckpt.parent.parent
        if not ckpt.is_file():
            raise TokenizerError(f"{ckpt}: checkpoint not found; pass an existing vqvae_*step*.pt file")
        if ckpt.suffix not in (".pt", ".pth"):
            raise TokenizerError(f"{ckpt}: not a checkpoint; pass a run folder or its ckpts/vqvae_*step*.pt")
    if isinstance(config, Mapping):
        cfg, cfg_src = dict(config), "the given config"
    else:
        cfg_path = Path(config) if config is not None else run_dir / "config.json"
        if not cfg_path.is_file():
            raise TokenizerError(f"{cfg_path}: run config not found next to {ckpt.name}; pass --config RUN_DIR/config.json")
        cfg, cfg_src = load_run_config(cfg_path), str(cfg_path)
    net = build_network(cfg, cfg_src, trust)
    load_weights(net, ckpt, cfg_src)
    return net, cfg, ckpt


def load_run(run_dir: str | os.PathLike, ckpt: str | os.PathLike | None = None,
             weights: str = "ema") -> tuple[torch.nn.Module, dict, dict, Path]:
    """A run folder's model with the weights of one checkpoint (what export ships).

    Args:
        run_dir: the run folder (``config.json``, ``ckpts/``).
        ckpt: see :func:`find_checkpoint`.
        weights: "ema" or "model", when ``ckpt`` is not a file.

    Returns:
        (model, run config, its ``network_def`` as plain values, checkpoint file).
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt_path = find_checkpoint(run_dir, ckpt, weights)
    net = build_network(cfg, source=run_dir / "config.json")
    load_weights(net, ckpt_path, config_path=run_dir / "config.json")
    return net, cfg, resolved_network_def(cfg, run_dir / "config.json"), ckpt_path


def load_bundle(bundle_dir: str | os.PathLike, trust: bool = False) -> tuple[torch.nn.Module, dict, Path]:
    """The model of a MONAI bundle (``configs/inference.json`` + ``models/model.pt``) with its weights.

    Args:
        bundle_dir: bundle folder (an exported bundle, or a folder holding inference.json and models/).
        trust: evaluate the config's expressions (only for a bundle you wrote).

    Returns:
        (model, config dict with ``bundle_root`` set, config file).
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise TokenizerError(f"{root}: bundle folder not found; export one with `./run.sh export --run RUN_DIR --out {root}`")
    cfg_file = next((p for p in (root / "configs" / "inference.json", root / "inference.json") if p.is_file()), None)
    if cfg_file is None:
        raise TokenizerError(f"{root / 'configs' / 'inference.json'}: missing from the bundle; re-export it with `./run.sh export`")
    weights = root / "models" / "model.pt"
    if not weights.is_file():
        raise TokenizerError(f"{weights}: missing from the bundle; re-export it with `./run.sh export` (or copy models/model.pt)")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{cfg_file}: cannot be read ({type(e).__name__}: {e}); re-export the bundle") from None
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{cfg_file}: is not a JSON object; re-export the bundle")
    cfg["bundle_root"] = str(root)
    net = build_network(cfg, str(cfg_file), trust)
    load_weights(net, weights, str(cfg_file))
    return net, cfg, cfg_file


# ----------------------------------------------------------------------------- weights


def _extract_state_dict(obj: Any, path: Path) -> dict:
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = dict(obj)
    elif isinstance(obj, Mapping):
        for key in ("state_dict", "model", "network", "ema", "vae"):
            if isinstance(obj.get(key), Mapping):
                return _extract_state_dict(obj[key], path)
        raise TokenizerError(f"{path}: holds no model state dict (keys {sorted(obj)[:5]}); pass a vqvae_*step*.pt checkpoint")
    else:
        raise TokenizerError(f"{path}: holds a {type(obj).__name__}, not a state dict; pass a vqvae_*step*.pt checkpoint")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _mismatches(own: Mapping, sd: Mapping, required) -> tuple[list, list, list]:
    """(key, checkpoint shape, model shape) of each shape difference, the ``required`` keys ``sd`` lacks,
    and the keys of ``sd`` the model lacks."""
    shaped = [(k, list(sd[k].shape), list(v.shape)) for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    return shaped, [k for k in required if k not in sd], [k for k in sd if k not in own]


def load_weights(net: torch.nn.Module, ckpt: str | os.PathLike, config_path: Any = "the config") -> dict:
    """Load a checkpoint into ``net``, refusing one of another model size with one clear line.

    Missing buffers (e.g. usage counters not kept in EMA files) are allowed; missing or
    extra parameters and any shape difference are not.

    Args:
        net: the model built from the matching config.
        ckpt: state-dict file.
        config_path: the config the model came from (named in errors).

    Returns:
        the state dict that was loaded.
    """
    path = Path(ckpt)
    if not path.is_file():
        raise TokenizerError(f"{path}: checkpoint not found; pass an existing vqvae_*step*.pt file")
    try:
        obj = load_torch(path, "re-copy or re-export it")
    except CheckpointError as e:
        raise TokenizerError(str(e)) from None
    sd = _extract_state_dict(obj, path)
    params = {n for n, _ in net.named_parameters()}
    shape_diff, missing, extra = _mismatches(net.state_dict(), sd, params)
    shape_diff.sort(key=lambda d: (d[0] not in params, d[0]))  # name a weight before a buffer
    if shape_diff or missing or extra:
        parts = []
        if shape_diff:
            k, a, b = shape_diff[0]
            parts.append(f"{len(shape_diff)} shape mismatches, e.g. {k} {a} vs model {b}")
        if missing:
            parts.append(f"{len(missing)} missing weights, e.g. {sorted(missing)[0]}")
        if extra:
            parts.append(f"{len(extra)} unexpected weights, e.g. {sorted(extra)[0]}")
        raise TokenizerError(
            f"{path}: does not match the model of {config_path} ({'; '.join(parts)}); "
            "use the config.json of the run that wrote this checkpoint (or its exported bundle)"
        )
    net.load_state_dict(sd, strict=False)
    return {k: v for k, v in sd.items()}


def load_matching(target, sd: dict, path: Path) -> None:
    """``target.load_state_dict(sd)`` after checking names and shapes (one line naming ``path`` when they differ)."""
    own = target.state_dict()
    diff, missing, extra = _mismatches(own, sd, own)
    if diff or missing or extra:
        what = (f"{len(diff)} shape mismatches, e.g. {diff[0][0]} {diff[0][1]} vs model {diff[0][2]}" if diff
                else f"{len(missing)} missing and {len(extra)} unexpected entries, e.g. {(missing or extra)[0]}")
        raise CheckpointError(f"{path}: checkpoint of another model ({what}); resume with the network_def of the run "
                              "that wrote it, or start a new --output_dir")
    target.load_state_dict(sd)


def load_partial(model: torch.nn.Module, path: str | os.PathLike) -> dict:
    """Loads the weights a stage starts from: a ctvq checkpoint, Direct3D-S2 ``{"vae": sd}`` or ``{"model": sd}``
    (``networks.load_pretrained``: converts Direct3D-S2 names, skips tensors of another shape).

    Args:
        model: the (unwrapped) model.
        path: checkpoint file.

    Returns:
        the report of ``networks.load_pretrained`` (``format``, ``missing``, ``unexpected``, ``skipped``, ...).
    """
    from networks import load_pretrained

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found; check pretrained_vae_path / --load_dir")
    try:
        return load_pretrained(model, str(path))
    except Exception:
        load_torch(path, "pass a complete checkpoint (pretrained_vae_path / --load_dir)")  # names a damaged file
        raise


def check_fit(report: dict, path: str | os.PathLike, training_stage: int, option: str = "pretrained_vae_path",
              network_def: Mapping | None = None) -> None:
    """Refuses a checkpoint of our own format that does not fit the configured model.

    Direct3D-S2 weights are converted and may leave layers new (``reinitialized``); a ctvq
    checkpoint must fit except for quantizer state (stage 1 re-initialises the codebook).

    Args:
        report: what :func:`load_partial` returned.
        path: the checkpoint.
        training_stage: 0, 1 or 2 (stage 2 also needs the codebook).
        option: the setting that named the checkpoint (for the message).
        network_def: the configured model's ``network_def`` (to name the sizes that differ).

    Raises:
        CheckpointError: one line naming the checkpoint, the sizes that differ and the fix.
    """
    if report.get("format", "ctvq") != "ctvq":
        return

    def counts(key: str) -> bool:  # stage 1 fits the quantizer anew; elsewhere its weights must fit too
        return not key.startswith("vq.") or (int(training_stage) != 1 and key.endswith((".weight", ".bias")))

    missing = [k for k in report.get("missing", []) if counts(k)]
    shaped = [k for k in report.get("skipped", []) if counts(k)]
    extra = [k for k in report.get("unexpected", []) if counts(k)]
    if not (missing or shaped or extra):
        # every weight fits, but the attention or the norms may differ (no weight says so): a codebook
        # stage fits or tunes codes to the latents of the model it starts from, so it must run that model
        keys = _WEIGHTLESS_KEYS + (("num_groups",) if str((network_def or {}).get("norm", "")).startswith("group") else ())
        unseen = _network_def_diff(Path(path), network_def or {}, keys) if int(training_stage) else ""
        if unseen:
            raise CheckpointError(
                f"{option} {path}: its run computed another model from the same weights ({unseen}); a codebook stage continues the model it "
                "starts from: set those network_def values as in its run (see its command.txt), or start a stage 0 from it")
        return
    sizes = _network_def_diff(Path(path), network_def or {})
    what = (f"{sizes}; " if sizes else "") + ", ".join(
        f"{len(v)} tensors {w}" for v, w in ((missing, "missing"), (shaped, "of another shape"), (extra, "unexpected")) if v)
    example = f", e.g. {shaped[0]} vs this model" if shaped else f", e.g. {(missing or extra)[0]}"
    raise CheckpointError(
        f"{option} {path}: checkpoint of another model ({what}{'' if sizes else example}); train with the "
        "network_def it was trained with (the same config overlay and network_def overrides as its run, "
        "see its command.txt), or pass a checkpoint of this model")


_SIZE_KEYS = ("layout", "resolution", "model_channels", "latent_channels", "num_embeddings", "channels",
              "num_res_blocks", "num_blocks", "num_heads", "window_size",
              "vq_type", "vq_depth", "vq_lookup_dim", "fsq_levels")
_WEIGHTLESS_KEYS = ("window_size", "num_heads", "norm")  # they change what the model computes, not its weights' shapes


def _run_config(ckpt: str | os.PathLike) -> dict:
    """The ``config.json`` of the run a checkpoint (``RUN/ckpts/vqvae_stepN.pt``) belongs to, or {}."""
    try:
        cfg = json.loads((Path(ckpt).parent.parent / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def check_window(path: str | os.PathLike, training_stage: int, option: str, window_type) -> None:
    """Refuses to fit (stage 1) or fine-tune (stage 2) a codebook on another window than the one the
    starting checkpoint's run trained on: its latents and codes stand for that window's intensities.
    Stage 0 may start from any window's autoencoder; a checkpoint outside a run folder is not checked.

    Raises:
        CheckpointError: one line naming the checkpoint, both windows and the fix.
    """
    theirs = _run_config(path).get("window_type")
    if int(training_stage) == 0 or theirs is None or window_type is None or theirs == window_type:
        return
    raise CheckpointError(
        f"{option} {path}: its run trained on window_type {json.dumps(theirs)}, this stage on "
        f"{json.dumps(window_type)}; set {setting_hint('window_type', json.dumps(theirs))} (or start from a run of "
        f"{json.dumps(window_type)}: stage 0 may start from this checkpoint)")


def _network_def_diff(ckpt: Path, ours: Mapping, keys: Sequence[str] = _SIZE_KEYS) -> str:
    """``model_channels 64 in the checkpoint's run vs 512 here, ...`` (of ``keys``) from the run's
    config.json, or "". A key one side leaves out counts as ``SparseVQVAE``'s default."""
    import inspect

    from networks import SparseVQVAE

    theirs = _run_config(ckpt).get("network_def") or {}
    if not (theirs and ours):
        return ""
    params = inspect.signature(SparseVQVAE).parameters
    default = {k: params[k].default for k in keys if k in params}

    def value(cfg: Mapping, key: str):
        v = cfg.get(key, default.get(key))
        return list(v) if isinstance(v, tuple) else v

    diff = [f"{k} {json.dumps(value(theirs, k))} vs {json.dumps(value(ours, k))}" for k in keys
            if (k in theirs or k in ours) and value(theirs, k) != value(ours, k)]
    return ("network_def " + ", ".join(diff) + " here") if diff else ""


def codebooks_initialised_in(ckpt: str | os.PathLike) -> bool:
    """Whether every codebook in the weights file ``ckpt`` got its k-means (its ``initialized`` flags);
    a stage 1 that ended first leaves random codes."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return all(bool(v) for k, v in state.items() if k.startswith("vq.") and k.endswith(".initialized"))


#: what a chain of stages (demo, benchmarks) says when it gives stage 2 the overrides below
STAGE1_WITHOUT_KMEANS = ("stage 1 ended before the codebook's k-means, so stage 2 trains the codebook too "
                         "(frozen_parts [\"Encoder\"])")


def stage2_codebook_overrides(stage1_run: str | os.PathLike) -> list[str]:
    """Training overrides for a stage 2 chained on ``stage1_run``: none when its codebook got its
    k-means; else the codebook trains in stage 2, which runs k-means on its first steps (stage 2
    refuses to keep a never-initialised codebook frozen). For short smoke runs of a whole chain."""
    if codebooks_initialised_in(find_checkpoint(stage1_run, None, "model")):
        return []
    return ["--override", 'frozen_parts=["Encoder"]']


def codebook_id(net: torch.nn.Module) -> str:
    """Short hash of what maps codes to vectors: the quantizer's parameters (codebooks, projections)."""
    h = hashlib.sha1()
    for _, w in sorted(net.vq.named_parameters()):
        h.update(w.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

"""Training stages: run folder, weight loading, freezing, stage banner and model summary.

- stage 0: autoencoder pretraining, quantizer bypassed (``vq`` frozen).
- stage 1: load ``pretrained_vae_path``, freeze ``Encoder`` and ``Decoder``, train ``vq``.
- stage 2: joint training from a stage-1 checkpoint (``pretrained_vae_path`` or ``--load_dir``).

Freezing happens in :func:`prepare_network`, before the optimizer is built (the bundle
configs build the optimizer from the parameters that still require grad), and the summary
file ``vqvae_model_summary.txt`` is written right after it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import shlex
import shutil
import sys
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed as D
from pipeline.io_utils import CheckpointError, FolderLock, load_torch, save_json, save_text

__all__ = [
    "STAGE_TITLES",
    "RunFolder",
    "prepare_run_folder",
    "one_line_errors",
    "user_error_line",
    "discard_new_runs",
    "find_checkpoint",
    "list_checkpoints",
    "read_resume_state",
    "load_weights",
    "check_fit",
    "freeze_for_stage",
    "prepare_network",
    "stage_banner",
    "model_summary",
    "write_model_summary",
    "build_from_run",
    "resolved_config",
]

logger = logging.getLogger("ctvq.train")

STAGE_TITLES = {
    0: "Autoencoder pretraining: Encoder + Decoder (quantizer bypassed)",
    1: "Codebook training: Encoder and Decoder frozen, training vq",
    2: "Joint training: Encoder + Decoder + Codebook",
}
CKPT_RE = re.compile(r"^vqvae_step(\d{7,})\.pt$")


# --------------------------------------------------------------------------- checkpoints
def list_checkpoints(run_dir: str | os.PathLike) -> list[int]:
    """Steps with a complete checkpoint set (model and misc) in ``run_dir/ckpts``."""
    ck = Path(run_dir) / "ckpts"
    if not ck.is_dir():
        return []
    steps = []
    for p in ck.iterdir():
        m = CKPT_RE.match(p.name)
        if m and (ck / f"misc_step{int(m.group(1)):07d}.pt").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_checkpoint(run_dir: str | os.PathLike, ckpt: str | int | None = "latest", ema: bool = False) -> tuple[Path, int]:
    """Model checkpoint of a run folder.

    Args:
        run_dir: run folder (holding ``ckpts/``) or a checkpoint file.
        ckpt: "latest" or a step number.
        ema: return the EMA weights (``vqvae_ema<rate>_step*.pt``) instead of the plain ones.

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
    if ema:
        hits = sorted((run_dir / "ckpts").glob(f"vqvae_ema*_step{step:07d}.pt"))
        if not hits:
            raise FileNotFoundError(f"no EMA checkpoint for step {step} in '{run_dir}/ckpts'")
        return hits[0], step
    return run_dir / "ckpts" / f"vqvae_step{step:07d}.pt", step


def _run_stage(run_dir: Path) -> int | None:
    cfg = run_dir / "config.json"
    if cfg.is_file():
        try:
            return int(json.loads(cfg.read_text()).get("training_stage"))
        except (ValueError, TypeError, json.JSONDecodeError):
            return None
    return None


# --------------------------------------------------------------------------- run folder
@dataclass
class RunFolder:
    """What :func:`prepare_run_folder` decided.

    Attributes:
        output_dir: the run folder.
        resume_ckpt: model checkpoint to resume from (full state) or None.
        resume_step: its step (0 for a fresh run).
        init_ckpt: checkpoint of another stage's run to initialise the weights from, or None.
    """

    output_dir: Path
    resume_ckpt: Path | None = None
    resume_step: int = 0
    init_ckpt: Path | None = None
    resume_state: dict | None = field(default=None, repr=False)
    pending: dict = field(default_factory=dict, repr=False)
    lock: FolderLock | None = field(default=None, repr=False)
    created: Path | None = field(default=None, repr=False)

    @property
    def resuming(self) -> bool:
        return self.resume_ckpt is not None

    def release(self) -> None:
        """Releases the run-folder lock (at the end of training)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def discard(self) -> bool:
        """Removes the run folder (and the parents made for it) when this run created it and it holds no
        checkpoint: what a run that failed while setting up leaves. Returns whether it did."""
        out = self.output_dir
        if self.created is None or not out.is_dir() or list_checkpoints(out):
            return False
        self.release()
        root = logging.getLogger()
        for h in list(root.handlers):
            if getattr(h, "_ctvq_run_log", False) and Path(h.baseFilename).parent == out.resolve():
                root.removeHandler(h)
                h.close()
        shutil.rmtree(out, ignore_errors=True)
        for parent in out.parents:
            if parent == self.created.parent:
                break
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty
        return True

    def commit(self) -> None:
        """Writes the files held back until the resume succeeded (``config.json``, ``command.txt``)."""
        for name, content in self.pending.items():
            (save_json if name.endswith(".json") else save_text)(self.output_dir / name, content)
        self.pending = {}
        self.resume_state = None


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
    misc_path = ck / f"misc_step{step:07d}.pt"
    older = f"--load_dir {ck.parent} --ckpt <an earlier step>"
    model = load_torch(model_path, f"resume from an earlier step ({older}) or delete this step's files")
    misc = load_torch(misc_path, f"resume from an earlier step ({older}); a misc file written before weights-only "
                                 "checkpoints cannot be resumed, start from its weights with --load_dir into a new --output_dir")
    if not isinstance(misc, dict) or "optimizer" not in misc or "step" not in misc:
        raise CheckpointError(f"{misc_path}: not a misc checkpoint of pipeline.trainer (no step / optimizer); {older}")
    hits = sorted(ck.glob(f"vqvae_ema*_step{step:07d}.pt"))
    ema = load_torch(hits[0], "delete it to restart the average from the weights, or resume from an earlier step") if hits else None
    for what, obj, p in (("model", model, model_path), ("EMA", ema, hits[0] if hits else None)):
        if obj is not None and not (isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())):
            raise CheckpointError(f"{p}: holds no {what} state dict; resume from another step ({older})")
    return {"step": step, "model": model, "misc": misc, "ema": ema, "model_path": model_path, "misc_path": misc_path,
            "ema_path": hits[0] if hits else None}


def _command_line() -> str:
    cmd = os.environ.get("CTVQ_COMMAND")
    if cmd:
        return cmd
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("monai", "bundle", "__main__.py")):
        argv = ["python", "-m", "monai.bundle"] + argv[1:]
    elif argv and argv[0].endswith(".py"):
        mod = Path(argv[0])
        argv = ["python", mod.name] + argv[1:]
    return " ".join(shlex.quote(a) for a in argv)


def prepare_run_folder(
    output_dir: str | os.PathLike,
    load_dir: str | os.PathLike | None = None,
    ckpt: str | int | None = None,
    training_stage: int = 1,
    config: dict | None = None,
    log_file: bool = True,
) -> RunFolder:
    """Decides fresh start / resume / initialisation and writes config.json, command.txt, log.txt.

    A folder that already holds checkpoints is only reused to resume it
    (``--load_dir <output_dir> --ckpt latest``). ``load_dir`` of a run of the same stage
    resumes its full state; of another stage (stage 2 from stage 1) it initialises the weights.

    Args:
        output_dir: run folder.
        load_dir: run folder (or checkpoint file) to resume or initialise from.
        ckpt: "latest" or a step (default "latest" when ``load_dir`` is given).
        training_stage: 0, 1 or 2.
        config: resolved config to save as config.json (default: the running bundle's config).
        log_file: also log to ``output_dir/log.txt`` (rank 0).
    """
    out = Path(output_dir)
    run = RunFolder(output_dir=out, created=_first_missing(out))
    if load_dir not in (None, "", "None"):
        src = Path(load_dir)
        ckpt = "latest" if ckpt in (None, "", "None") else ckpt
        path, step = find_checkpoint(src, ckpt)
        src_stage = _run_stage(src if src.is_dir() else src.parent.parent)
        same_stage = src_stage == int(training_stage) or (src_stage is None and src.resolve() == out.resolve())
        if same_stage:
            run.resume_ckpt, run.resume_step = path, step
        else:
            run.init_ckpt = path
    elif ckpt not in (None, "", "None"):
        path, step = find_checkpoint(out, ckpt)  # --ckpt without --load_dir: resume this folder
        run.resume_ckpt, run.resume_step = path, step
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir '{out}' is a file; pick a folder for the run (--output_dir)")
    if D.is_main():
        _NEW_RUNS.append(run)
    if D.is_main():
        run.lock = FolderLock(out, ".train.lock", f"another training run is writing into '{out}'; wait for it to "
                                                  "finish or pick another --output_dir").acquire()
    try:
        _prepare_files(run, config, log_file)
    except BaseException:
        run.release()
        raise
    _ensure_console()
    D.barrier()
    if run.resuming:
        logger.info(f"Loading checkpoint from step {run.resume_step}...")
    elif run.init_ckpt is not None:
        _, init_step = find_checkpoint(run.init_ckpt)
        logger.info(f"Loading checkpoint from step {init_step}... (weights of {run.init_ckpt}, training restarts at step 0)")
    return run


def _first_missing(path: Path) -> Path | None:
    """The highest folder of ``path`` (itself included) that does not exist yet, or None."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


# --------------------------------------------------------------------------- user errors
#: run folders made by this process; a user mistake during set-up removes them again
_NEW_RUNS: list[RunFolder] = []
#: what a user's mistake raises (a missing or wrong file or folder, a setting that does not fit)
USER_ERRORS = (FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError, ValueError, KeyError)


def user_error_line(exc: BaseException) -> str | None:
    """The one line naming a user's mistake at the root of ``exc`` (MONAI wraps the errors of config
    components in its own), or None for anything else (a bug, which keeps its traceback)."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    if not isinstance(root, USER_ERRORS):
        return None
    text = root.args[0] if isinstance(root, KeyError) and root.args else root
    lines = [ln for ln in str(text).splitlines() if ln.strip()] or [type(root).__name__]
    return lines[-1]


def setup_done() -> None:
    """Training has started: from now on a failed run keeps its folder (log, samples)."""
    _NEW_RUNS.clear()


def discard_new_runs() -> None:
    """Removes the run folders this process created that hold no checkpoint (a failed set-up)."""
    while _NEW_RUNS:
        _NEW_RUNS.pop().discard()


def one_line_errors() -> None:
    """Bundle ``initialize`` hook: a user's mistake ends ``python -m monai.bundle run`` with one line
    (``error: ...``, the last line of the output, no traceback) and removes the run folder made for it.
    Other errors keep their traceback; ``CTVQ_DEBUG=1`` keeps it for all."""
    previous = sys.excepthook
    if getattr(previous, "_ctvq", False):
        return

    def hook(kind, exc, tb):
        line = None if os.environ.get("CTVQ_DEBUG") else user_error_line(exc)
        if line is None:
            return previous(kind, exc, tb)
        discard_new_runs()
        logging.shutdown()
        sys.stdout.flush()
        print(f"error: {line}", file=sys.stderr)

    hook._ctvq = True
    sys.excepthook = hook


def _prepare_files(run: RunFolder, config: dict | None, log_file: bool) -> None:
    """Refuses a used folder unless resuming it, reads the resume state, writes the run files."""
    out = run.output_dir
    existing = list_checkpoints(out)
    if existing and not (run.resuming and run.resume_ckpt.parent.parent.resolve() == out.resolve()):
        raise FileExistsError(
            f"output_dir '{out}' already holds checkpoints up to step {existing[-1]}; resume with "
            f"--load_dir {out} --ckpt latest, or pick a new --output_dir"
        )
    if run.resuming:
        run.resume_state = read_resume_state(run.resume_ckpt, run.resume_step)
    if D.is_main():
        for sub in ("ckpts", "tb_logs", "samples"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        cfg = config if config is not None else resolved_config()
        run.pending = {"config.json": cfg} if cfg is not None else {}
        prev = (out / "command.txt").read_text() if run.resuming and (out / "command.txt").is_file() else ""
        run.pending["command.txt"] = prev + _command_line() + "\n"
        if not run.resuming:  # a resumed run's files change only once its checkpoint has loaded
            run.commit()
        if log_file:
            _attach_log_file(out / "log.txt")


def _attach_log_file(path: Path) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_ctvq_run_log", False):  # a previous run in this process
            if Path(h.baseFilename) == path.resolve():
                return
            root.removeHandler(h)
            h.close()
    fh = logging.FileHandler(path, mode="a", encoding="utf-8")
    fh._ctvq_run_log = True
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    fh.setLevel(logging.INFO)
    root.addHandler(fh)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def _ensure_console() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(sh)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    if not D.is_main():
        logging.getLogger("ctvq").setLevel(logging.WARNING)


# --------------------------------------------------------------------------- resolved config
def _find_parser():
    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, ConfigParser):
            return obj
        parser = frame.f_locals.get("parser")
        if isinstance(parser, ConfigParser):
            return parser
        frame = frame.f_back
    return None


def _is_plain(v: Any) -> bool:
    if isinstance(v, str):
        return not (v.startswith("$") or v.startswith("@") or v.startswith("%"))
    if isinstance(v, dict):
        return "_target_" not in v and all(_is_plain(x) for x in v.values())
    if isinstance(v, list):
        return all(_is_plain(x) for x in v)
    return True


def resolved_config(parser=None) -> dict | None:
    """The running bundle config with overrides applied and ``@key`` references to plain values filled in.

    The result parses again with ``monai.bundle.ConfigParser`` (``_target_`` and ``$`` expressions kept),
    so ``ConfigParser(cfg).get_parsed_content("network_def")`` rebuilds the model.

    Args:
        parser: a ``ConfigParser``; default: the one evaluating the current bundle expression.
    """
    parser = parser or _find_parser()
    if parser is None:
        return None
    cfg = deepcopy(parser.get())
    top = {k: v for k, v in cfg.items() if _is_plain(v)}

    def fill(v: Any) -> Any:
        if isinstance(v, str) and v.startswith("@") and v[1:] in top:
            return fill(top[v[1:]])
        if isinstance(v, str) and v.startswith("@") and ("#" in v[1:] or "::" in v[1:]):
            head, *rest = v[1:].replace("::", "#").split("#")
            node = cfg.get(head)
            for r in rest:
                if isinstance(node, dict) and r in node:
                    node = node[r]
                elif isinstance(node, list) and r.isdigit() and int(r) < len(node):
                    node = node[int(r)]
                else:
                    return v
            return fill(node) if _is_plain(node) else v
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fill(x) for x in v]
        return v

    return fill(cfg)


# --------------------------------------------------------------------------- weights and freezing
def load_weights(model: torch.nn.Module, path: str | os.PathLike, strict: bool = False) -> dict:
    """Loads a checkpoint into ``model``: our state dicts, Direct3D-S2 ``{"vae": sd}`` or ``{"model": sd}``.

    Uses ``networks.load_pretrained`` when available (it also converts Direct3D-S2 names).

    Args:
        model: the (unwrapped) model.
        path: checkpoint file.
        strict: fail on missing or unexpected keys.

    Returns:
        {"missing": [...], "unexpected": [...]} (keys that were not loaded).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found; check pretrained_vae_path / --load_dir")
    try:
        from networks import load_pretrained  # type: ignore
    except ImportError:
        load_pretrained = None
    if load_pretrained is not None and not strict:
        try:
            report = load_pretrained(model, str(path))
        except Exception:
            load_torch(path, "pass a complete checkpoint (pretrained_vae_path / --load_dir)")  # names a damaged file
            raise
        if isinstance(report, dict):
            return {"missing": list(report.get("missing", report.get("missing_keys", []))),
                    "unexpected": list(report.get("unexpected", report.get("unexpected_keys", []))),
                    **{k: v for k, v in report.items() if k not in ("missing", "unexpected")}}
        miss = getattr(report, "missing_keys", []) or getattr(report, "missing", [])
        unexp = getattr(report, "unexpected_keys", []) or getattr(report, "unexpected", [])
        return {"missing": list(miss), "unexpected": list(unexp)}
    sd = load_torch(path, "pass a complete checkpoint (pretrained_vae_path / --load_dir)")
    for key in ("vae", "model", "state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    res = model.load_state_dict(sd, strict=strict)
    return {"missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys)}


def check_fit(report: dict, path: str | os.PathLike, training_stage: int, option: str = "pretrained_vae_path") -> None:
    """Refuses a checkpoint of our own format that does not fit the configured model.

    Direct3D-S2 weights are converted and may leave layers new (``reinitialized``); a ctvq
    checkpoint must fit except for quantizer state (stage 1 re-initialises the codebook).

    Args:
        report: what :func:`load_weights` returned.
        path: the checkpoint.
        training_stage: 0, 1 or 2 (stage 2 also needs the codebook).
        option: the setting that named the checkpoint (for the message).

    Raises:
        CheckpointError: one line naming the checkpoint, the sizes that differ and the fix.
    """
    if report.get("format", "ctvq") != "ctvq":
        return

    def counts(key: str) -> bool:
        return not key.startswith("vq.") or (int(training_stage) != 1 and key.startswith("vq.embeddings"))

    missing = [k for k in report.get("missing", []) if counts(k)]
    shaped = [k for k in report.get("skipped", []) if counts(k)]
    extra = [k for k in report.get("unexpected", []) if counts(k)]
    if not (missing or shaped or extra):
        return
    sizes = _network_def_diff(Path(path))
    what = (f"{sizes}; " if sizes else "") + ", ".join(
        f"{len(v)} tensors {w}" for v, w in ((missing, "missing"), (shaped, "of another shape"), (extra, "unexpected")) if v)
    example = f", e.g. {shaped[0]} vs this model" if shaped else f", e.g. {(missing or extra)[0]}"
    raise CheckpointError(
        f"{option} {path}: checkpoint of another model ({what}{'' if sizes else example}); train with the "
        "network_def it was trained with (the same --config_file overlay and network_def overrides as its run, "
        "see its command.txt), or pass a checkpoint of this model")


_SIZE_KEYS = ("layout", "resolution", "model_channels", "latent_channels", "num_embeddings", "channels",
              "num_res_blocks", "num_blocks", "num_heads", "window_size")


def _network_def_diff(ckpt: Path) -> str:
    """``model_channels 64 in the checkpoint's run vs 512 here, ...`` from the run's config.json, or ""."""
    cfg = ckpt.parent.parent / "config.json"
    try:
        theirs = json.loads(cfg.read_text()).get("network_def") or {}
        ours = (resolved_config() or {}).get("network_def") or {}
    except (OSError, ValueError, AttributeError):
        return ""
    diff = [f"{k} {json.dumps(theirs[k])} vs {json.dumps(ours[k])}" for k in _SIZE_KEYS
            if k in theirs and k in ours and theirs[k] != ours[k]]
    return ("network_def " + ", ".join(diff) + " here") if diff else ""


def freeze_for_stage(model: torch.nn.Module, training_stage: int, keep_trainable: list[str] | tuple = ()) -> None:
    """Sets ``requires_grad`` per stage.

    Args:
        model: the model (with submodules ``Encoder``, ``Decoder``, ``vq``).
        training_stage: 0 freezes ``vq`` (bypassed), 1 freezes ``Encoder`` and ``Decoder``, 2 trains all.
        keep_trainable: parameter names left trainable in stage 1 (new layers the checkpoint lacked).
    """
    stage = int(training_stage)
    if stage not in (0, 1, 2):
        raise ValueError(f"training_stage must be 0, 1 or 2, got {training_stage}")
    keep = set(keep_trainable)
    vq_update = getattr(getattr(model, "vq", None), "codebook_update", "gradient")
    for name, p in model.named_parameters():
        top = name.split(".", 1)[0]
        if stage == 0:
            p.requires_grad_(top != "vq")
        elif stage == 1:
            p.requires_grad_(top not in ("Encoder", "Decoder") or name in keep)
        else:
            p.requires_grad_(True)
        if top == "vq" and name.endswith("embeddings.weight") and vq_update == "ema":
            p.requires_grad_(False)  # EMA codebook: updated by statistics, not by the optimizer


def prepare_network(
    network: torch.nn.Module,
    training_stage: int,
    pretrained_vae_path: str | None = None,
    run: RunFolder | None = None,
    output_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """Loads the stage's starting weights, freezes, prints the banner and writes the summary.

    Args:
        network: freshly built model.
        training_stage: 0, 1 or 2.
        pretrained_vae_path: weights to start from (stage 1: required unless resuming).
        run: the decision of :func:`prepare_run_folder` (resume / init checkpoint).
        output_dir: where ``vqvae_model_summary.txt`` goes (default ``run.output_dir``).
        device: move the model there.

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
            report = load_weights(network, src)
            check_fit(report, src, stage, "--load_dir" if init_ckpt is not None else "pretrained_vae_path")
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
    freeze_for_stage(network, stage, keep)
    if device is not None:
        network = network.to(device)
    for line in stage_banner(network, stage).splitlines():
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


def stage_banner(model: torch.nn.Module, training_stage: int) -> str:
    """The stage banner of the log (``[Stage N] ...``, total and trainable parameters, trainable per part)."""
    total, train = _counts(model)
    parts: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        part = parts.setdefault(name.split(".", 1)[0], [0, 0])
        part[0] += p.numel() if p.requires_grad else 0
        part[1] += p.numel()
    bar = "=" * 80
    return "\n".join(
        ["", bar, f"[Stage {int(training_stage)}] {STAGE_TITLES.get(int(training_stage), '')}", bar,
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


# --------------------------------------------------------------------------- inference helper
def build_from_run(run_dir: str | os.PathLike, ckpt: str | int = "latest", ema: bool = True,
                   device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuilds the model of a run folder from its ``config.json`` and loads a checkpoint.

    Args:
        run_dir: training run folder (``config.json`` + ``ckpts/``).
        ckpt: "latest" or a step.
        ema: load the EMA weights when present (falls back to the plain weights).
        device: target device.

    Returns:
        (model in eval mode, resolved config dict).
    """
    from pipeline.infer import build_network, load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    model = build_network(cfg, run_dir / "config.json")
    try:
        path, _ = find_checkpoint(run_dir, ckpt, ema=ema)
    except FileNotFoundError:
        if not ema:
            raise
        path, _ = find_checkpoint(run_dir, ckpt, ema=False)
    model.load_state_dict(load_torch(path, "pass another --ckpt or re-copy the run folder"))
    return model.to(device).eval(), cfg

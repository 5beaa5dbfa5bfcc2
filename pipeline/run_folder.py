"""The run folder of a training run: fresh start, resume or initialisation from another stage,
its lock, the files written at start (``config.json``, ``command.txt``, ``log.txt``), and the
removal of a folder whose set-up failed on a user's mistake (one ``error:`` line, no traceback).

``config.json`` is the running bundle config with overrides applied (:func:`resolved_config`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shlex
import shutil
import sys
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import distributed as D
from pipeline.io_utils import FolderLock, save_json, save_text
from pipeline.runs import find_step_checkpoint, list_checkpoints, read_resume_state, run_stage

__all__ = [
    "RunFolder",
    "prepare_run_folder",
    "one_line_errors",
    "user_error_line",
    "setup_done",
    "discard_new_runs",
    "resolved_config",
]

logger = logging.getLogger("ctvq.train")


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
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir '{out}' is a file; pick a folder for the run (--output_dir)")
    if D.is_main():
        _NEW_RUNS.append(run)
        # before the checkpoints are looked for: a run still writing them is named as such
        run.lock = FolderLock(out, ".train.lock", f"another training run is writing into '{out}'; wait for it to "
                                                  "finish or pick another --output_dir").acquire()
    try:
        if load_dir not in (None, "", "None"):
            src = Path(load_dir)
            ckpt = "latest" if ckpt in (None, "", "None") else ckpt
            path, step = find_step_checkpoint(src, ckpt)
            src_stage = run_stage(src if src.is_dir() else src.parent.parent)
            same_stage = src_stage == int(training_stage) or (src_stage is None and src.resolve() == out.resolve())
            if same_stage:
                run.resume_ckpt, run.resume_step = path, step
            else:
                run.init_ckpt = path
        elif ckpt not in (None, "", "None"):
            path, step = find_step_checkpoint(out, ckpt)  # --ckpt without --load_dir: resume this folder
            run.resume_ckpt, run.resume_step = path, step
        if run.resuming:
            check_resume_settings(run.resume_ckpt, config if config is not None else resolved_config())
        _prepare_files(run, config, log_file)
    except BaseException:
        run.release()
        raise
    _ensure_console()
    D.barrier()
    if run.resuming:
        logger.info(f"Loading checkpoint from step {run.resume_step}...")
    elif run.init_ckpt is not None:
        _, init_step = find_step_checkpoint(run.init_ckpt)
        logger.info(f"Loading checkpoint from step {init_step}... (weights of {run.init_ckpt}, training restarts at step 0)")
    return run


#: settings that decide which parameters the optimizer holds: a resumed run must keep its own
RESUME_KEYS = {"frozen_parts": []}  # the value a run's config.json lacking the key had


def check_resume_settings(ckpt: Path, config: dict | None) -> None:
    """Refuses to resume the run that wrote ``ckpt`` with settings its optimizer state cannot fit,
    before anything in a run folder changes (one line naming both values and the fixes)."""
    saved = ckpt.parent.parent / "config.json"
    if config is None or not saved.is_file():
        return
    try:
        before = json.loads(saved.read_text())
    except (OSError, ValueError):
        return  # the checkpoint's own checks name an unreadable run
    for key, default in RESUME_KEYS.items():
        old, new = before.get(key, default), config.get(key, default)
        if old != new:
            raise ValueError(
                f"{saved.parent}: trained with {key} {json.dumps(old)}, this run asks for {json.dumps(new)}, which its "
                f"optimizer state does not fit; resume with --override '{key}={json.dumps(old)}', or start a new run "
                f"from its weights with --override 'pretrained_vae_path=\"{ckpt}\"' and a new --output_dir")


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
    check_runner_overrides(sys.argv)


#: arguments of ``monai.bundle.scripts.run`` itself (everything else on its command line is a config key)
RUNNER_ARGS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}


def check_runner_overrides(argv: list[str]) -> None:
    """``python -m monai.bundle run ... --key value`` adds a key the config lacks without a word, so a
    typo (``--max_step``) would run with the default: refuse it, naming the closest key, as
    ``./run.sh train --override`` does."""
    import ast

    from pipeline.train import check_overrides

    if len(argv) < 2 or argv[1] != "run" or not argv[0].endswith(os.path.join("monai", "bundle", "__main__.py")):
        return
    given, rest = {}, iter(argv[2:])
    for tok in rest:
        if tok.startswith("--"):
            key, eq, value = tok[2:].partition("=")
            given[key] = value if eq else next(rest, "")
    files = given.pop("config_file", "")
    files = ast.literal_eval(files) if files.startswith("[") else [f for f in files.split(",") if f]
    keys = {k: _as_fire_reads(v) for k, v in given.items() if k not in RUNNER_ARGS}
    if files and keys:
        try:
            check_overrides([str(f) for f in files], keys, option="--")
        except SystemExit as e:
            raise ValueError(str(e)) from None


def _as_fire_reads(text: str):
    """A command-line value as Fire hands it to the runner: a Python literal when it is one, else the text."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


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

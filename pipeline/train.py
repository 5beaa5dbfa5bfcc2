"""Training entry point: ``./run.sh train`` (``python -m pipeline.train``).

Runs a bundle config's ``training`` workflow (the same as ``python -m monai.bundle run training
--config_file ...``) with the guide's command-line options; with more than one process it
re-launches itself under torchrun (DDP: NCCL on GPU, gloo on CPU) and adds the
``multi_gpu.json`` overlay.

Examples::

    ./run.sh train --config bundles/ct_vqvae/stage1.json --output_dir outputs/lung_s1 \\
        --data_dir processed_dataset --override pretrained_vae_path=outputs/lung_s0/ckpts/vqvae_step0100000.pt
    ./run.sh train --config bundles/ct_vqvae/stage1.json --output_dir outputs/lung_s1 \\
        --data_dir processed_dataset --load_dir outputs/lung_s1 --ckpt latest          # resume
    ./run.sh train --config bundles/ct_vqvae/stage2.json --output_dir outputs/lung_s2 \\
        --data_dir processed_dataset --load_dir outputs/lung_s1 --ckpt latest --num_gpus 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

from pipeline.config_data import config_value, needs_flag, setting_hint
from pipeline.io_utils import TokenizerError

__all__ = ["build_parser", "parse_overrides", "check_overrides", "main"]

BUNDLE_DIR = Path(__file__).resolve().parents[1] / "bundles" / "ct_vqvae"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="./run.sh train",
        description="Train the sparse CT VQ-VAE from a bundle config (stage0.json: autoencoder pretraining, "
        "stage1.json: codebook on a frozen autoencoder, fitted again to whole training scans at its end, stage2.json: decoder fine-tuned on the tokens of stage 1's book). Writes ckpts/, "
        "tb_logs/, samples/, vqvae_model_summary.txt, config.json, command.txt and log.txt into --output_dir.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config key can be changed with --override key=value (JSON values; nested keys with #, e.g. "
        "--override dataset#args#max_points=200000 --override network_def#use_checkpoint=true).\n"
        "Stage 1 needs pretrained_vae_path (a stage 0 checkpoint or Direct3D-S2 VAE); stage 2 takes the stage 1 "
        "run through --load_dir (or pretrained_vae_path) and keeps the Encoder and the codebook frozen "
        "(frozen_parts [\"Encoder\", \"vq\"]; --override 'frozen_parts=[]' trains them too).\nThe same run with MONAI's runner: python -m monai.bundle "
        "run training --config_file bundles/ct_vqvae/stage1.json --data_dir D --output_dir O",
    )
    p.add_argument("--config", required=True, action="append",
                   help="bundle config (repeat or comma-separate to merge overlays, later files win)")
    p.add_argument("--output_dir", "--output-dir", help="run folder (default: the config's output_dir); an existing run is only resumed")
    p.add_argument("--data_dir", "--data-dir", help="processed dataset root(s), comma-separated; searched recursively")
    p.add_argument("--load_dir", "--load-dir", help="run folder to resume (same stage) or to start from (previous stage)")
    p.add_argument("--ckpt", help="'latest' or a step number (with --load_dir)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key (repeatable)")
    p.add_argument("--num_gpus", "--num-gpus", type=int, default=1, help="processes per node (GPUs; CPU processes without CUDA)")
    p.add_argument("--num_nodes", "--num-nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--node_rank", "--node-rank", type=int, default=0, help="rank of this node")
    p.add_argument("--master_addr", "--master-addr", default="127.0.0.1", help="address of node 0")
    p.add_argument("--master_port", "--master-port", type=int, default=29500, help="port on node 0")
    p.add_argument("--logging_file", "--logging-file", default=None, help="logging INI (default: bundles/ct_vqvae/logging.conf)")
    return p


def _value(text: str, key: str = "value"):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if text.strip()[:1] in ("[", "{", '"'):  # meant as JSON: a plain string never starts like this
            raise SystemExit(f"--override {key}={text}: not valid JSON ({e.msg} at column {e.colno}); "
                             "write lists as [1,2], objects as {\"k\":1}, strings as '\"text\"'") from None
        return text


def parse_overrides(items: list[str]) -> dict:
    """``["a=1", "b#c=x"]`` -> ``{"a": 1, "b#c": "x"}`` (values parsed as JSON when possible)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--override '{item}' is not KEY=VALUE; e.g. --override learning_rate=5e-4")
        k, v = item.split("=", 1)
        out[k.strip()] = _value(v, k.strip())
    return out


def _key_paths(node, prefix: str = "") -> list[str]:
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        path = f"{prefix}{k}"
        out.append(path)
        out += _key_paths(v, path + "#")
    return out


def check_overrides(files: list[str], overrides: dict, option: str = "--override ") -> None:
    """Every override key must exist in the merged config (or be an argument of the ``_target_`` it is
    nested in); a typo names the closest key.

    Args:
        files: the config files (later files win).
        overrides: ``{"a#b": value}`` from :func:`parse_overrides`.
        option: how the user wrote an override (``"--override "``, or ``"--"`` on MONAI's runner).
    """
    import difflib

    from monai.bundle import ConfigParser

    try:
        config = ConfigParser.load_config_files(files)
    except Exception as e:
        raise SystemExit(f"config {files}: cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:160]}); fix the file") from None
    known = _key_paths(config)
    for key in overrides:
        path = key.replace("::", "#")
        if path in known:
            _check_value_kind(config, path, overrides[key], f"{option}{key}")
            continue
        parent, _, name = path.rpartition("#")
        accepted = _target_args(config, parent) if parent in known else []
        if name in accepted:  # an argument of a _target_ the config leaves at its default
            continue
        close = difflib.get_close_matches(key, known + [f"{parent}#{a}" for a in accepted], n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see the keys of the --config file"
        raise SystemExit(f"{option}{key}: no such key in {', '.join(files)}; {hint}")


def _check_value_kind(config: dict, path: str, value, where: str) -> None:
    """A number or a true/false setting of the config overridden by a plain string is refused here, in
    one line, rather than failing wherever the value is first used (references and expressions pass)."""
    try:
        current = config_value(config, path)
    except TokenizerError:  # an expression or an object: nothing to compare with
        return
    if not isinstance(value, str) or value.startswith(("@", "$", "%")):
        return
    if isinstance(current, bool):
        raise SystemExit(needs_flag(f"{where}={value}", path))
    if isinstance(current, (int, float)):
        raise SystemExit(f"{where}={value}: needs a number, as the config's {current!r}; "
                         f"e.g. {setting_hint(path, json.dumps(current))}")


def _target_args(config: dict, path: str) -> list[str]:
    """Keyword arguments of the ``_target_`` at ``path`` of the config (none when it has no ``_target_``)."""
    import importlib
    import inspect

    node = config
    for part in path.split("#"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    target = node.get("_target_") if isinstance(node, dict) else None
    if not isinstance(target, str) or "." not in target:
        return []
    module, _, name = target.rpartition(".")
    try:
        params = inspect.signature(getattr(importlib.import_module(module), name)).parameters.values()
    except Exception:  # not importable here: only the keys the config spells out
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _configs(values: list[str]) -> list[str]:
    files = [c.strip() for v in values for c in v.split(",") if c.strip()]
    for f in files:
        if not Path(f).is_file():
            raise SystemExit(f"config '{f}' not found; e.g. --config bundles/ct_vqvae/stage1.json")
    return files


def _launch_torchrun(args, argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.num_gpus}",
           f"--nnodes={args.num_nodes}", f"--node_rank={args.node_rank}", f"--master_addr={args.master_addr}",
           f"--master_port={args.master_port}", "-m", "pipeline.train", *argv]
    env = dict(os.environ)
    env.setdefault("CTVQ_COMMAND", "./run.sh train " + shlex.join(argv))
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        files = _configs(args.config)
        world = args.num_gpus * args.num_nodes
        if world > 1 and "LOCAL_RANK" not in os.environ:
            return _launch_torchrun(args, argv)
        with _recorded_command(argv):
            return _run(files, args)
    except SystemExit as e:  # a config or override refused in one line: exit 2, as every other user error
        if not isinstance(e.code, str):
            raise
        print(f"error: {e.code}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _recorded_command(argv: list[str]):
    """``CTVQ_COMMAND`` (what ``command.txt`` records) for this call: a torchrun worker keeps its
    launcher's; an in-process call (``bench/quality.py`` runs three) sets its own and restores the old."""
    if "LOCAL_RANK" in os.environ and "CTVQ_COMMAND" in os.environ:
        yield
        return
    previous = os.environ.get("CTVQ_COMMAND")
    os.environ["CTVQ_COMMAND"] = "./run.sh train " + shlex.join(argv)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("CTVQ_COMMAND", None)
        else:
            os.environ["CTVQ_COMMAND"] = previous


def _run(files: list[str], args) -> int:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        overlay = str(BUNDLE_DIR / "multi_gpu.json")
        if overlay not in [str(Path(f).resolve()) for f in files]:
            files.append(overlay)
    overrides = parse_overrides(args.override)
    check_overrides(files, overrides)
    for key in ("output_dir", "data_dir", "load_dir", "ckpt"):
        val = getattr(args, key)
        if val is not None:
            overrides[key] = _value(val) if key == "ckpt" else val
    logging_file = args.logging_file or str(BUNDLE_DIR / "logging.conf")

    from monai.bundle import run

    from pipeline.run_folder import discard_new_runs, user_error_line

    try:
        with warnings.catch_warnings():
            if all(Path(f).resolve().parent == BUNDLE_DIR for f in files):  # our own configs: trusted
                warnings.filterwarnings("ignore", message="parsing config_file", category=UserWarning)
            run("training", config_file=files, logging_file=logging_file, meta_file=_meta(files), **overrides)
    except Exception as e:  # the bundle runner wraps errors: show the user's mistake in one line
        line = None if os.environ.get("CTVQ_DEBUG") else user_error_line(e)
        if line is None:
            raise
        discard_new_runs()
        print(f"error: {line}", file=sys.stderr)  # a worker's error ends with its own
        return 2
    return 0


def _meta(files: list[str]):
    meta = Path(files[0]).parent / "metadata.json"
    return str(meta) if meta.is_file() else str(BUNDLE_DIR / "metadata.json") if (BUNDLE_DIR / "metadata.json").is_file() else None


def _end_worker(code: int) -> None:
    """Ends a torchrun worker without the interpreter's teardown, once everything it wrote is closed
    or flushed: objects still alive then (the DDP model holds the process group) are torn down while
    the interpreter finalises, where a communication thread can abort the exiting process ("terminate
    called without an active exception", seen once in CI; see pytorch/pytorch#179291) and turn a
    finished run into a failed one."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_code = main()
    if "LOCAL_RANK" in os.environ:
        _end_worker(exit_code)
    sys.exit(exit_code)

"""Export a training run as a standard MONAI bundle (and a zip of it).

::

    python -m pipeline.export --run outputs/RUN [--ckpt CKPT] [--weights ema|model]
                              [--eval REPORT_DIR/summary.json] --out dist/ct_vqvae

writes::

    dist/ct_vqvae/
      configs/metadata.json   MONAI bundle metadata (mandatory schema fields, versions, data format)
      configs/inference.json  network_def + transforms + the tokenizer; runs with monai.bundle
      configs/logging.conf
      models/model.pt         state dict (EMA weights by default)
      docs/README.md          what it is, data and window, metrics, limits
      docs/license.txt, LICENSE
    dist/ct_vqvae.zip         the same folder, zipped (ct_vqvae/... inside)

The bundle needs the ``ctvq`` package (``transforms``, ``networks``, ``pipeline``) installed:
its ``_target_``s point at those packages. spconv models cannot be exported to TorchScript or
ONNX (spconv ops are custom CUDA/C++ kernels with Python-side rulebooks), so there is no
``model.ts``/``model.onnx``.

Metadata schema check without internet: download the schema named in ``metadata.json``'s
``"schema"`` once, then ``verify_bundle(DIR, schema_file=PATH)`` or
``python -m monai.bundle verify_metadata --meta_file DIR/configs/metadata.json --filepath PATH``
(an existing ``--filepath`` is used as is, never downloaded). Without it, :func:`verify_bundle`
checks against ``pipeline.bundle_docs.MB_METADATA_SCHEMA``, a local schema of the mandatory fields of
the MONAI bundle specification.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.bundle_docs import (
    BUNDLE_TEMPLATE_DIR,
    LICENSE_TEXT,
    MB_METADATA_SCHEMA,
    bundle_readme,
    folder_names,
    load_template,
    make_metadata,
)
from pipeline.io_utils import TokenizerError, atomic_path, load_json, save_json

__all__ = ["export_bundle", "verify_bundle", "make_inference_config", "main"]

#: list of the files an export wrote, kept in the bundle folder (not in the zip): what --overwrite may replace
MANIFEST = ".ctvq-export.json"

_LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def make_inference_config(network_def: Mapping, window: Any, resolution: int, template: Mapping | None = None) -> dict:
    """Inference config of the bundle: template ``bundles/ct_vqvae/inference.json`` with this model.

    Args:
        network_def: the run's ``network_def``.
        window: WindowSpec of the model.
        resolution: cube side.
        template: config to start from (default: the repository template).
    """
    cfg = copy.deepcopy(dict(template) if template is not None else load_template("inference.json"))
    cfg["network_def"] = copy.deepcopy(dict(network_def))
    cfg["window"] = {"name": window.name, "width": float(window.width), "level": float(window.level)}
    cfg["resolution"] = int(resolution)
    cfg["bundle_root"] = "."
    return cfg


def _make_readable(folder: Path) -> None:
    """Modes of a new folder tree as the umask gives (0755 / 0644 with 022), not ``mkdtemp``'s 0700."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _zip_dir(folder: Path, zip_path: Path) -> Path:
    with atomic_path(zip_path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(folder.rglob("*")):
                if p.is_file() and p.name != MANIFEST:
                    zf.write(p, Path(folder.name) / p.relative_to(folder))
    return zip_path


def _find_eval_summary(run_dir: Path) -> Path | None:
    for cand in (run_dir / "eval" / "summary.json", run_dir / "evaluation" / "summary.json", run_dir / "summary.json"):
        if cand.is_file():
            return cand
    return None


def _check_out(out: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuses an ``out`` whose replacement would lose data: the run folder or a folder above it, a
    non-empty folder without ``overwrite``, and (even with it) a folder holding files export did not write."""
    o, r = out.resolve(), run_dir.resolve()
    if o == r or o in r.parents:
        raise TokenizerError(f"--out {out} is the run folder {run_dir} or holds it; export into another folder, e.g. dist/ct_vqvae")
    if out.exists() and not out.is_dir():
        raise TokenizerError(f"--out {out} is a file; pass a folder for the bundle")
    zip_path = out.with_name(out.name + ".zip")
    if not overwrite:
        if out.is_dir() and any(out.iterdir()):
            raise TokenizerError(f"--out {out} is not empty; pass --overwrite to replace an earlier export there, or another folder")
        if zip_path.exists():
            raise TokenizerError(f"{zip_path} exists; pass --overwrite to replace it, or another --out")
        return
    if out.is_dir() and any(out.iterdir()):
        listed = set(load_json(out / MANIFEST)) if (out / MANIFEST).is_file() else set()
        other = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                       if not p.is_dir() and p.relative_to(out).as_posix() not in listed | {MANIFEST})
        if not listed:
            raise TokenizerError(f"--out {out} was not written by export (no {MANIFEST}); move it away or export into another folder")
        if other:
            raise TokenizerError(f"--out {out} holds files that export did not write (e.g. {other[0]}); "
                                 "move them away or export into another folder")


def export_bundle(
    run_dir: str | os.PathLike,
    out: str | os.PathLike = "dist/ct_vqvae",
    ckpt: str | os.PathLike | None = None,
    weights: str = "ema",
    eval_summary: str | os.PathLike | Mapping | None = None,
    version: str | None = None,
    license_file: str | os.PathLike | None = None,
    make_zip: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a MONAI bundle from a training run (atomic: built aside, then renamed into ``out``).

    Args:
        run_dir: the run folder (``config.json``, ``ckpts/``).
        out: bundle folder to write: new or empty, or with ``overwrite`` an earlier export (a folder
            holding any file export did not write, or the run itself, is never replaced).
        ckpt: checkpoint file (default: the run's latest of the chosen ``weights``).
        weights: "ema" (EMA weights, default) or "model" (plain weights); used when ``ckpt`` is None.
        eval_summary: evaluation ``summary.json`` (path or dict) for README and ``eval_metrics``;
            default: ``RUN_DIR/eval/summary.json`` when present.
        version: bundle version (default: the template's).
        license_file: license text to ship (default: Apache-2.0 notice).
        make_zip: also write ``<out>.zip``.
        overwrite: replace an earlier export in ``out`` (and its zip).

    Returns:
        the bundle folder.
    """
    import torch

    from pipeline.infer import window_from_config
    from pipeline.runs import load_run

    run_dir = Path(run_dir)
    _check_out(Path(out), run_dir, overwrite)
    if isinstance(eval_summary, (str, os.PathLike)) and not Path(eval_summary).is_file():
        raise TokenizerError(f"--eval {eval_summary}: no such file; pass the summary.json that ./run.sh evaluate "
                             "wrote (REPORT_DIR/summary.json), or leave --eval out")
    net, cfg, network_def, ckpt_path = load_run(run_dir, ckpt, weights)
    codebooks = [m for m in net.vq.modules() if isinstance(getattr(m, "initialized", None), torch.Tensor)]
    untrained = [i + 1 for i, m in enumerate(codebooks) if not bool(m.initialized)]
    if untrained:
        print(f"export: warning: {ckpt_path}: codebook level {', '.join(map(str, untrained))} of {len(codebooks)} never "
              "got its k-means (training ended first), so its codes are untrained; train longer and export again",
              file=sys.stderr)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}  # complete: weights and buffers
    window = window_from_config(cfg)
    resolution = int(cfg.get("resolution") or int(getattr(net, "resolution", 64)) * int(getattr(net, "factor", 8)))
    if eval_summary is None:
        eval_summary = _find_eval_summary(run_dir)
    if eval_summary is not None and not isinstance(eval_summary, Mapping):
        eval_summary = load_json(eval_summary)
    data_source = cfg.get("data_source") or (f"the processed datasets in {folder_names(cfg['data_dir'])}" if cfg.get("data_dir") else None)
    if "use_checkpoint" in network_def:
        network_def["use_checkpoint"] = False  # activation checkpointing is a training setting
    meta = make_metadata(network_def, window, resolution, eval_summary, data_source, version)
    infer_cfg = make_inference_config(network_def, window, resolution)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_json(stage / "configs" / "metadata.json", meta, indent=4)
        save_json(stage / "configs" / "inference.json", infer_cfg, indent=4)
        logging_src = BUNDLE_TEMPLATE_DIR / "logging.conf"
        (stage / "configs" / "logging.conf").write_text(
            logging_src.read_text(encoding="utf-8") if logging_src.is_file() else _LOGGING_CONF, encoding="utf-8"
        )
        (stage / "models").mkdir(parents=True)
        torch.save(state, stage / "models" / "model.pt")
        (stage / "docs").mkdir(parents=True)
        kind = "EMA" if "_ema" in ckpt_path.name else "plain"
        (stage / "docs" / "README.md").write_text(bundle_readme(meta, network_def, ckpt_path, kind, eval_summary), encoding="utf-8")
        lic = Path(license_file).read_text(encoding="utf-8") if license_file else LICENSE_TEXT
        (stage / "docs" / "license.txt").write_text(lic, encoding="utf-8")
        (stage / "LICENSE").write_text(lic, encoding="utf-8")
        save_json(stage / MANIFEST, sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()))
        _make_readable(stage)
        # swap into place
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    zip_path = out.with_name(out.name + ".zip")
    if make_zip:
        _zip_dir(out, zip_path)
    elif zip_path.exists():  # an earlier export's zip (refused above unless --overwrite): no longer this bundle
        zip_path.unlink()
    return out


def verify_bundle(bundle_dir: str | os.PathLike, schema_file: str | os.PathLike | None = None) -> None:
    """Check a bundle: required files, and ``monai.bundle.verify_metadata`` against a local schema.

    Args:
        bundle_dir: bundle folder.
        schema_file: the official schema file downloaded beforehand (default: ``MB_METADATA_SCHEMA``).

    Raises:
        FileNotFoundError: a required file is missing. ValueError: the metadata does not validate.
    """
    from monai.bundle import verify_metadata

    try:
        import jsonschema  # noqa: F401  (monai's verify_metadata needs it and fails obscurely without)
    except ImportError:
            raise TokenizerError("verifying bundle metadata needs the jsonschema package: pip install jsonschema (it is in requirements.txt)") from None
    bundle_dir = Path(bundle_dir)
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt"):
        if not (bundle_dir / rel).is_file():
            raise FileNotFoundError(f"{bundle_dir / rel}: missing from the bundle; re-export it with python -m pipeline.export")
    with tempfile.TemporaryDirectory(prefix="ctvq_schema_") as tmp:
        if schema_file is None:
            schema_file = Path(tmp) / "schema.json"
            save_json(schema_file, MB_METADATA_SCHEMA, indent=4)
        elif not Path(schema_file).is_file():
            raise FileNotFoundError(f"{schema_file}: schema file not found; download the URL in metadata.json 'schema' first")
        import hashlib

        digest = hashlib.md5(Path(schema_file).read_bytes()).hexdigest()  # a local file, used as it is
        verify_metadata(meta_file=str(bundle_dir / "configs" / "metadata.json"), filepath=str(schema_file),
                        hash_val=digest, hash_type="md5")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./run.sh export", description="Export a training run as a MONAI bundle.")
    p.add_argument("--run", required=True, help="run folder with config.json and ckpts/")
    p.add_argument("--ckpt", default=None, help="checkpoint file, a step number, or 'latest' (default: latest of --weights)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights when --ckpt is not a file")
    p.add_argument("--out", default="dist/ct_vqvae", help="bundle folder to write, new or empty (default dist/ct_vqvae)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (never other files)")
    p.add_argument("--eval", default=None, help="evaluation summary.json to include")
    p.add_argument("--version", default=None, help="bundle version")
    p.add_argument("--license", default=None, help="license text file to ship")
    p.add_argument("--no-zip", action="store_true", help="do not write <out>.zip")
    p.add_argument("--verify", action="store_true", help="verify the metadata after export")
    p.add_argument("--schema", default=None, help="local copy of the MONAI metadata schema for --verify")
    a = p.parse_args(argv)
    from pipeline.infer import cli_errors

    with cli_errors():
        out = export_bundle(a.run, a.out, a.ckpt, a.weights, a.eval, a.version, a.license, not a.no_zip, a.overwrite)
        if a.verify:
            verify_bundle(out, a.schema)
        print(f"bundle: {out}")
        if not a.no_zip:
            print(f"zip:    {out.with_name(out.name + '.zip')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

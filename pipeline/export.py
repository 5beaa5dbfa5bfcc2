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
checks against :data:`MB_METADATA_SCHEMA`, a local schema of the mandatory fields of the MONAI
bundle specification.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.io_utils import TokenizerError, atomic_path, load_json, save_json

__all__ = [
    "MB_METADATA_SCHEMA",
    "BUNDLE_TEMPLATE_DIR",
    "export_bundle",
    "verify_bundle",
    "package_versions",
    "make_metadata",
    "make_inference_config",
    "main",
]

#: the bundle configs of this repository (templates for the exported bundle)
BUNDLE_TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "bundles" / "ct_vqvae"
#: list of the files an export wrote, kept in the bundle folder (not in the zip): what --overwrite may replace
MANIFEST = ".ctvq-export.json"


def _object_schema(properties: dict[str, Any], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """JSON schema of an object with these fields, all required but the ``optional`` ones."""
    return {"type": "object", "required": [k for k in properties if k not in optional], "properties": properties}


_STRING = {"type": "string"}
_STRING_MAP = {"type": "object", "additionalProperties": _STRING}
_TENSOR_FORMAT = _object_schema({
    "type": _STRING,
    "format": _STRING,
    "modality": _STRING,
    "num_channels": {"type": "integer", "minimum": 1},
    "spatial_shape": {"type": "array", "items": {"type": ["integer", "string"]}},
    "dtype": _STRING,
    "value_range": {"type": "array", "items": {"type": "number"}, "maxItems": 2},
    "is_patch_data": {"type": "boolean"},
    "channel_def": {"type": "object"},
}, optional=("modality",))

#: JSON schema of the mandatory metadata fields of the MONAI bundle specification
#: (docs.monai.io "MONAI Bundle Specification", metadata.json File), for offline checks.
MB_METADATA_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "MONAI bundle metadata (mandatory fields of the bundle specification)",
    **_object_schema({
        "schema": _STRING,
        "version": _STRING,
        "changelog": _STRING_MAP,
        "monai_version": _STRING,
        "pytorch_version": _STRING,
        "numpy_version": _STRING,
        "optional_packages_version": _STRING_MAP,
        "required_packages_version": _STRING_MAP,
        "name": _STRING,
        "task": _STRING,
        "description": _STRING,
        "authors": _STRING,
        "copyright": _STRING,
        "data_source": _STRING,
        "data_type": _STRING,
        "intended_use": _STRING,
        "references": {"type": "array", "items": _STRING},
        "eval_metrics": {"type": "object"},
        "network_data_format": _object_schema({
            "inputs": {
                "type": "object",
                "additionalProperties": {**_TENSOR_FORMAT, "required": _TENSOR_FORMAT["required"] + ["modality"]},
            },
            "outputs": {"type": "object", "additionalProperties": _TENSOR_FORMAT},
        }),
    }, optional=("changelog", "optional_packages_version", "name", "data_source", "data_type", "intended_use",
                 "references", "eval_metrics")),
}

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

_LICENSE = """Apache License, Version 2.0 (the "License") applies to the configuration files and the
model weights in this bundle: you may not use them except in compliance with the License. You
may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed under the
License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND,
either express or implied. See the License for the specific language governing permissions
and limitations under the License.

The weights were trained on the CT data named in docs/README.md; the terms of those data sets
apply in addition. Not for diagnostic use.
"""


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        try:
            mod = __import__(module)
            return str(getattr(mod, "__version__", None) or "") or None
        except Exception:
            return None


def package_versions() -> dict[str, str]:
    """Installed versions of the packages the bundle needs (monai, torch, numpy, spconv, ...)."""
    import monai
    import numpy
    import torch

    out = {"monai": monai.__version__, "torch": torch.__version__.split("+")[0], "numpy": numpy.__version__}
    try:
        from networks.backend import SPCONV_VERSION

        out["spconv"] = str(SPCONV_VERSION)
    except Exception:
        out["spconv"] = _version("spconv") or "unknown"
    for name in ("ctvq", "nibabel", "SimpleITK", "scipy"):
        v = _version(name)
        if v:
            out[name] = v
    return out


def _load_template(name: str) -> dict:
    path = BUNDLE_TEMPLATE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: bundle template missing; restore bundles/ct_vqvae/{name} from the repository")
    return load_json(path)


def make_metadata(
    network_def: Mapping,
    window: Any,
    resolution: int,
    eval_summary: Mapping | None = None,
    data_source: str | None = None,
    version: str | None = None,
    template: Mapping | None = None,
) -> dict:
    """Bundle metadata: template ``bundles/ct_vqvae/metadata.json`` + versions + this model's shapes.

    Args:
        network_def: the model's ``network_def`` (gives the codebook size).
        window: WindowSpec of the model.
        resolution: cube side the model works on.
        eval_summary: optional evaluation summary (``summary.json``) for ``eval_metrics``.
        data_source: optional text on the training data.
        version: bundle version (default: the template's).
        template: metadata to start from (default: the repository template).
    """
    meta = copy.deepcopy(dict(template) if template is not None else _load_template("metadata.json"))
    vers = package_versions()
    meta["monai_version"] = vers["monai"]
    meta["pytorch_version"] = vers["torch"]
    meta["numpy_version"] = vers["numpy"]
    # MONAI >= 1.4 reads "required_packages_version"; the older "optional_packages_version" is deprecated
    meta.pop("optional_packages_version", None)
    meta["required_packages_version"] = {k: vers[k] for k in ("ctvq", "spconv", "nibabel", "SimpleITK", "scipy") if k in vers}
    if version:
        meta["version"] = version
        meta.setdefault("changelog", {}).setdefault(version, "exported from a training run")
    k = int(network_def.get("num_embeddings", 8192))
    fmt = meta["network_data_format"]
    for spec in list(fmt["inputs"].values()) + [fmt["outputs"]["pred"]]:
        spec["spatial_shape"] = [int(resolution)] * 3
    fmt["outputs"]["tokens"]["value_range"] = [0, k - 1]
    meta["window"] = {"name": window.name, "width": float(window.width), "level": float(window.level)}
    meta["description"] = meta.get("description", "").replace("512^3", f"{int(resolution)}^3")
    meta["task"] = (
        f"Turn a CT scan into discrete tokens ({k}-code codebook on a {resolution // 8}^3 latent grid, "
        f"{window.name} window W{window.width:g}/L{window.level:g}) and reconstruct it"
    )
    if data_source:
        meta["data_source"] = data_source
    if eval_summary:
        overall = eval_summary.get("overall", eval_summary)
        meta["eval_metrics"] = {
            key: overall[key]
            for key in ("psnr_body", "ssim_body", "psnr", "ssim", "mae_hu_body", "rmse_hu_body", "perplexity", "codes_used")
            if key in overall and overall[key] is not None
        }
    return meta


def make_inference_config(network_def: Mapping, window: Any, resolution: int, template: Mapping | None = None) -> dict:
    """Inference config of the bundle: template ``bundles/ct_vqvae/inference.json`` with this model.

    Args:
        network_def: the run's ``network_def``.
        window: WindowSpec of the model.
        resolution: cube side.
        template: config to start from (default: the repository template).
    """
    cfg = copy.deepcopy(dict(template) if template is not None else _load_template("inference.json"))
    cfg["network_def"] = copy.deepcopy(dict(network_def))
    cfg["window"] = {"name": window.name, "width": float(window.width), "level": float(window.level)}
    cfg["resolution"] = int(resolution)
    cfg["bundle_root"] = "."
    return cfg


def _readme(meta: Mapping, net: Mapping, ckpt: Path, weights: str, eval_summary: Mapping | None) -> str:
    w = meta["window"]
    lines = [
        f"# {meta.get('name', 'CT sparse VQ-VAE tokenizer')}",
        "",
        meta.get("description", ""),
        "",
        "## What it is",
        "",
        f"- Window: **{w['name']}** (width {w['width']:g} HU, level {w['level']:g} HU); window value v maps back to"
        f" HU = {w['level'] - w['width'] / 2:g} + v * {w['width']:g}.",
        f"- Grid: scans are resampled into an isotropic {meta['network_data_format']['inputs']['image']['spatial_shape'][0]}^3 cube;"
        " one token per active 8^3 cell.",
        f"- Model: `{net.get('_target_', 'networks.SparseVQVAE')}` with "
        + ", ".join(f"{k}={v}" for k, v in net.items() if not str(k).startswith("_")),
        f"- Weights: {weights} weights (state dict) from `{ckpt.name}`.",
        f"- Trained on: {meta.get('data_source', 'see the run configuration')}.",
        "",
        "## Use",
        "",
        "Needs the `ctvq` package (its `transforms`, `networks` and `pipeline`) and spconv installed. From the",
        "folder that holds `ct_vqvae/`:",
        "",
        "```bash",
        "# scan -> tokens/scan_tokens.npz (DICOM folder or zip, NIfTI, NRRD, MHA)",
        "python -m monai.bundle run --config_file ct_vqvae/configs/inference.json \\",
        "    --bundle_root ct_vqvae --input_files \"['scan.nii.gz']\" --output_dir tokens",
        "# tokens -> recon/scan_recon.nii.gz in HU, on the scan's own grid",
        "python -m monai.bundle run --config_file ct_vqvae/configs/inference.json \\",
        "    --bundle_root ct_vqvae --mode decode --input_files \"['tokens/scan_tokens.npz']\" --output_dir recon \\",
        "    --original_grid True",
        "```",
        "",
        "```python",
        "import monai.bundle",
        "model = monai.bundle.load('ct_vqvae', bundle_dir='.', workflow_type='inference')  # the network with its weights",
        "",
        "from pipeline.infer import Tokenizer",
        "tok = Tokenizer.from_bundle('ct_vqvae')",
        "tokens = tok.encode('scan.nii.gz')   # latent coords, code indices, window, geometry",
        "volume = tok.decode(tokens)           # window values on the cube grid",
        "hu, affine = tok.decode_hu(tokens, original_grid=True)",
        "```",
        "",
        "## Metrics",
        "",
    ]
    if eval_summary:
        overall = eval_summary.get("overall", eval_summary)
        from pipeline.evaluate import LABELS

        lines += ["| measure | value |", "|---|---|"]
        for key, val in overall.items():
            if isinstance(val, (int, float)):
                label, _, scale = LABELS.get(key, (key, key, 1))
                lines.append(f"| {label} | {val * scale:.4g} |")
        n = eval_summary.get("num_cases")
        if n is not None:
            lines += ["", f"On {n} whole scans ({_short(eval_summary.get('data_dir')) or 'evaluation set'})."]
    else:
        lines.append("No evaluation summary was given at export (`--eval REPORT_DIR/summary.json`).")
    lines += [
        "",
        "## Limits",
        "",
        "- spconv models cannot be exported to TorchScript or ONNX: the bundle ships `models/model.pt` (a state"
        " dict) only and needs the Python packages.",
        "- Only the window above is modelled: HU outside it are clipped, and voxels outside the body come back"
        " as the window minimum.",
        "- Research use only; not for diagnosis.",
        "",
        f"Exported {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d')} with "
        + ", ".join(f"{k} {v}" for k, v in package_versions().items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def _short(paths: Any) -> str:
    """Folder names without the machine's absolute paths: ``/data/a,/data/b`` -> ``a, b``."""
    if not paths:
        return ""
    items = paths if isinstance(paths, (list, tuple)) else str(paths).split(",")
    return ", ".join(Path(str(p).strip()).name for p in items if str(p).strip())


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
    from pipeline.infer import window_from_config
    from pipeline.runs import load_run

    run_dir = Path(run_dir)
    _check_out(Path(out), run_dir, overwrite)
    net, cfg, network_def, ckpt_path = load_run(run_dir, ckpt, weights)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}  # complete: weights and buffers
    window = window_from_config(cfg)
    resolution = int(cfg.get("resolution") or int(getattr(net, "resolution", 64)) * int(getattr(net, "factor", 8)))
    if eval_summary is None:
        eval_summary = _find_eval_summary(run_dir)
    if eval_summary is not None and not isinstance(eval_summary, Mapping):
        eval_summary = load_json(eval_summary)
    data_source = cfg.get("data_source") or (f"the processed datasets in {_short(cfg['data_dir'])}" if cfg.get("data_dir") else None)
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
        import torch

        (stage / "models").mkdir(parents=True)
        torch.save(state, stage / "models" / "model.pt")
        (stage / "docs").mkdir(parents=True)
        kind = "EMA" if "_ema" in ckpt_path.name else "plain"
        (stage / "docs" / "README.md").write_text(_readme(meta, network_def, ckpt_path, kind, eval_summary), encoding="utf-8")
        lic = Path(license_file).read_text(encoding="utf-8") if license_file else _LICENSE
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
    if make_zip:
        _zip_dir(out, out.with_name(out.name + ".zip"))
    return out


def verify_bundle(bundle_dir: str | os.PathLike, schema_file: str | os.PathLike | None = None) -> None:
    """Check a bundle: required files, and ``monai.bundle.verify_metadata`` against a local schema.

    Args:
        bundle_dir: bundle folder.
        schema_file: the official schema file downloaded beforehand (default: :data:`MB_METADATA_SCHEMA`).

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
    p = argparse.ArgumentParser(prog="python -m pipeline.export", description="Export a training run as a MONAI bundle.")
    p.add_argument("--run", required=True, help="run folder with config.json and ckpts/")
    p.add_argument("--ckpt", default=None, help="checkpoint file, or 'latest' (default: latest of --weights)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights when --ckpt is not a file")
    p.add_argument("--out", default="dist/ct_vqvae", help="bundle folder to write (new or empty)")
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

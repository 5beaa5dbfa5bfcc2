"""What an exported bundle says about itself: ``configs/metadata.json`` (from the repository's template,
checked against :data:`MB_METADATA_SCHEMA`), ``docs/README.md`` and the licence text."""

from __future__ import annotations

import copy
import datetime
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.io_utils import load_json

__all__ = ["BUNDLE_TEMPLATE_DIR", "MB_METADATA_SCHEMA", "LICENSE_TEXT", "load_template", "package_versions",
           "make_metadata", "bundle_readme", "folder_names"]

#: the bundle configs of this repository (templates for the exported bundle)
BUNDLE_TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "bundles" / "ct_vqvae"


def load_template(name: str) -> dict:
    """One of the repository's bundle configs (``bundles/ct_vqvae/<name>``), the start of an exported one."""
    path = BUNDLE_TEMPLATE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: bundle template missing; restore bundles/ct_vqvae/{name} from the repository")
    return load_json(path)


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


LICENSE_TEXT = """Apache License, Version 2.0 (the "License") applies to the configuration files and the
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
    meta = copy.deepcopy(dict(template) if template is not None else load_template("metadata.json"))
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


def bundle_readme(meta: Mapping, net: Mapping, ckpt: Path, weights: str, eval_summary: Mapping | None) -> str:
    """``docs/README.md`` of the bundle: what it is, how to use it, its metrics and limits."""
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
        from pipeline.report import LABELS

        lines += ["| measure | value |", "|---|---|"]
        for key, val in overall.items():
            if isinstance(val, (int, float)):
                label, _, scale = LABELS.get(key, (key, key, 1))
                lines.append(f"| {label} | {val * scale:.4g} |")
        n = eval_summary.get("num_cases")
        if n is not None:
            lines += ["", f"On {n} whole scans ({folder_names(eval_summary.get('data_dir')) or 'evaluation set'})."]
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


def folder_names(paths: Any) -> str:
    """Folder names without the machine's absolute paths: ``/data/a,/data/b`` -> ``a, b``."""
    if not paths:
        return ""
    items = paths if isinstance(paths, (list, tuple)) else str(paths).split(",")
    return ", ".join(Path(str(p).strip()).name for p in items if str(p).strip())

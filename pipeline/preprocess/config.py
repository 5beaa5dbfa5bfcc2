"""Settings of a preprocessing run: windows, organ mapping, the per-run config and
``dataset_config.json``."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pipeline.discovery import Dataset
from pipeline.io_utils import load_json
from pipeline.processed import layout_files
from transforms import HU_MAX, HU_MIN, WINDOW_PRESETS, WindowSpec, parse_window

__all__ = ["FORMAT_VERSION", "PreprocessConfig", "parse_windows", "load_organ_mapping", "window_config",
           "dataset_config"]

FORMAT_VERSION = 2
DEFAULT_WINDOWS = tuple(WINDOW_PRESETS)  # lung, bone, soft_tissue, brain


def window_config(w: WindowSpec, layout: str) -> dict:
    """A window's entry in dataset_config.json and case.json (the guide layout adds its file)."""
    out = {"width": w.width, "level": w.level}
    return {**out, "file": f"windows/{w.filename}"} if layout == "guide" else out


def _parse_window(window) -> WindowSpec:
    try:
        return parse_window(window)
    except ValueError as e:
        raise ValueError(f"{e} (e.g. --windows lung,bone or 'liver:150:60')") from None


def parse_windows(specs: Sequence[str] | str | None) -> list[WindowSpec]:
    """Parse window specs: preset names or ``name:WIDTH:LEVEL``, comma- or space-separated.

    Args:
        specs: list of specs (each may hold several, comma-separated); None -> the four presets.

    Raises:
        ValueError: an unknown preset, a malformed spec, or two windows with the same name.
    """
    if specs is None:
        specs = list(DEFAULT_WINDOWS)
    if isinstance(specs, str):
        specs = [specs]
    out: list[WindowSpec] = []
    for spec in specs:
        for item in str(spec).split(","):
            if item.strip():
                out.append(_parse_window(item))
    names = [w.name for w in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"window name(s) {dup} given twice; give each window a distinct name")
    if not out:
        raise ValueError("no window given; pass e.g. --windows lung,bone or 'liver:150:60'")
    return out


def load_organ_mapping(path: str | os.PathLike | None) -> tuple[dict | None, list[WindowSpec]]:
    """Read ORGAN_MAPPING_JSON.

    Accepted forms: ``{"1": "spleen", "5": "liver", ...}``, or
    ``{"labels": {"1": "spleen", ...}, "windows": [...]}`` where ``windows`` is a list of
    ``"name:W:L"`` strings or a ``{name: {"width": W, "level": L}}`` / ``{name: [W, L]}`` mapping
    (these windows are computed in addition to ``--windows``). Label entries may also be
    objects (e.g. ``{"name": "liver", "window": [150, 60]}``); they are copied as they are.

    Args:
        path: JSON file, or None.

    Returns:
        (organ mapping with string keys, or None; extra windows).

    Raises:
        ValueError: unreadable file or keys that are not label ids.
    """
    if path is None:
        return None, []
    path = Path(path)
    try:
        data = load_json(path)
    except FileNotFoundError:
        raise ValueError(f"organ mapping {path} not found; pass an existing JSON file or leave it out") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"organ mapping {path} is not valid JSON ({e}); fix the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"organ mapping {path} must be a JSON object {{\"label id\": \"organ name\"}}")
    windows: list[WindowSpec] = []
    mapping = data
    for key in ("labels", "organ_mapping", "organs"):
        if isinstance(data.get(key), dict):
            mapping = data[key]
            break
    raw_windows = data.get("windows") if mapping is not data else None
    if raw_windows is not None:
        if isinstance(raw_windows, dict):
            for name, v in raw_windows.items():
                windows.append(_parse_window({"name": name, **v} if isinstance(v, dict) else (name, *v)))
        elif isinstance(raw_windows, list):
            windows.extend(_parse_window(v) for v in raw_windows)
        else:
            raise ValueError(f"organ mapping {path}: 'windows' must be a list of 'name:W:L' or an object")
    out = {}
    for k, v in mapping.items():
        try:
            int(str(k))
        except ValueError:
            raise ValueError(f"organ mapping {path}: key {k!r} is not an integer label id; "
                             "use {\"1\": \"spleen\", ...} or put the mapping under \"labels\"") from None
        out[str(int(str(k)))] = v
    return out, windows


@dataclass
class PreprocessConfig:
    """Settings shared by every case of a run.

    Args:
        resolution: cube side R (voxels).
        windows: windows to write.
        hu_min: HU mapped to 0 by the normalisation (and the clip floor).
        hu_max: HU mapped to 1 by the normalisation (and the clip ceiling).
        organ_mapping: label id -> organ name (copied to dataset_config.json).
        overwrite: reprocess cases even when complete.
        layout: "compact" (int16 HU, mask and labels cropped to the body, compressed chunks) or
            "guide" (float16 normalised HU and windows, whole cube; see ``pipeline.processed``).
    """

    resolution: int = 512
    windows: list[WindowSpec] = field(default_factory=lambda: parse_windows(None))
    hu_min: float = HU_MIN
    hu_max: float = HU_MAX
    organ_mapping: dict | None = None
    overwrite: bool = False
    layout: str = "compact"

    def key_dict(self, with_windows: bool | None = None) -> dict:
        """The settings a case's files depend on: its windows only in the guide layout, which writes
        them (compact cases store HU, so another ``--windows`` does not redo them); ``with_windows``
        True gives the key compact markers were written with before that."""
        key = {
            "format": FORMAT_VERSION,
            "layout": self.layout,
            "resolution": int(self.resolution),
            "hu": [float(self.hu_min), float(self.hu_max)],
        }
        if self.layout == "guide" if with_windows is None else with_windows:
            key["windows"] = [[w.name, w.width, w.level] for w in self.windows]
        return key


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("ctvq", "monai", "torch", "numpy", "SimpleITK", "nibabel", "scipy"):
        with contextlib.suppress(Exception):
            out[pkg] = md.version(pkg)
    return out


def dataset_config(cfg: PreprocessConfig, ds: Dataset) -> dict:
    """Content of ``dataset_config.json`` for one dataset.

    Args:
        cfg: run settings.
        ds: the dataset.
    """
    return {
        "name": ds.name,
        "resolution": int(cfg.resolution),
        "hu_min": float(cfg.hu_min),
        "hu_max": float(cfg.hu_max),
        "normalization": "(HU - hu_min) / (hu_max - hu_min), HU clipped to [hu_min, hu_max]",
        "window_formula": "clip((HU - (level - width / 2)) / width, 0, 1)",
        "layout": cfg.layout,
        "windows": {w.name: window_config(w, cfg.layout) for w in cfg.windows},
        "files": layout_files(cfg.layout),
        "dtypes": ({"hu": "int16", "body_mask": "bool", "labels": "uint8|int16"} if cfg.layout == "compact" else
                   {"ct_normalized": "float16", "windows": "float16", "body_mask": "bool", "labels": "uint8|int16"}),
        "organ_mapping": cfg.organ_mapping,
        "raw_dir": str(ds.root.resolve()),
        "unpaired_labels": [str(p) for p in ds.unpaired_labels],
        "ignored": list(ds.ignored),
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
    }



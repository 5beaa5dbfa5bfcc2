"""HU intensity transforms: clipping, display windows, normalisation to [0, 1] and back."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

__all__ = [
    "HU_MIN",
    "HU_MAX",
    "WINDOW_PRESETS",
    "WindowSpec",
    "parse_window",
    "ClipHU",
    "ClipHUd",
    "Window",
    "Windowd",
    "NormalizeHU",
    "NormalizeHUd",
    "normalize_hu",
    "denormalize_hu",
    "apply_window",
    "window_to_hu",
]

HU_MIN = -1024.0
HU_MAX = 3071.0
_SLAB_VOXELS = 1 << 20  # voxels per slab of a scale into a buffer (4 MiB of float32: stays in cache)

#: Standard display windows: name -> (width, level) in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (1500, -600),
    "bone": (1500, 300),
    "soft_tissue": (400, 50),
    "brain": (80, 35),
}


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{float(v):g}"


@dataclass(frozen=True)
class WindowSpec:
    """A display window.

    Args:
        name: short name used in file names (letters, digits, ``_`` or ``-``).
        width: window width W in HU (> 0).
        level: window level (centre) L in HU.
    """

    name: str
    width: float
    level: float

    def __post_init__(self):
        if not self.name or not all(ch.isalnum() or ch in "_-" for ch in self.name):
            raise ValueError(f"window name {self.name!r} must be letters, digits, '_' or '-'")
        if not float(self.width) > 0:
            raise ValueError(f"window {self.name!r}: width must be > 0 HU, got {self.width}")
        object.__setattr__(self, "width", float(self.width))
        object.__setattr__(self, "level", float(self.level))

    @property
    def low(self) -> float:
        """Lowest HU of the window (maps to 0)."""
        return self.level - self.width / 2.0

    @property
    def high(self) -> float:
        """Highest HU of the window (maps to 1)."""
        return self.level + self.width / 2.0

    @property
    def stem(self) -> str:
        """File stem, e.g. ``lung_w1500_l-600``."""
        return f"{self.name}_w{_num(self.width)}_l{_num(self.level)}"

    @property
    def filename(self) -> str:
        """File name, e.g. ``lung_w1500_l-600.npy``."""
        return self.stem + ".npy"

    def to_dict(self) -> dict:
        return {"name": self.name, "width": self.width, "level": self.level}

    def same_as(self, other: "WindowSpec") -> bool:
        """Same width and level (within 1e-6 HU), whatever the names."""
        return abs(self.width - other.width) < 1e-6 and abs(self.level - other.level) < 1e-6


def parse_window(window: str | WindowSpec | Sequence | Mapping) -> WindowSpec:
    """The one parser of windows: user text, config values and objects -> :class:`WindowSpec`.

    Args:
        window: a preset name ("lung" | "bone" | "soft_tissue" | "brain"), "name:width:level" (e.g.
            "liver:150:60"), a WindowSpec or an object with ``width`` and ``level`` (and ``name``),
            (name, width, level), (width, level), {"name", "width", "level"} (name optional) or
            {"name": preset}.

    Raises:
        ValueError: unknown preset or malformed custom window (message lists the accepted forms).
    """
    if isinstance(window, WindowSpec):
        return window
    try:
        if hasattr(window, "width") and hasattr(window, "level"):
            return WindowSpec(str(getattr(window, "name", "custom")), float(window.width), float(window.level))
        if isinstance(window, Mapping):
            if "width" in window and "level" in window:
                return WindowSpec(str(window.get("name", "custom")), float(window["width"]), float(window["level"]))
            if "name" in window:
                return parse_window(window["name"])
        if isinstance(window, (tuple, list)) and len(window) in (2, 3):
            name, width, level = ("custom", *window) if len(window) == 2 else window
            return WindowSpec(str(name), float(width), float(level))
        if isinstance(window, str):
            text = window.strip()
            if text in WINDOW_PRESETS:
                return WindowSpec(text, *WINDOW_PRESETS[text])
            parts = text.split(":")
            if len(parts) == 3:
                return WindowSpec(parts[0], float(parts[1]), float(parts[2]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"window {window!r}: {e}") from None
    raise ValueError(
        f"window {window!r} not understood; use a preset {sorted(WINDOW_PRESETS)} or 'name:width:level'"
    )


def _as_float(img):
    if isinstance(img, np.ndarray):
        return img.astype(np.float32, copy=False)
    if not img.is_floating_point():
        return img.float()
    return img


def _scale_shift(img, scale: float, shift: float, clip: bool, out=None):
    """img * scale + shift as float32 (a new tensor or array), clipped to [0, 1] when ``clip``;
    with ``out`` (a tensor), written into it instead (:func:`_scale_shift_into`)."""
    if out is not None:
        return _scale_shift_into(img, out, scale, shift, clip)
    x = _as_float(img)
    if isinstance(x, np.ndarray):
        out = x * np.float32(scale)
        out += np.float32(shift)
        return np.clip(out, 0.0, 1.0, out=out) if clip else out
    out = x.mul(scale).add_(shift)
    return out.clamp_(0.0, 1.0) if clip else out


def _scale_shift_into(x: torch.Tensor, out: torch.Tensor, scale: float, shift: float, clip: bool) -> torch.Tensor:
    """The fast path of a whole volume into a buffer of another dtype (e.g. float16 for the guide
    layout): slabs of a few slices along the slowest memory axis (``x`` and ``out`` share one
    memory layout, C or Fortran), so the float32 temporary stays in cache."""
    ax = int(np.argmax(x.stride()))
    n = x.shape[ax]
    step = max(1, _SLAB_VOXELS // max(1, x.numel() // n))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory-bound: one thread is as fast, and immune to OpenMP stalls on a busy CPU
    try:
        for s in range(0, n, step):
            k = min(step, n - s)
            out.narrow(ax, s, k).copy_(_scale_shift(x.narrow(ax, s, k), scale, shift, clip))
    finally:
        torch.set_num_threads(threads)
    return out


def apply_window(img, width: float, level: float, out=None):
    """clip((HU - (L - W/2)) / W, 0, 1) as float32 (tensor or array, metadata kept), or into the
    tensor ``out`` (any dtype)."""
    lo = float(level) - float(width) / 2.0
    return _scale_shift(img, 1.0 / float(width), -lo / float(width), clip=True, out=out)


def window_to_hu(values, width: float, level: float):
    """Inverse of :func:`apply_window` inside the window: ``level - width / 2 + v * width`` HU.

    Args:
        values: window values (numpy array, torch tensor or float).
        width: window width in HU.
        level: window level (centre) in HU.
    """
    return (float(level) - float(width) / 2.0) + values * float(width)


def normalize_hu(img, hu_min: float = HU_MIN, hu_max: float = HU_MAX, clip: bool = True, out=None):
    """(HU - hu_min) / (hu_max - hu_min), clipped to [0, 1] when ``clip``, or into the tensor ``out``."""
    scale = 1.0 / (float(hu_max) - float(hu_min))
    return _scale_shift(img, scale, -float(hu_min) * scale, clip, out=out)


def denormalize_hu(x, hu_min: float = HU_MIN, hu_max: float = HU_MAX):
    """Inverse of :func:`normalize_hu`: x * (hu_max - hu_min) + hu_min (float32)."""
    x = _as_float(x)
    if isinstance(x, np.ndarray):
        out = x * np.float32(hu_max - hu_min)
        out += np.float32(hu_min)
        return out
    return x.mul(float(hu_max) - float(hu_min)).add_(float(hu_min))


class ClipHU(Transform):
    """Clips HU values: below ``hu_min`` (e.g. -1500/-2048 padding) to ``hu_min``, optionally above ``hu_max``.

    Args:
        hu_min: lower bound (-1024, air).
        hu_max: optional upper bound (None: no upper clip).
    """

    def __init__(self, hu_min: float = HU_MIN, hu_max: float | None = None):
        self.hu_min = hu_min
        self.hu_max = hu_max

    def __call__(self, img):
        x = _as_float(img)
        if isinstance(x, np.ndarray):
            return np.clip(x, self.hu_min, self.hu_max if self.hu_max is not None else np.inf)
        return x.clamp(min=self.hu_min, max=self.hu_max)


class Window(Transform):
    """Maps HU to a display window in [0, 1]: clip((HU - (L - W/2)) / W, 0, 1), float32.

    Args:
        window: preset name ("lung", "bone", "soft_tissue", "brain"), "name:W:L", or a WindowSpec.
        width: custom width (with ``level``; overrides ``window``).
        level: custom level.
    """

    def __init__(self, window: str | WindowSpec | None = "soft_tissue", width: float | None = None,
                 level: float | None = None):
        if width is not None or level is not None:
            if width is None or level is None:
                raise ValueError("give both width and level for a custom window")
            name = window if isinstance(window, str) and window not in WINDOW_PRESETS else "custom"
            self.spec = WindowSpec(name or "custom", width, level)
        else:
            self.spec = parse_window(window)

    def __call__(self, img):
        out = apply_window(img, self.spec.width, self.spec.level)
        if isinstance(out, MetaTensor):
            out.meta = {**out.meta, "window": self.spec.to_dict()}
        return out


class NormalizeHU(Transform):
    """Maps HU to [0, 1]: (HU - hu_min) / (hu_max - hu_min); ``inverse`` maps back.

    Args:
        hu_min: HU mapped to 0 (-1024).
        hu_max: HU mapped to 1 (3071).
        clip: clip the result to [0, 1].
    """

    def __init__(self, hu_min: float = HU_MIN, hu_max: float = HU_MAX, clip: bool = True):
        if not hu_max > hu_min:
            raise ValueError(f"hu_max ({hu_max}) must be above hu_min ({hu_min})")
        self.hu_min, self.hu_max, self.clip = hu_min, hu_max, clip

    def __call__(self, img):
        return normalize_hu(img, self.hu_min, self.hu_max, self.clip)

    def inverse(self, x):
        """Maps normalised values back to HU."""
        return denormalize_hu(x, self.hu_min, self.hu_max)


class _KeyedIntensity(MapTransform):
    def __init__(self, keys: KeysCollection, transform, output_keys: KeysCollection | None = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = transform
        if output_keys is None:
            self.output_keys = list(self.keys)
        else:
            self.output_keys = [output_keys] if isinstance(output_keys, (str, int)) else list(output_keys)
            if len(self.output_keys) != len(self.keys):
                raise ValueError(f"output_keys {self.output_keys} must match keys {list(self.keys)} one to one")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.transform(d[key])
        return d


class ClipHUd(_KeyedIntensity):
    """Dictionary form of :class:`ClipHU`.

    Args:
        keys: keys to clip.
        hu_min: lower bound.
        hu_max: optional upper bound.
        output_keys: write results here instead of overwriting ``keys``.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, hu_min: float = HU_MIN, hu_max: float | None = None,
                 output_keys: KeysCollection | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, ClipHU(hu_min, hu_max), output_keys, allow_missing_keys)


class Windowd(_KeyedIntensity):
    """Dictionary form of :class:`Window`.

    Args:
        keys: keys holding HU volumes.
        window: preset name, "name:W:L" or WindowSpec.
        width: custom width (with ``level``).
        level: custom level.
        output_keys: write windows here (e.g. "lung") instead of overwriting ``keys``.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, window: str | WindowSpec | None = "soft_tissue",
                 width: float | None = None, level: float | None = None,
                 output_keys: KeysCollection | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, Window(window, width, level), output_keys, allow_missing_keys)


class NormalizeHUd(_KeyedIntensity):
    """Dictionary form of :class:`NormalizeHU` (``inverse`` maps the keys back to HU).

    Args:
        keys: keys holding HU volumes.
        hu_min: HU mapped to 0.
        hu_max: HU mapped to 1.
        clip: clip to [0, 1].
        output_keys: write results here instead of overwriting ``keys``.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, hu_min: float = HU_MIN, hu_max: float = HU_MAX, clip: bool = True,
                 output_keys: KeysCollection | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, NormalizeHU(hu_min, hu_max, clip), output_keys, allow_missing_keys)

    def inverse(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.transform.inverse(d[out_key])
        return d

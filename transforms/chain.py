"""The one preprocessing chain, shared by ``./run.sh preprocess``, inference and the benchmarks.

A scan (path) is loaded in HU, oriented to RAS, resampled into the isotropic R^3 cube (air
padding) and its body mask computed (:func:`cube_transforms`, one transform per step of
:data:`CUBE_STEPS`). Preprocessing then stores the clipped whole HU; the model's input adds the
HU clip, the window and the sparse support (:class:`CTModelInputd`).
"""

from __future__ import annotations

from collections.abc import Mapping

from monai.transforms import Compose, MapTransform, Orientationd

from .geometry import ResampleToCubed
from .intensity import HU_MIN, ClipHUd, WindowSpec, Windowd
from .io import LoadCTd
from .mask import BodyMaskd
from .sparse import Sparsifyd

__all__ = ["CUBE_STEPS", "RAS_LABELS", "cube_transforms", "CTModelInputd"]

#: Names of the steps of :func:`cube_transforms`, in order (preprocessing times each one).
CUBE_STEPS = ("load", "orient", "resample", "body_mask")
#: Orientation labels spelt out: the same RAS as MONAI's default, without its FutureWarning.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def cube_transforms(keys: str = "image", resolution: int = 512, hu_min: float = HU_MIN,
                    series_uid: str | None = None) -> list[MapTransform]:
    """Scan path under ``keys`` -> HU cube (1, R, R, R) there and its body mask under ``"body_mask"``.

    Args:
        keys: the key holding the scan path.
        resolution: cube side R.
        hu_min: HU of the padding (air).
        series_uid: SeriesInstanceUID to pick in a folder of several series.
    """
    return [
        LoadCTd(keys, series_uid=series_uid),
        Orientationd(keys, axcodes="RAS", labels=RAS_LABELS),
        ResampleToCubed(keys, resolution=int(resolution), padding_value=hu_min),
        BodyMaskd(keys, output_keys="body_mask"),
    ]


class CTModelInputd(Compose):
    """Scan path under ``"image"`` -> the model's input: window values (1, R, R, R) under ``"image"``
    (meta: ``cube_affine``, ``source_affine``, ``source_shape``, ``original_affine``,
    ``original_shape``), ``"body_mask"``, and the support (body mask and window > 0) as
    ``"coords"`` [N, 3] and ``"feats"`` [N, 1].

    Args:
        window: the model's window (anything ``transforms.parse_window`` takes).
        resolution: cube side R.
    """

    def __init__(self, window: str | WindowSpec | Mapping, resolution: int = 512):
        super().__init__(cube_transforms("image", resolution) + [
            ClipHUd("image"),
            Windowd("image", window=window),
            Sparsifyd("image", mask_key="body_mask"),
        ])

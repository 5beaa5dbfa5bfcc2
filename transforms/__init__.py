"""MONAI transforms for CT: loading, RAS world-space cube resampling, HU windows, body mask, sparse form.

Every transform has an array form and a dictionary (``...d``) form and can be used on its own::

    from transforms import LoadCTd, ResampleToCubed, ClipHUd, Windowd, BodyMaskd, Sparsifyd
"""

from monai.transforms import Orientation, Orientationd

from .chain import CUBE_STEPS, CTModelInputd, cube_transforms
from .geometry import (
    ResampleToCube,
    ResampleToCubed,
    cube_affine_for,
    resample_to_grid,
    resample_to_source,
    voxel_to_world,
    world_to_voxel,
)
from .intensity import (
    HU_MAX,
    HU_MIN,
    WINDOW_PRESETS,
    ClipHU,
    ClipHUd,
    NormalizeHU,
    NormalizeHUd,
    Window,
    Windowd,
    WindowSpec,
    apply_window,
    denormalize_hu,
    normalize_hu,
    parse_window,
    window_to_hu,
)
from .dicom import find_dicom_series
from .io import LoadCT, LoadCTd, load_ct
from .load_errors import CTLoadError
from .mask import BodyMask, BodyMaskd, body_bbox, body_mask
from .sparse import (
    Densify,
    Densifyd,
    RandSparseCrop,
    RandSparseCropd,
    Sparsify,
    Sparsifyd,
    block_counts,
    choose_crop_box,
    crop_tables,
    support_box,
    support_mask,
)

__all__ = [
    "CTLoadError", "LoadCT", "LoadCTd", "load_ct", "find_dicom_series",
    "Orientation", "Orientationd",
    "ResampleToCube", "ResampleToCubed", "cube_affine_for", "resample_to_grid", "resample_to_source",
    "voxel_to_world", "world_to_voxel",
    "HU_MIN", "HU_MAX", "WINDOW_PRESETS", "WindowSpec", "parse_window", "ClipHU", "ClipHUd", "Window", "Windowd",
    "NormalizeHU", "NormalizeHUd", "apply_window", "window_to_hu", "normalize_hu", "denormalize_hu",
    "BodyMask", "BodyMaskd", "body_mask", "body_bbox",
    "Sparsify", "Sparsifyd", "Densify", "Densifyd", "RandSparseCrop", "RandSparseCropd", "block_counts",
    "choose_crop_box", "crop_tables", "support_box", "support_mask",
    "CUBE_STEPS", "cube_transforms", "CTModelInputd",
]

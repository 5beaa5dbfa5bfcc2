"""Reconstruction metrics for windowed CT volumes.

All functions take a prediction and a target as numpy arrays or torch tensors of shape
(X, Y, Z) or (1, X, Y, Z), with window values in [0, 1], and an optional boolean mask of the
same spatial shape (the body mask). HU metrics map window values back to HU with
``HU = level - width / 2 + v * width`` (the inverse of ``transforms.Window`` inside the window).

SSIM follows ``monai.metrics.SSIMMetric`` (Gaussian kernel 11, sigma 1.5, k1 0.01, k2 0.03,
valid convolution) but runs as separable 1D convolutions slab by slab, so a whole 512^3 volume
fits in a few hundred MB; it can also average the SSIM map inside a mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from transforms import parse_window

__all__ = [
    "psnr",
    "ssim3d",
    "mae_rmse_hu",
    "organ_mae_hu",
    "normalize_organ_mapping",
    "codebook_usage",
    "volume_metrics",
]


def _as_tensor(x: Any, device: torch.device | None = None, dtype=torch.float32) -> torch.Tensor:
    """Array-like -> 3D torch tensor (channel axis of size 1 dropped)."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        a = np.asarray(x)
        if not a.flags.writeable:  # memory-mapped or read-only arrays: torch needs a writable buffer
            a = np.array(a, dtype=np.float32 if dtype.is_floating_point and a.dtype.kind == "f" else a.dtype)
        t = torch.as_tensor(a)
    t = t.as_tensor() if hasattr(t, "as_tensor") else t  # MetaTensor -> Tensor
    if t.ndim == 5 and t.shape[0] == 1 and t.shape[1] == 1:
        t = t[0, 0]
    elif t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise ValueError(f"expected a volume of shape (X, Y, Z) or (1, X, Y, Z), got {tuple(t.shape)}")
    if device is not None:
        t = t.to(device)
    return t.to(dtype)


def _pair(pred: Any, target: Any, mask: Any | None):
    p = _as_tensor(pred)
    t = _as_tensor(target, device=p.device)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
    m = None
    if mask is not None:
        m = _as_tensor(mask, device=p.device, dtype=torch.bool)
        if m.shape != p.shape:
            raise ValueError(f"mask shape {tuple(m.shape)} != volume shape {tuple(p.shape)}")
    return p, t, m


def psnr(pred: Any, target: Any, mask: Any | None = None, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, over the mask when given.

    Args:
        pred: reconstruction (X, Y, Z) or (1, X, Y, Z).
        target: reference of the same shape.
        mask: optional boolean mask; an empty mask gives NaN.
        data_range: peak value range (1.0 for window values).
    """
    p, t, m = _pair(pred, target, mask)
    d = p - t
    if m is not None:
        if not bool(m.any()):
            return float("nan")
        d = d[m]
    mse = float((d * d).sum(dtype=torch.float64)) / max(1, d.numel())
    if mse <= 0.0:
        return float("inf")
    return 10.0 * math.log10(data_range**2 / mse)


def _gauss_1d(kernel_size: int, sigma: float) -> torch.Tensor:
    dist = torch.arange(start=(1 - kernel_size) / 2, end=(1 + kernel_size) / 2, step=1)
    g = torch.exp(-torch.pow(dist / sigma, 2) / 2)
    return g / g.sum()


def _filter_valid(x: torch.Tensor, k1d: torch.Tensor) -> torch.Tensor:
    """Separable valid filtering of a (C, X, Y, Z) tensor along the three spatial axes."""
    k = k1d.numel()
    c = x.shape[0]
    x = x.unsqueeze(0)  # (1, C, X, Y, Z)
    w = k1d.to(x)
    x = F.conv3d(x, w.view(1, 1, k, 1, 1).expand(c, 1, k, 1, 1), groups=c)
    x = F.conv3d(x, w.view(1, 1, 1, k, 1).expand(c, 1, 1, k, 1), groups=c)
    x = F.conv3d(x, w.view(1, 1, 1, 1, k).expand(c, 1, 1, 1, k), groups=c)
    return x[0]


def ssim3d(
    pred: Any,
    target: Any,
    mask: Any | None = None,
    data_range: float = 1.0,
    kernel_size: int = 11,
    kernel_sigma: float = 1.5,
    kernel_type: str = "gaussian",
    k1: float = 0.01,
    k2: float = 0.03,
    slab: int = 32,
) -> float:
    """Mean 3D SSIM, as ``monai.metrics.SSIMMetric(spatial_dims=3)``, optionally inside a mask.

    The SSIM map is computed on the valid region (no padding, like MONAI), whose voxel (r, s, t)
    is centred on input voxel (r + h, s + h, t + h), h = kernel_size // 2; with a mask, the
    mean is over map voxels whose centre lies in the mask.

    Args:
        pred: reconstruction (X, Y, Z) or (1, X, Y, Z), window values.
        target: reference of the same shape.
        mask: optional boolean mask of the same shape; an empty mask gives NaN.
        data_range: value range of the images.
        kernel_size: odd window size (every side must be at least this long).
        kernel_sigma: Gaussian standard deviation.
        kernel_type: "gaussian" or "uniform".
        k1: luminance stability constant.
        k2: contrast stability constant.
        slab: output slices along the first axis computed at once (bounds memory).
    """
    p, t, m = _pair(pred, target, mask)
    return _ssim_means(p, t, m, data_range, kernel_size, kernel_sigma, kernel_type, k1, k2, slab)[1 if m is not None else 0]


def _ssim_means(p: torch.Tensor, t: torch.Tensor, m: torch.Tensor | None, data_range: float = 1.0,
                kernel_size: int = 11, kernel_sigma: float = 1.5, kernel_type: str = "gaussian",
                k1: float = 0.01, k2: float = 0.03, slab: int = 32) -> tuple[float, float]:
    """(mean SSIM over the whole map, mean inside ``m`` or NaN) from one pass over the volumes."""
    if kernel_size % 2 != 1:
        raise ValueError(f"ssim3d kernel_size must be odd, got {kernel_size}")
    if min(p.shape) < kernel_size:
        raise ValueError(f"ssim3d needs every side >= kernel_size={kernel_size}, got shape {tuple(p.shape)}")
    if kernel_type == "gaussian":
        k1d = _gauss_1d(kernel_size, kernel_sigma)
    elif kernel_type == "uniform":
        k1d = torch.full((kernel_size,), 1.0 / kernel_size)
    else:
        raise ValueError(f"ssim3d kernel_type must be 'gaussian' or 'uniform', got {kernel_type!r}")
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    h = kernel_size // 2
    nx = p.shape[0] - kernel_size + 1
    total, count, total_m, count_m = 0.0, 0, 0.0, 0
    for a in range(0, nx, max(1, slab)):
        b = min(nx, a + slab)
        x = p[a : b + kernel_size - 1]
        y = t[a : b + kernel_size - 1]
        mu = _filter_valid(torch.stack([x, y, x * x, y * y, x * y]), k1d)
        mu_x, mu_y, mu_xx, mu_yy, mu_xy = mu
        sigma_x = mu_xx - mu_x * mu_x
        sigma_y = mu_yy - mu_y * mu_y
        sigma_xy = mu_xy - mu_x * mu_y
        cs = (2 * sigma_xy + c2) / (sigma_x + sigma_y + c2)
        smap = ((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * cs
        total += float(smap.double().sum())
        count += smap.numel()
        if m is not None:
            mm = m[a + h : b + h, h : m.shape[1] - h, h : m.shape[2] - h]
            total_m += float(smap[mm].double().sum())
            count_m += int(mm.sum())
    return total / count if count else float("nan"), total_m / count_m if count_m else float("nan")


def mae_rmse_hu(pred: Any, target: Any, window: Any, mask: Any | None = None) -> tuple[float, float]:
    """Mean absolute error and root mean square error in HU (inside the window's HU range).

    Both volumes are window values, so the HU error is ``width`` times the window error;
    values outside the window were clipped by preprocessing and are compared clipped.

    Args:
        pred: reconstruction, window values.
        target: reference, window values.
        window: WindowSpec, {"width", "level"} mapping or (width, level).
        mask: optional boolean mask (the body); an empty mask gives NaN.
    """
    width = parse_window(window).width
    p, t, m = _pair(pred, target, mask)
    d = p - t
    if m is not None:
        if not bool(m.any()):
            return float("nan"), float("nan")
        d = d[m]
    n = max(1, d.numel())
    mae = float(d.abs().sum(dtype=torch.float64)) / n * width
    rmse = math.sqrt(float((d * d).sum(dtype=torch.float64)) / n) * width
    return mae, rmse


def normalize_organ_mapping(mapping: Mapping | None) -> dict[int, str]:
    """Organ mapping in either direction ({name: id} or {id: name}) -> {id: name}.

    Args:
        mapping: the dataset's ``organ_mapping`` (ids may be strings); None gives {}.
    """
    out: dict[int, str] = {}
    for k, v in (mapping or {}).items():
        if isinstance(v, Mapping):  # {"liver": {"id": 5, ...}}
            v = v.get("id", v.get("label"))
        if isinstance(k, int) or (isinstance(k, str) and k.lstrip("-").isdigit()):
            out[int(k)] = str(v)
        elif isinstance(v, (int, np.integer)) or (isinstance(v, str) and v.lstrip("-").isdigit()):
            out[int(v)] = str(k)
    return out


def organ_mae_hu(
    pred: Any,
    target: Any,
    labels: Any,
    window: Any,
    organ_mapping: Mapping | None = None,
    mask: Any | None = None,
) -> dict[str, float]:
    """MAE in HU per organ label (label 0 is background and skipped).

    Args:
        pred: reconstruction, window values.
        target: reference, window values.
        labels: integer label map of the same shape.
        window: WindowSpec, {"width", "level"} mapping or (width, level).
        organ_mapping: {name: id} or {id: name}; labels without a name are called "label_<id>".
        mask: optional boolean mask to intersect with each organ.
    """
    width = parse_window(window).width
    p, t, m = _pair(pred, target, mask)
    lab = _as_tensor(labels, device=p.device, dtype=torch.int32)
    if lab.shape != p.shape:
        raise ValueError(f"labels shape {tuple(lab.shape)} != volume shape {tuple(p.shape)}")
    names = normalize_organ_mapping(organ_mapping)
    err = (p - t).abs().flatten()
    flat = lab.flatten()
    if m is not None:
        keep = m.flatten()
        err, flat = err[keep], flat[keep]
    n = int(flat.max()) + 1 if flat.numel() else 0
    if n <= 1:
        return {}
    if flat.min() < 0:
        raise ValueError(f"labels must be >= 0, got {int(flat.min())}")
    sums = torch.from_numpy(np.bincount(flat.cpu().numpy(), weights=err.cpu().numpy(), minlength=n))
    counts = torch.bincount(flat, minlength=n).cpu()
    out = {}
    for i in range(1, n):
        if int(counts[i]) > 0:
            out[names.get(i, f"label_{i}")] = float(sums[i] / counts[i]) * width
    return out


def codebook_usage(indices: Any, num_embeddings: int) -> dict[str, float]:
    """Codebook usage of a set of code indices.

    Args:
        indices: code indices (any shape, or a list of arrays, one per scan).
        num_embeddings: codebook size K.

    Returns:
        {"codes_used", "usage" (codes_used / K), "perplexity" (exp of the code entropy), "tokens"}.
    """
    if isinstance(indices, (list, tuple)):
        parts = [np.asarray(torch.as_tensor(i).cpu()).ravel() for i in indices]
        idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    else:
        idx = np.asarray(torch.as_tensor(indices).cpu()).ravel()
    if idx.size == 0:
        return {"codes_used": 0, "usage": 0.0, "perplexity": 0.0, "tokens": 0}
    if idx.min() < 0 or idx.max() >= num_embeddings:
        raise ValueError(f"code indices must lie in [0, {num_embeddings}), got [{idx.min()}, {idx.max()}]")
    counts = np.bincount(idx.astype(np.int64), minlength=num_embeddings).astype(np.float64)
    prob = counts / counts.sum()
    nz = prob[prob > 0]
    perplexity = float(np.exp(-(nz * np.log(nz)).sum()))
    used = int((counts > 0).sum())
    return {"codes_used": used, "usage": used / num_embeddings, "perplexity": perplexity, "tokens": int(idx.size)}


def volume_metrics(
    pred: Any,
    target: Any,
    window: Any,
    body_mask: Any | None = None,
    labels: Any | None = None,
    organ_mapping: Mapping | None = None,
    ssim: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """All reconstruction metrics of one volume, as used by validation and evaluation.

    Args:
        pred: reconstruction, window values in [0, 1].
        target: reference, window values in [0, 1].
        window: WindowSpec, {"width", "level"} mapping or (width, level).
        body_mask: boolean body mask; body metrics are NaN without it.
        labels: optional organ label map (adds "organ_mae_hu").
        organ_mapping: optional {name: id} or {id: name}.
        ssim: compute the SSIM values (the slowest part).
        device: where to compute (e.g. "cuda"; a 512^3 volume takes about 40 s on two CPU
            cores); default: where ``pred`` is.

    Returns:
        {"psnr", "psnr_body", "ssim", "ssim_body", "mae_hu_body", "rmse_hu_body"[, "organ_mae_hu"]}.
    """
    if device is not None:
        pred = _as_tensor(pred, torch.device(device))
    pred, target, body_mask = _pair(pred, target, body_mask)
    out: dict[str, Any] = {"psnr": psnr(pred, target)}
    out["psnr_body"] = psnr(pred, target, body_mask) if body_mask is not None else float("nan")
    if ssim:
        out["ssim"], out["ssim_body"] = _ssim_means(pred, target, body_mask)
    if body_mask is not None:
        out["mae_hu_body"], out["rmse_hu_body"] = mae_rmse_hu(pred, target, window, body_mask)
    else:
        out["mae_hu_body"], out["rmse_hu_body"] = float("nan"), float("nan")
    if labels is not None:
        out["organ_mae_hu"] = organ_mae_hu(pred, target, labels, window, organ_mapping, body_mask)
    return out

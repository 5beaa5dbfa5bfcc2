"""Load weights into :class:`~networks.vqvae.SparseVQVAE`: our checkpoints or the Direct3D-S2 sparse VAE.

Accepted inputs (a path or an already loaded dict):

- our checkpoints: a plain ``state_dict``, or a dict holding it under ``"model"`` or
  ``"state_dict"`` (a DDP ``module.`` prefix is stripped);
- the Direct3D-S2 ``sparse_vae_512`` checkpoint ``{"vae": state_dict}`` (torchsparse layout,
  keys ``encoder.*`` / ``decoder.*``).

Direct3D-S2 mapping. Module names match ours up to the ``encoder``/``decoder`` ->
``Encoder``/``Decoder`` prefix. torchsparse 3^3 kernels ``*.conv.kernel`` [27, Cin, Cout] become
spconv weights ``*.conv.weight`` [Cout, 3, 3, 3, Cin] (KRSC). The kernel-offset order comes from
torchsparse's ``get_kernel_offsets``: for an odd kernel the offsets are listed
``[[x, y, z] for z in r for y in r for x in r]`` with ``r = (-1, 0, 1)``, i.e. the first spatial
coordinate column varies fastest: ``k = 9 (dz + 1) + 3 (dy + 1) + (dx + 1)``; the kernel map
sends input ``p + offset_k`` to output ``p`` (cross-correlation, the same convention as spconv
and ``conv3d``). Hence ``W[o, dx+1, dy+1, dz+1, i] = K[9 (dz+1) + 3 (dy+1) + (dx+1), i, o]``.
1x1 skip convs (``[Cin, Cout]``) become our ``nn.Linear`` weights ([Cout, Cin]). The VAE
encoder ends in ``out_layer`` [2 L, C] (mean then log-variance); when ``L == latent_channels``
the mean half is kept, otherwise ``Encoder.out_layer`` and ``Decoder.input_layer`` stay newly
initialised and the report lists them. The quantizer is never in a VAE checkpoint.

Norms: the original uses per-sample GroupNorm(32); its affine weights load into our norms
whatever their mode. Build the model with ``norm="group"`` to reproduce the original exactly;
the default per-voxel norm changes the statistics (fine-tuning adapts to it).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch
import torch.nn as nn

__all__ = ["load_pretrained", "convert_direct3d_s2", "torchsparse_kernel_to_spconv", "spconv_weight_to_torchsparse"]

logger = logging.getLogger(__name__)


def torchsparse_kernel_to_spconv(kernel: torch.Tensor) -> torch.Tensor:
    """torchsparse 3^3 kernel [27, Cin, Cout] -> spconv KRSC weight [Cout, 3, 3, 3, Cin] (see module doc)."""
    if kernel.dim() != 3 or kernel.shape[0] != 27:
        raise ValueError(f"expected a torchsparse 3x3x3 kernel [27, Cin, Cout], got {tuple(kernel.shape)}.")
    cin, cout = kernel.shape[1:]
    # k = 9*(dz+1) + 3*(dy+1) + (dx+1)  ->  view [dz, dy, dx, Cin, Cout]
    return kernel.reshape(3, 3, 3, cin, cout).permute(4, 2, 1, 0, 3).contiguous()


def spconv_weight_to_torchsparse(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`torchsparse_kernel_to_spconv`."""
    cout, _, _, _, cin = weight.shape
    return weight.permute(3, 2, 1, 4, 0).reshape(27, cin, cout).contiguous()


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return dict(sd)


def convert_direct3d_s2(vae_sd: Mapping[str, torch.Tensor], model: nn.Module) -> tuple[dict, dict]:
    """Map a Direct3D-S2 VAE state dict onto ``model``'s names and layouts.

    Returns:
        (state dict for ``model``, notes) where notes holds ``reinitialized`` (model keys left
        new because the latent size differs) and ``skipped`` (source keys without a target).
    """
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    skipped, reinit = [], []
    src = _strip(_strip(vae_sd, "module."), "vae.")
    lat_src = None
    if "encoder.out_layer.weight" in src:
        lat_src = src["encoder.out_layer.weight"].shape[0] // 2
    for key, val in src.items():
        if key.startswith("encoder."):
            name = "Encoder." + key[len("encoder.") :]
        elif key.startswith("decoder."):
            name = "Decoder." + key[len("decoder.") :]
        else:
            skipped.append(key)
            continue
        if name.endswith(".conv.kernel"):
            base = name[: -len(".conv.kernel")]
            if val.dim() == 3 and val.shape[0] == 27:
                name, val = base + ".conv.weight", torchsparse_kernel_to_spconv(val)
            else:  # 1x1 conv: [Cin, Cout] or [1, Cin, Cout] -> Linear [Cout, Cin]
                name, val = base + ".weight", val.reshape(val.shape[-2], val.shape[-1]).t().contiguous()
        elif name.endswith(".conv.bias"):
            base = name[: -len(".conv.bias")]
            name = base + ".conv.bias" if base + ".conv.bias" in target else base + ".bias"
        if name.startswith("Encoder.out_layer.") and lat_src is not None:
            if lat_src == getattr(model, "latent_channels", lat_src):
                val = val[:lat_src]  # mean half of (mean, logvar)
            else:
                reinit.append(name)
                continue
        if name.startswith("Decoder.input_layer.weight") and val.shape[1] != target.get(name, val).shape[-1]:
            reinit.append(name)
            reinit.append("Decoder.input_layer.bias")
            continue
        if name not in target:
            skipped.append(key)
            continue
        if target[name].shape != val.shape:
            skipped.append(f"{key} {tuple(val.shape)} vs {name} {tuple(target[name].shape)}")
            continue
        out[name] = val.to(target[name].dtype)
    for name in list(reinit):
        out.pop(name, None)
    return out, {"reinitialized": sorted(set(reinit)), "skipped": skipped}


def _load_file(path: str | os.PathLike) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"pretrained weights not found: {path}; check `pretrained_vae_path`.") from None
    except Exception as e:  # pickled objects beyond tensors and containers
        raise ValueError(f"cannot load {path} as weights only ({e}); re-save it as a plain state dict.") from e


def load_pretrained(model: nn.Module, path_or_state: str | os.PathLike | Mapping, strict: bool = False) -> dict:
    """Load our checkpoint or a Direct3D-S2 VAE into ``model``.

    Args:
        model: a :class:`~networks.vqvae.SparseVQVAE`.
        path_or_state: file path or loaded checkpoint dict.
        strict: raise when a model key stays unloaded (our checkpoints only).

    Returns:
        report ``{"format", "loaded", "missing", "unexpected", "reinitialized", "skipped", "zero_init"}``
        (lists of keys; ``loaded`` is a count). For Direct3D-S2 weights ``missing`` lists the
        model keys without a source other than ``vq.*`` and the zero-initialised child position
        embeddings (``zero_init``: they leave the original's behaviour unchanged); ``reinitialized``
        the layers left new because the latent size differs.
    """
    ckpt = path_or_state if isinstance(path_or_state, Mapping) else _load_file(path_or_state)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint {path_or_state!r} is a {type(ckpt).__name__}, not a state dict; pass a state dict file.")
    if "vae" in ckpt and isinstance(ckpt["vae"], Mapping):
        fmt, sd = "direct3d_s2", ckpt["vae"]
    else:
        sd = ckpt
        for k in ("model", "state_dict"):
            if k in ckpt and isinstance(ckpt[k], Mapping):
                sd = ckpt[k]
                break
        sd = _strip(sd, "module.")
        is_d3d = any(k.startswith("encoder.") or k.startswith("decoder.") for k in sd) and not any(
            k.startswith("Encoder.") for k in sd
        )
        fmt = "direct3d_s2" if is_d3d else "ctvq"
    notes = {"reinitialized": [], "skipped": []}
    if fmt == "direct3d_s2":
        if getattr(model, "layout", "direct3d") != "direct3d":
            raise ValueError(f"{path_or_state if not isinstance(path_or_state, Mapping) else 'checkpoint'} holds Direct3D-S2 "
                             "weights, which fit only the Direct3D-S2 layout; set network_def#layout to \"direct3d\" "
                             "(and its channels, e.g. [32, 64, 128, 512]).")
        sd, notes = convert_direct3d_s2(sd, model)
        if notes["reinitialized"]:
            logger.warning("pretrained latent size differs: newly initialised %s", ", ".join(notes["reinitialized"]))
        if getattr(model, "norm", "group") != "group":
            logger.info("Direct3D-S2 weights use per-sample GroupNorm; this model uses norm=%r", model.norm)
    else:
        target = model.state_dict()
        bad = [k for k, v in sd.items() if k in target and target[k].shape != v.shape]
        notes["skipped"] = [f"{k} {tuple(sd[k].shape)} vs {tuple(target[k].shape)}" for k in bad]
        sd = {k: v for k, v in sd.items() if k not in bad}
    result = model.load_state_dict(sd, strict=False)
    missing = list(result.missing_keys)
    zero_init = []
    if fmt == "direct3d_s2":
        # our zero-initialised additions behave exactly like the original without them:
        # not "missing" (a stage-1 run keeps them frozen with the rest of the VAE)
        zero_init = [k for k in missing if k.endswith("child_embedding")]
        missing = [k for k in missing if k not in zero_init]
    if fmt == "ctvq" and strict and (missing or notes["skipped"]):
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, mismatched {notes['skipped'][:5]}; check the model config.")
    report = {
        "format": fmt,
        "loaded": len(sd),
        "missing": missing,
        "unexpected": list(result.unexpected_keys),
        "reinitialized": notes["reinitialized"],
        "skipped": notes["skipped"],
        "zero_init": zero_init,
    }
    # debug: the caller reports the load once it has checked the fit (a refusal follows otherwise)
    logger.debug("loaded %d tensors (%s); %d missing, %d skipped", len(sd), fmt, len(missing), len(notes["skipped"]))
    return report

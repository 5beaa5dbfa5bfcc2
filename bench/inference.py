"""Whole-scan encode and decode: the sparse VQ-VAE (tiled, as shipped) against MAISI's autoencoder
with MONAI's sliding-window inference.

ctvq: ``model.Encode(x, tile=T)`` on the scan's support (body mask & window > 0), then
``model.Decode(tokens, tile=T)``. MAISI: ``SlidingWindowInferer`` over the dense scan for the
encoder (image ROI) and over its latent for the decoder (latent ROI, as MAISI decodes), Gaussian
blending, one window per batch.

    python bench/inference.py --case processed_dataset/<name>/processed/<case_id>
    python bench/inference.py --small --device cpu      # smoke run, tiny models

Weights are random: timing and memory do not depend on them (the tokens do, a little, through
which codes are chosen).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common as C  # noqa: E402
from bench.scan import Crop, add_scan_args, load_scan_and_budget, only_on_device, sparse_input, whole_scan  # noqa: E402
from bench.timing import Budget, measure, run_guarded  # noqa: E402

MODELS = ("ours", "maisi-ae")
COLUMNS = [
    ("model", "model"), ("op", "op"), ("how", "tiling"), ("precision", "precision"), ("volume", "volume"),
    ("occupancy", "occupancy"), ("time", "time (median)"), ("n", "n"), ("rate", "dense-equiv. voxels/s"),
    ("peak", "peak GPU mem"), ("out", "output"), ("status", "status"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, "inference")
    add_scan_args(p)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which models to run")
    p.add_argument("--ours-precision", nargs="+", choices=("fp32", "fp16"), default=["fp16", "fp32"],
                   help="ctvq precisions: fp16 autocast (as pipeline.infer ships on CUDA) and/or fp32 (default: both)")
    p.add_argument("--ours-convs", nargs="+", choices=("auto", "spconv"), default=["auto"],
                   help="ctvq convs as shipped (auto: dense where a level fills its box, see networks.dense) "
                        "and/or through spconv only (default: auto)")
    p.add_argument("--maisi-precision", choices=("fp16", "fp32"), default="fp16",
                   help="MAISI precision (default fp16 autocast, as MAISI runs its autoencoder)")
    p.add_argument("--tile", type=int, default=None,
                   help="ctvq latent tile edge for Encode/Decode (default: as pipeline.infer ships, 32 = 256 voxels "
                        "on CUDA, 16 on CPU; 4 with --small)")
    p.add_argument("--maisi-roi", type=int, default=None,
                   help="MAISI encoder sliding-window ROI edge in image voxels (default 128, or 16 with --small)")
    p.add_argument("--maisi-overlap", type=float, default=None,
                   help="MAISI encoder window overlap (default 0.25, or 0 with --small)")
    p.add_argument("--maisi-latent-roi", type=int, default=None,
                   help="MAISI decoder sliding-window ROI edge in latent voxels (default 80 as MAISI's "
                        "inference config, or 4 with --small)")
    p.add_argument("--maisi-latent-overlap", type=float, default=None,
                   help="MAISI decoder window overlap (default 0.4 as MAISI's inference config, or 0 with --small)")
    p.add_argument("--maisi-num-splits", type=int, default=None,
                   help="MAISI conv split count (memory only; default 8, lowered where the ROI is too small "
                        "for it; 1 with --small)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="soft time cap per configuration (default 40, or 15 with --small)")
    p.set_defaults(default_budget=100.0)
    return p.parse_args(argv)


def _row(model: str, op: str, how: str, prec: str, vol: Crop) -> dict[str, Any]:
    return {"model": model, "op": op, "how": how, "precision": prec, "volume": f"{vol.size}^3",
            "occupancy_frac": vol.occupancy, "occupancy": C.fmt_pct(vol.occupancy)}


def _fill(row: dict[str, Any], res: dict[str, Any], voxels: int) -> dict[str, Any]:
    t = res.pop("timing", None)
    row.update(res)
    if t is not None:
        row.update(median_s=t.median_s, times_s=t.times_s, peak_bytes=t.peak_bytes,
                   voxels_per_s=voxels / t.median_s, n=t.label,
                   time=C.fmt_seconds(t.median_s), rate=C.fmt_rate(voxels / t.median_s, "vox/s"),
                   peak=C.fmt_bytes(t.peak_bytes))
    print(f"    -> {row.get('status')} {row.get('time', '')} {row.get('peak', '')}", flush=True)
    return row


def _timed_row(row: dict[str, Any], fn, what: str, vol: Crop, device, budget: Budget) -> dict[str, Any]:
    """Prints ``what``, runs ``fn`` guarded against OOM and fills ``row`` with its result."""
    print(f"[{budget.elapsed():6.1f}s] {what} ...", flush=True)
    return _fill(row, run_guarded(fn, device), vol.voxels)


def _decode_row(row: dict[str, Any], encoded: bool, fn, what: str, vol: Crop, device,
                budget: Budget) -> dict[str, Any]:
    """As :func:`_timed_row`, but ``row`` is marked skipped when the encode failed or the time budget is spent."""
    if not encoded:
        row["status"] = "skipped: encode failed"
    elif budget.exhausted():
        row["status"] = "skipped: time budget"
    else:
        row = _timed_row(row, fn, what, vol, device, budget)
    return row


def bench_ours(vol: Crop, args, device, amp: bool, cap, budget: Budget, variant: str = "") -> list[dict[str, Any]]:
    """Tiled Encode then tiled Decode of the whole scan's support (``variant``: appended to the tiling column)."""
    from pipeline.tokenizer import DEFAULT_TILE, DEFAULT_TILE_CUDA

    tile = args.tile or (4 if args.small else DEFAULT_TILE_CUDA if device.type == "cuda" else DEFAULT_TILE)
    prec = "fp16 amp" if amp and device.type == "cuda" else "fp32"
    how = f"tiles of {tile}^3 latent ({tile * 8}^3 voxels){variant}"
    rows = []
    state: dict[str, Any] = {}

    def build():
        torch.manual_seed(args.seed)
        state["model"] = C.build_ours(args.small, vol.resolution, device).eval()
        state["x"] = sparse_input(vol)
        return {}

    def encode():
        with torch.no_grad(), C.autocast(device, amp):
            return state["model"].Encode(state["x"], tile=tile)

    def run_encode():
        build()
        t = measure(lambda: state.__setitem__("tokens", encode()), device, args.warmup, args.repeats,
                      budget.per_config(cap), min_repeats=1)
        return {"timing": t, "tokens": len(state["tokens"]), "out": f"{len(state['tokens'])} tokens",
                "params": C.count_params(state["model"])}

    def decode():
        with torch.no_grad(), C.autocast(device, amp):
            return state["model"].Decode(state["tokens"], tile=tile)

    def run_decode():
        out = {}

        def call():
            rec = decode()
            out["voxels"] = int(rec.features.shape[0])

        t = measure(call, device, args.warmup, args.repeats, budget.per_config(cap), min_repeats=1)
        return {"timing": t, "out": f"{out['voxels']} voxels (sparse)"}

    rows.append(_timed_row(_row("ctvq SparseVQVAE", "encode", how, prec, vol), run_encode,
                           f"ours encode {vol.size}^3 {prec}", vol, device, budget))
    rows.append(_decode_row(_row("ctvq SparseVQVAE", "decode", how, prec, vol), "tokens" in state, run_decode,
                            f"ours decode {vol.size}^3 {prec}", vol, device, budget))
    state.clear()
    C.free_memory(device)
    return rows


def bench_maisi(vol: Crop, args, device, amp: bool, cap, budget: Budget) -> list[dict[str, Any]]:
    """MAISI encoder and decoder over the whole dense scan with ``SlidingWindowInferer``."""
    from monai.inferers import SlidingWindowInferer

    roi = args.maisi_roi or (16 if args.small else 128)
    lroi = args.maisi_latent_roi or (4 if args.small else 80)
    if args.maisi_overlap is None:
        args.maisi_overlap = 0.0 if args.small else 0.25
    if args.maisi_latent_overlap is None:
        args.maisi_latent_overlap = 0.0 if args.small else 0.4
    prec = "fp16 amp" if amp and device.type == "cuda" else "fp32"
    rows = []
    state: dict[str, Any] = {}
    enc_inf = SlidingWindowInferer(roi_size=[roi] * 3, sw_batch_size=1, overlap=args.maisi_overlap,
                                   mode="gaussian", sw_device=device, device=device)
    dec_inf = SlidingWindowInferer(roi_size=[lroi] * 3, sw_batch_size=1, overlap=args.maisi_latent_overlap,
                                   mode="gaussian", sw_device=device, device=device)

    def enc_fn(x):
        return state["model"].encode(x)[0]  # z_mu, as MAISI's encode_stage_2_inputs before sampling

    def dec_fn(z):
        return state["model"].decode(z)

    def run_encode():
        torch.manual_seed(args.seed)
        # the encoder's deepest level sees roi / 4; the decoder's first level sees the latent roi
        state["model"] = C.build_maisi(args.small, device, args.maisi_num_splits, min_edge=min(roi // 4, lroi)).eval()

        def call():
            with torch.no_grad(), C.autocast(device, amp):
                state["z"] = enc_inf(vol.dense, enc_fn)

        t = measure(call, device, args.warmup, args.repeats, budget.per_config(cap), min_repeats=1)
        return {"timing": t, "out": "latent " + "x".join(str(s) for s in state["z"].shape[1:]),
                "params": C.count_params(state["model"]), "maisi_num_splits": state["model"].bench_num_splits}

    def run_decode():
        z = state["z"].float()

        def call():
            with torch.no_grad(), C.autocast(device, amp):
                state["rec"] = dec_inf(z, dec_fn)
            state.pop("rec")

        t = measure(call, device, args.warmup, args.repeats, budget.per_config(cap), min_repeats=1)
        return {"timing": t, "out": f"dense {vol.size}^3"}

    rows.append(_timed_row(_row("MAISI AutoencoderKlMaisi", "encode", f"sliding window {roi}^3, overlap "
                                f"{args.maisi_overlap}", prec, vol), run_encode,
                           f"maisi encode {vol.size}^3", vol, device, budget))
    r = _row("MAISI AutoencoderKlMaisi", "decode", f"sliding window latent {lroi}^3 ({lroi * 4}^3 voxels), "
             f"overlap {args.maisi_latent_overlap}", prec, vol)
    rows.append(_decode_row(r, "z" in state, run_decode, f"maisi decode {vol.size}^3", vol, device, budget))
    state.clear()
    C.free_memory(device)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = C.seeded_device(args)
    cap = args.max_seconds if args.max_seconds is not None else (15.0 if args.small else 40.0)
    scan, budget = load_scan_and_budget(args, device)
    vol = whole_scan(scan, device)
    ok_ours, why = C.networks_available()
    rows: list[dict[str, Any]] = []
    # order: ctvq as shipped, MAISI as shipped, then ctvq fp16 (dropped first when the budget runs out)
    plan = []
    if "ours" in args.models:
        plan += [("ours", prec) for prec in args.ours_precision[:1]]
    if "maisi-ae" in args.models:
        plan.append(("maisi-ae", args.maisi_precision))
    if "ours" in args.models:
        plan += [("ours", prec) for prec in args.ours_precision[1:]]
    if device.type != "cuda":  # CPU runs fp32 only: one run per model
        plan = list(dict.fromkeys((key, "fp32") for key, _ in plan))
    for key, prec in plan:
        amp = prec == "fp16"
        if budget.exhausted():
            rows.append({"model": key, "precision": prec, "status": "skipped: time budget"})
        elif key == "ours" and not ok_ours:
            rows.append({"model": "ctvq SparseVQVAE", "status": f"skipped: networks not importable ({why[:80]})"})
        elif key == "ours":
            for convs in args.ours_convs:
                with only_on_device(vol, ("coords", "feats"), device), C.conv_policy(convs):
                    rows += bench_ours(vol, args, device, amp, cap, budget, "" if convs == "auto" else f", {convs} convs")
        else:
            with only_on_device(vol, ("dense",), device):
                rows += bench_maisi(vol, args, device, amp, cap, budget)
        C.write_partial("inference", args, rows)
    notes = [
        f"scan: {scan.source}, whole {scan.resolution}^3 cube, window {scan.window_name}; ctvq sees the support "
        f"({C.fmt_pct(vol.occupancy)} of the cube), MAISI the dense cube",
        "RANDOM WEIGHTS: timing and memory only, no reconstruction quality",
        "ctvq fp16 = as pipeline.infer runs it on CUDA (fp16 autocast); fp32 = the same without autocast",
        f"time = median of n runs after {args.warmup} warm-up run(s), CUDA-synchronised ('warm-up only': one "
        "run outlasted the cap, the first run is reported, an upper bound); peak GPU mem = "
        "torch.cuda.max_memory_allocated during the runs (weights, the model's own input and outputs included)",
        "dense-equiv. voxels/s = cube voxels / time; MAISI compresses 4x per axis (latent 4 channels), ctvq 8x "
        "(one 8192-code token per active 8^3 cell)",
        "MAISI windows are stitched on the GPU (MAISI's own scripts stitch on the CPU to save GPU memory)",
    ]
    if args.small:
        notes.append("--small: tiny models and a tiny volume, a smoke run; these numbers mean nothing")
    return C.finish("inference", args, device, rows, C.markdown_table(rows, COLUMNS), notes)


if __name__ == "__main__":
    main()

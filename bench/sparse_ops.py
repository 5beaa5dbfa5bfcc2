"""Per-op costs of the sparse model's building blocks on a crop, side by side.

For each submanifold conv of the default model (its level, input and output channels) this
times forward and forward + backward under each spconv algorithm and as a dense conv3d over
the grid (the path :mod:`networks.dense` takes on well-filled levels), and the pooling, subdivide
and norm ops at the sizes they meet in a training step. Use it to see which op dominates a
step before changing the model, and which spconv algorithm wins at which size.

    python bench/sparse_ops.py --crop 128            # on a GPU
    python bench/sparse_ops.py --small --device cpu  # smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common as C  # noqa: E402
from bench.timing import measure, run_guarded  # noqa: E402

#: (level divisor, in, out) of every 3^3 conv of the default model, encoder then decoder
DEFAULT_CONVS = [
    (2, 32, 64), (2, 64, 64), (4, 64, 128), (4, 128, 128), (8, 128, 512), (8, 512, 512),
    (8, 512, 128), (4, 128, 128), (4, 128, 64), (2, 64, 64), (2, 64, 32), (1, 32, 32),
]
SMALL_CONVS = [(2, 8, 8), (1, 8, 8)]
ALGOS = ("mask_implicit_gemm", "mask_split_implicit_gemm", "native")
COLUMNS = [("op", "op"), ("occupancy", "occupancy"), ("voxels", "voxels"), ("algo", "algo"), ("fwd", "forward"),
           ("fwd_new", "forward, new rulebook / grid"), ("fwd_bwd", "forward + backward"),
           ("status", "status")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, "sparse_ops")
    p.add_argument("--crop", type=int, default=None, help="edge of the fully occupied crop (default 128; 16 with --small)")
    p.add_argument("--algos", nargs="+", choices=ALGOS, default=None, help="spconv algorithms (default: all on GPU, native on CPU)")
    p.add_argument("--occupancies", type=float, nargs="+", default=[1.0],
                   help="fractions of the grid the convs see, in random 4^3 blocks (default 1.0; e.g. 1 0.5 0.25)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per op (median reported)")
    p.set_defaults(default_budget=120.0)
    return p.parse_args(argv)


def full_grid(edge: int, device: torch.device, occupancy: float = 1.0, block: int = 4) -> torch.Tensor:
    """Coordinates (batch 0) of an ``edge^3`` grid; below full occupancy, random whole
    ``block^3`` blocks are kept (support comes in lumps in CT, not as scattered voxels)."""
    r = torch.arange(edge, device=device, dtype=torch.int32)
    g = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).view(-1, 3)
    if occupancy < 1.0:
        nb = -(-edge // block)
        keep = torch.rand(nb, nb, nb, device=device) < occupancy
        g = g[keep[g[:, 0] // block, g[:, 1] // block, g[:, 2] // block]]
    return torch.cat([torch.zeros_like(g[:, :1]), g], 1)


def time_fn(fn, device, repeats: int) -> float:
    t = measure(fn, device, warmup=2, repeats=repeats, max_seconds=10.0)
    return t.median_s


def conv_rows(edge: int, convs, algos, device, dtype, repeats, occupancy: float = 1.0) -> list[dict[str, Any]]:
    """Each conv under each spconv algorithm and as a dense conv3d over the grid (``dense``).

    ``fwd`` and ``fwd_bwd`` reuse one sparse tensor, as the convs of one level do in the model
    (rulebook or dense grid built once); ``fwd_new`` builds the tensor afresh for every call
    (rulebook construction, or the dense decision and its host sync, included).
    """
    import os

    from networks.backend import make_sparse
    from networks.blocks import SparseConv3d
    from networks.dense import dense_conv_policy

    rows = []
    for div, cin, cout in convs:
        e = edge // div
        idx = full_grid(e, device, occupancy)
        feats = torch.randn(idx.shape[0], cin, device=device, dtype=dtype, requires_grad=True)
        for algo in list(algos) + ["dense"]:
            policy = 0.0 if algo == "dense" else float("inf")
            if algo != "dense":
                os.environ["SPCONV_ALGO"] = algo
            conv = SparseConv3d(cin, cout).to(device=device, dtype=dtype)
            row: dict[str, Any] = {"op": f"subm3 {cin}->{cout} @ {e}^3", "voxels": idx.shape[0], "algo": algo,
                                   "occupancy": f"{idx.shape[0] / e**3:.0%}"}
            x = make_sparse(feats, idx, [e] * 3, 1)

            def fwd():
                with torch.no_grad():
                    conv(x)

            def fwd_new():
                with torch.no_grad():
                    conv(make_sparse(feats, idx, [e] * 3, 1))

            def fwd_bwd():
                conv(x).features.float().sum().backward()

            with dense_conv_policy(policy):
                row.update(run_guarded(lambda: {"fwd_s": time_fn(fwd, device, repeats),
                                                  "fwd_new_s": time_fn(fwd_new, device, repeats),
                                                  "fwd_bwd_s": time_fn(fwd_bwd, device, repeats)}, device))
            rows.append(row)
            os.environ.pop("SPCONV_ALGO", None)
    return rows


def misc_rows(edge: int, device, dtype, repeats) -> list[dict[str, Any]]:
    from networks.backend import make_sparse
    from networks.ops import SparseNorm, downsample, subdivide

    idx = full_grid(edge, device)
    n = idx.shape[0]
    rows = []
    for c in (32, 64):
        feats = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
        x = make_sparse(feats, idx, [edge] * 3, 1)
        norm = SparseNorm(c).to(device)

        def pool():
            downsample(x).features.float().sum().backward()

        def normalise():
            norm(x).features.float().sum().backward()

        for name, fn in ((f"downsample {c} ch", pool), (f"layer norm {c} ch", normalise)):
            row = {"op": name, "voxels": n, "algo": "-"}
            row.update(run_guarded(lambda: {"fwd_bwd_s": time_fn(fn, device, repeats)}, device))
            rows.append(row)
    half = full_grid(edge // 2, device)
    feats = torch.randn(half.shape[0], 32, device=device, dtype=dtype, requires_grad=True)

    def split():
        subdivide(make_sparse(feats, half, [edge // 2] * 3, 1)).features.float().sum().backward()

    row = {"op": "subdivide 32 ch", "voxels": n, "algo": "-"}
    row.update(run_guarded(lambda: {"fwd_bwd_s": time_fn(split, device, repeats)}, device))
    rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = C.seeded_device(args)
    edge = args.crop or (16 if args.small else 128)
    algos = args.algos or (list(ALGOS) if device.type == "cuda" else ["native"])
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    convs = SMALL_CONVS if args.small else DEFAULT_CONVS
    rows = []
    for occ in args.occupancies:
        rows += conv_rows(edge, convs, algos, device, dtype, args.repeats, occ)
    rows += misc_rows(edge, device, dtype, args.repeats)
    for r in rows:
        r.setdefault("status", "ok")
        r["fwd"] = C.fmt_seconds(r.get("fwd_s")) if r.get("fwd_s") else "-"
        for k in ("fwd_new", "fwd_bwd"):
            r[k] = C.fmt_seconds(r.get(k + "_s")) if r.get(k + "_s") else "-"
    occ = ", ".join(f"{o:.0%}" for o in args.occupancies)
    notes = [f"{edge}^3 crop, convs at occupancy {occ} (other ops fully occupied); features {dtype}; median of {args.repeats} calls; "
             "backward of sum(features) (conv: input and weight gradients)"]
    return C.finish("sparse_ops", args, device, rows, C.markdown_table(rows, COLUMNS), notes)


if __name__ == "__main__":
    main()

"""Codebooks fitted again to a trained ctvq's latents: which fit makes held-out scans use the most
codes, and what does it cost in fidelity?

In the shipped recipe the encoder is frozen after stage 0, so the latents of ``--run DIR`` (a run
folder, e.g. ``--work/ctvq/stage2`` of ``bench/quality.py``) are what stages 1 and 2 quantise. The
script encodes every case of ``--train`` and ``--eval`` to its latents, fits a book of the run's size
to the training latents by each method, and encodes and decodes the held-out scans with the run's
decoder and that book (the decoder reads code vectors, so a book of other vectors in the same latent
space decodes as the run's own would):

- ``run``: the run's own codebook (what training left);
- ``kmeans``: Lloyd's k-means on all training latents (what stage 1's refit does, there on at most
  64 scans and 2,097,152 latents);
- ``balanced``: k-means whose clusters hold equal shares of the training latents
  (:func:`balanced_kmeans`), looked up by the plain nearest code;
- ``run_balanced``: the run's codebook moved by the rounds of ``balanced`` (no Lloyd first);
- ``scan_balanced``: ``balanced`` with every training scan weighted alike (rows drawn equally from each).

Per method: the held-out scans' codes used and perplexity (pooled), the training latents' perplexity
and codes with under a fifth of the average code's share, the held-out latents' mean squared distance to
their codes, and PSNR / MAE in HU inside the body of the held-out reconstructions (the mean over cases,
as ``bench/quality.py``).

    python bench/codebook_fit.py --run /tmp/q/ctvq/stage2 --train TRAIN --eval EVAL \\
        --out bench/results/codebook_fit.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as C  # noqa: E402
from networks.quantizer import kmeans, lloyd_step, nearest_code  # noqa: E402
from pipeline.io_utils import save_text  # noqa: E402

METHODS = ("run", "kmeans", "balanced", "run_balanced", "scan_balanced")
#: a code under this share of the average code's training rows counts as rare
RARE = 0.2
COLUMNS = [("method", "method"), ("eval_codes_used", "held-out: codes used"), ("eval_perplexity", "held-out: perplexity"),
           ("train_perplexity", "training: perplexity"), ("train_rare", f"training: codes under {RARE:g}x the average share"),
           ("eval_latent_mse", "held-out latent MSE"), ("psnr_body", "PSNR body (dB)"), ("mae_hu_body", "MAE body (HU)"),
           ("fit_seconds", "fit (s)")]


@torch.no_grad()
def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, m: int, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` nearest codebook rows of each row of ``z``, nearest first: squared distances and
    indices, both [N, m]."""
    z, e = z.float(), codebook.float()
    e2 = (e * e).sum(1)
    parts = [torch.addmm(e2, z[s : s + chunk], e.t(), alpha=-2.0).topk(m, dim=1, largest=False)
             for s in range(0, z.shape[0], chunk)]
    return torch.cat([p.values for p in parts]) + (z * z).sum(1, keepdim=True), torch.cat([p.indices for p in parts])


@torch.no_grad()
def equal_share_assignment(x: torch.Tensor, codes: torch.Tensor, candidates: int = 32) -> torch.Tensor:
    """Assign each row of ``x`` to one of its ``candidates`` nearest codes so that no code takes more
    than its equal share (``ceil(M / K)`` rows): in rounds, every row not yet placed asks its next
    nearest code, and each code keeps the closest askers it still has room for. A row all of whose
    candidates are full goes to its nearest code."""
    k = codes.shape[0]
    m = min(candidates, k)
    dist, cand = nearest_codes(x, codes, m)
    room = torch.full((k,), -(-x.shape[0] // k), dtype=torch.long, device=x.device)
    out = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    for r in range(m):
        ask = (out < 0).nonzero().squeeze(1)
        if ask.numel() == 0:
            break
        code, d = cand[ask, r], dist[ask, r]
        order = torch.argsort(d, stable=True)
        order = order[torch.argsort(code[order], stable=True)]  # by code, closest first within a code
        code_sorted = code[order]
        first = torch.searchsorted(code_sorted, code_sorted, side="left")
        rank = torch.arange(code_sorted.numel(), device=x.device) - first
        take = rank < room[code_sorted]
        out[ask[order[take]]] = code_sorted[take]
        room -= torch.bincount(code_sorted[take], minlength=k)
    left = out < 0
    out[left] = cand[left, 0]
    return out


@torch.no_grad()
def balanced_kmeans(x: torch.Tensor, k: int, iters: int = 10, rounds: int = 10,
                    generator: torch.Generator | None = None, init: torch.Tensor | None = None) -> torch.Tensor:
    """k-means whose clusters hold about equal shares of ``x`` [M, D]: Lloyd's ``iters`` iterations
    (from ``init`` [k, D] if given, else from random rows), then ``rounds`` of
    (:func:`equal_share_assignment`, centres to their clusters' means). Returns the centres [k, D]."""
    x = x.float()
    c = kmeans(x, k, iters, generator) if init is None else init.float().clone()
    if init is not None:
        for _ in range(iters):
            c = lloyd_step(x, c, generator)
    for _ in range(rounds):
        a = equal_share_assignment(x, c)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        cnt = torch.bincount(a, minlength=k).float()
        c = torch.where(cnt[:, None] > 0, sums / cnt.clamp_min(1)[:, None], c)
    return c


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--run", type=Path, required=True,
                   help="a ctvq run folder (with ckpts/) of a single-level plain-lookup model; its latest EMA weights are "
                        "used (the book of a run trained with refit_codebook, stage 1 or 2 as shipped, is already refitted)")
    p.add_argument("--train", type=Path, required=True, help="processed training folder (./run.sh preprocess output)")
    p.add_argument("--eval", type=Path, required=True, help="processed held-out folder")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="fits to compare (default: all)")
    p.add_argument("--iters", type=int, default=20, help="Lloyd iterations of kmeans and balanced (default 20)")
    p.add_argument("--rounds", type=int, default=10, help="equal-share rounds of the balanced fits (default 10)")
    C.add_common_args(p, "codebook_fit")
    return p.parse_args(argv)


def load_run(run: Path, device: torch.device):
    from pipeline.infer import Tokenizer
    from pipeline.io_utils import CheckpointError, TokenizerError

    try:
        tok = Tokenizer.from_checkpoint(run, device=device)
    except (CheckpointError, TokenizerError, FileNotFoundError) as e:
        raise SystemExit(f"codebook_fit: --run {run}: no trained run there ({' '.join(str(e).split(';')[0].split())}); "
                         "pass a run folder of ./run.sh train (it holds config.json and ckpts/)") from None
    vq = tok.network.vq
    if not hasattr(vq, "embeddings") or vq.lookup_dim or vq.shared_map:
        raise SystemExit(f"codebook_fit: --run {run} is not a single-level plain-lookup model (network_def#vq_type 'vq', "
                         "vq_depth 1); its book cannot be refitted here")
    return tok


def cases_of(tok, folder: Path, flag: str) -> list[dict]:
    from pipeline.evaluate import find_cases

    if not folder.is_dir():
        raise SystemExit(f"codebook_fit: {flag} {folder} is not a folder; pass a ./run.sh preprocess output folder")
    cases = find_cases(folder, tok.window, tok.resolution)
    if not cases:
        raise SystemExit(f"codebook_fit: {flag} {folder} holds no complete case with the {tok.window.name} window at "
                         f"{tok.resolution}^3 that the run was trained on; preprocess it with that window")
    return cases


def latents_of(tok, case: dict) -> torch.Tensor:
    """The encoder's continuous latents [M, D] of one processed case."""
    from pipeline.processed import load_case

    data = load_case(case)
    return tok.latents(data["window"], data["mask"])


def fit(method: str, run_codes: torch.Tensor, train: list[torch.Tensor], args, generator: torch.Generator) -> torch.Tensor:
    k = run_codes.shape[0]
    rows = torch.cat(train)
    if method == "run":
        return run_codes
    if method == "kmeans":
        return kmeans(rows, k, args.iters, generator)
    if method == "balanced":
        return balanced_kmeans(rows, k, args.iters, args.rounds, generator)
    if method == "run_balanced":
        return balanced_kmeans(rows, k, 0, args.rounds, generator, init=run_codes)
    per_scan = rows.shape[0] // len(train)  # scan_balanced: as many rows from every scan
    equal = torch.cat([t[torch.randint(t.shape[0], (per_scan,), device=t.device, generator=generator)] for t in train if t.shape[0]])
    return balanced_kmeans(equal, k, args.iters, args.rounds, generator)


@torch.no_grad()
def score(tok, codes: torch.Tensor, train: list[torch.Tensor], held: list[torch.Tensor], eval_cases: list[dict]) -> dict:
    """Usage of ``codes`` on the training and held-out latents, and the held-out reconstructions' fidelity."""
    from networks.quantizer import perplexity_of
    from pipeline.metrics import volume_metrics
    from pipeline.processed import case_geometry, load_case

    k = codes.shape[0]
    train_counts = torch.bincount(nearest_code(torch.cat(train), codes), minlength=k).double()
    held_rows = torch.cat(held)
    held_idx = nearest_code(held_rows, codes)
    held_counts = torch.bincount(held_idx, minlength=k).double()
    share = train_counts / train_counts.mean()
    vq = tok.network.vq
    saved = vq.embeddings.weight.detach().clone()
    vq.embeddings.weight.data.copy_(codes.to(saved.dtype))
    per_case = []
    try:
        for case in eval_cases:
            data = load_case(case)
            win, mask = data["window"], data["mask"]
            recon = tok.decode(tok.encode_arrays(win, mask, **case_geometry(data["info"])))
            m = volume_metrics(recon, np.where(mask, win, 0.0).astype(np.float32), tok.window, mask, ssim=False,
                               device=tok.device)
            per_case.append({"case": case["case"], "psnr_body": m["psnr_body"], "mae_hu_body": m["mae_hu_body"]})
    finally:
        vq.embeddings.weight.data.copy_(saved)
    held_usage = perplexity_of(held_counts)
    return {"eval_codes_used": held_usage["codes_used"], "eval_perplexity": held_usage["perplexity"],
            "train_perplexity": perplexity_of(train_counts)["perplexity"], "train_rare": int((share < RARE).sum()),
            "eval_latent_mse": float((held_rows - codes[held_idx]).square().sum(1).mean()) if len(held_rows) else 0.0,
            "psnr_body": float(np.mean([c["psnr_body"] for c in per_case])),
            "mae_hu_body": float(np.mean([c["mae_hu_body"] for c in per_case])),
            "eval_codes_per_case": [int((torch.bincount(nearest_code(h, codes), minlength=k) > 0).sum()) for h in held],
            "cases": per_case}


def display_row(method: str, r: dict, k: int) -> dict:
    return {"method": method, "eval_codes_used": f"{r['eval_codes_used']} ({100 * r['eval_codes_used'] / k:.0f} %)",
            "eval_perplexity": f"{r['eval_perplexity']:.0f}", "train_perplexity": f"{r['train_perplexity']:.0f}",
            "train_rare": r["train_rare"], "eval_latent_mse": f"{r['eval_latent_mse']:.4g}",
            "psnr_body": f"{r['psnr_body']:.2f}", "mae_hu_body": f"{r['mae_hu_body']:.1f}", "fit_seconds": f"{r['fit_seconds']:.1f}"}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = C.resolve_device(args.device)
    torch.backends.cudnn.benchmark = False  # ctvq's tiles change shape: no per-shape tuning
    tok = load_run(args.run, device)
    train_cases, eval_cases = cases_of(tok, args.train, "--train"), cases_of(tok, args.eval, "--eval")
    train = [latents_of(tok, c) for c in train_cases]
    held = [latents_of(tok, c) for c in eval_cases]
    print(f"latents: {sum(len(t) for t in train)} training rows of {len(train)} scans, "
          f"{sum(len(h) for h in held)} held-out rows of {len(held)} scans", flush=True)
    run_codes = tok.network.vq.codes().detach()
    k = run_codes.shape[0]
    results = {}
    for method in args.methods:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        start = time.perf_counter()
        codes = fit(method, run_codes, train, args, generator)
        C.sync(device)
        fit_seconds = time.perf_counter() - start
        results[method] = {**score(tok, codes, train, held, eval_cases), "fit_seconds": fit_seconds}
        r = results[method]
        print(f"{method}: held-out codes {r['eval_codes_used']} of {k}, PSNR body {r['psnr_body']:.2f} dB", flush=True)
    meta = {"env": C.env_info(device), "run": args.run, "train_dir": args.train, "eval_dir": args.eval,
            "codebook": k, "train_rows": sum(len(t) for t in train), "eval_rows": sum(len(h) for h in held),
            "iters": args.iters, "rounds": args.rounds}
    C.write_json(args.out, {**meta, "methods": results})
    table = C.markdown_table([display_row(m, r, k) for m, r in results.items()], COLUMNS)
    save_text(args.out.with_suffix(".md"), table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()

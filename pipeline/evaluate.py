"""Evaluate a model on whole processed scans (``./run.sh evaluate``).

::

    python -m pipeline.evaluate (--ckpt RUN_DIR/ckpts/vqvae_ema0.9999_step0200000.pt | --bundle DIR)
                                --data_dir processed_dataset [--window lung] --out report_dir
                                [--max_cases N] [--cases ID ...] [--tile N] [--device cuda] [--no-ssim]

Every usable case (``pipeline.processed``: either layout) of every processed dataset under
``--data_dir`` goes whole (not cropped) through the same tiled Encode/Decode as ``pipeline.infer``. The reference is the case's window
volume restricted to the body mask (what the sparse input holds; 0 elsewhere). Per case and
overall: PSNR and 3D SSIM on the window's [0, 1] range inside the body and over the whole cube,
MAE and RMSE in HU inside the body, per-organ MAE when the case has labels and an organ mapping
exists, codebook usage (codes used, perplexity, tokens per scan), encode/decode time and peak
memory. Writes ``metrics.csv`` (one row per case), ``organs.csv``, ``summary.json``,
``cases/<case>.png`` (three planes) and ``report.html``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# torch, MONAI and the model load where they are used, so --help answers at once
from pipeline.infer import DEFAULT_TILE, DEFAULT_TILE_CUDA, TokenizerError, cli_errors, parse_window
from pipeline.report import fmt_value, write_report

if TYPE_CHECKING:
    import torch

    from pipeline.tokenizer import Tokenizer


__all__ = ["find_cases", "evaluate", "main"]

CSV_COLUMNS = [
    "case",
    "dataset",
    "case_id",
    "psnr_body",
    "ssim_body",
    "psnr",
    "ssim",
    "mae_hu_body",
    "rmse_hu_body",
    "tokens",
    "codes_used",
    "perplexity",
    "support_voxels",
    "body_voxels",
    "encode_s",
    "decode_s",
    "encode_peak_mb",
    "decode_peak_mb",
]


# ------------------------------------------------------------------------------------ peak memory


class PeakMemory:
    """Peak memory of a block: CUDA peak allocation on GPU, else the process peak RSS.

    On Linux the RSS peak is reset at the start (``/proc/self/clear_refs``), so the value is the
    block's own peak; elsewhere it is the process peak so far.
    """

    def __init__(self, device: torch.device):
        import torch

        self.device = torch.device(device)
        self.peak_mb = float("nan")

    @staticmethod
    def _hwm_kb() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            kb = self._hwm_kb()
            if kb is None:
                kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_mb = kb / 1024.0
        return False


# ------------------------------------------------------------------------------------------ data


def find_cases(data_dir: str | os.PathLike, window: Any, resolution: int | None = None) -> list[dict]:
    """Usable cases (``pipeline.processed.usable_cases``) of every processed dataset under
    ``data_dir`` for ``window``.

    Args:
        data_dir: output folder of ``./run.sh preprocess`` (searched recursively).
        window: the model's window (its name picks the window file of the guide layout).
        resolution: expected cube side (a dataset at another resolution is an error).

    Returns:
        [{"case", "dataset", "case_id", "dir", "window", "window_file", "organ_mapping"}] sorted by case.
    """
    from pipeline.metrics import normalize_organ_mapping
    from pipeline.processed import find_datasets, usable_cases

    w = parse_window(window)
    cases = []
    datasets = find_datasets(data_dir)
    if not datasets:
        raise TokenizerError(f"{data_dir}: no processed dataset (metadata.csv + dataset_config.json); run ./run.sh preprocess first")
    for ds in datasets:
        try:
            found = usable_cases(ds, w)
        except KeyError as e:
            raise TokenizerError(f"{ds}: {e.args[0]}") from None
        cfg = found.config
        if resolution is not None and int(cfg.get("resolution", 512)) != int(resolution):
            raise TokenizerError(
                f"{ds}: preprocessed at {cfg.get('resolution')}^3 but the model works on {resolution}^3; "
                f"preprocess with --resolution {resolution} or evaluate a matching model"
            )
        if not found.window.same_as(w):
            raise TokenizerError(
                f"{ds}: window {w.name} is W{found.window.width:g}/L{found.window.level:g} there but the model's is "
                f"W{w.width:g}/L{w.level:g}; preprocess with the model's window"
            )
        mapping = normalize_organ_mapping(cfg.get("organ_mapping"))
        for c in found.cases:
            cases.append({"case": c["key"], "dataset": ds.name, "case_id": c["case_id"], "dir": c["dir"],
                          "window": found.window, "window_file": found.window_file, "organ_mapping": mapping})
    return sorted(cases, key=lambda c: c["case"])


# -------------------------------------------------------------------------------------- evaluate


def _nanmean(values: Sequence[float]) -> float | None:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    v = [x for x in v if math.isfinite(x)]
    return float(np.mean(v)) if v else None


def _safe_name(case: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in case.replace("/", "__"))


def depth_metrics(tokenizer: Tokenizer, tokens, recon: np.ndarray, target: np.ndarray, mask: np.ndarray,
                  case: str) -> list[dict]:
    """PSNR and MAE inside the body decoding the first d residual code levels, d = 1 .. the tokens'
    depth (``recon`` is the decode of all of them)."""
    from pipeline.metrics import volume_metrics

    rows = []
    for d in range(1, tokens.depth + 1):
        volume = recon if d == tokens.depth else tokenizer.decode(tokens, depth=d)
        m = volume_metrics(volume, target, tokenizer.window, mask, ssim=False, device=tokenizer.device)
        rows.append({"case": case, "depth": d, "psnr_body": m["psnr_body"], "mae_hu_body": m["mae_hu_body"]})
    return rows


def level_codes(indices, level: int = 1) -> np.ndarray:
    """A scan's codes of one level: column ``level`` - 1 of codes [M, D]; codes [M] are level 1 (the
    tokens a depth-1 reader gets, whose usage is reported for a model of any depth)."""
    indices = np.asarray(indices)
    return indices[:, level - 1] if indices.ndim == 2 else indices


def per_depth_summary(rows: Sequence[Mapping], indices: Sequence[np.ndarray], num_embeddings: int) -> list[dict]:
    """Means over the cases at each depth, with the usage of that depth's code level."""
    from pipeline.metrics import codebook_usage

    out = []
    for d in sorted({r["depth"] for r in rows}):
        at = [r for r in rows if r["depth"] == d]
        level = np.concatenate([level_codes(i, d) for i in indices])
        use = codebook_usage(level, num_embeddings)
        out.append({"depth": d, "psnr_body": _nanmean([r["psnr_body"] for r in at]),
                     "mae_hu_body": _nanmean([r["mae_hu_body"] for r in at]),
                     "codes_used": use["codes_used"], "perplexity": use["perplexity"]})
    return out


def evaluate(
    tokenizer: Tokenizer,
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    window: Any = None,
    max_cases: int | None = None,
    cases: Sequence[str] | None = None,
    ssim: bool = True,
    pictures: bool = True,
    log=print,
) -> dict:
    """Evaluate ``tokenizer`` on whole scans and write the report folder.

    Args:
        tokenizer: the model (``Tokenizer.from_checkpoint`` / ``from_bundle``).
        data_dir: processed datasets.
        out: report folder (created).
        window: window to evaluate; must be the model's (default: the model's).
        max_cases: evaluate at most this many cases (sorted by name).
        cases: only these cases (``dataset/case_id`` or ``case_id``).
        ssim: compute SSIM (the slowest metric).
        pictures: write the three-plane picture of each case.
        log: message function.

    Returns:
        the summary dict (also written to ``summary.json``).
    """
    from pipeline.io_utils import save_csv, save_json
    from pipeline.metrics import codebook_usage, volume_metrics
    from pipeline.processed import case_geometry, load_case
    from pipeline.visualize import save_three_plane

    w = tokenizer.window
    if window is not None:
        asked = parse_window(window)
        if not asked.same_as(w):
            raise TokenizerError(
                f"--window {asked.name} (W{asked.width:g}/L{asked.level:g}) is not the model's window {w.name} "
                f"(W{w.width:g}/L{w.level:g}); evaluate a {asked.name} model or drop --window"
            )
    found = find_cases(data_dir, w, tokenizer.resolution)
    if cases:
        known = {c["case"] for c in found} | {c["case_id"] for c in found}
        unknown = [name for name in cases if name not in known]
        if unknown:
            listed = ", ".join(c["case"] for c in found[:10]) + (", ..." if len(found) > 10 else "")
            raise TokenizerError(f"{data_dir}: no complete {w.name} case named {', '.join(unknown)}; "
                                 f"--cases takes dataset/case_id or case_id of: {listed or 'none'}")
        found = [c for c in found if c["case"] in cases or c["case_id"] in cases]
    if max_cases:
        found = found[: int(max_cases)]
    if not found:
        raise TokenizerError(f"{data_dir}: no complete case with the {w.name} window; run ./run.sh preprocess (with that window) first")
    out = Path(out)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    rows, organ_rows, all_indices, depth_rows = [], [], [], []
    for n, case in enumerate(found, 1):
        data = load_case(case)
        win, mask = data["window"], data["mask"]
        target = np.where(mask, win, 0.0).astype(np.float32)
        with PeakMemory(tokenizer.device) as pm_enc:
            t0 = time.perf_counter()
            tokens = tokenizer.encode_arrays(win, mask, **case_geometry(data["info"]))
            enc_s = time.perf_counter() - t0
        with PeakMemory(tokenizer.device) as pm_dec:
            t0 = time.perf_counter()
            recon = tokenizer.decode(tokens)
            dec_s = time.perf_counter() - t0
        m = volume_metrics(recon, target, w, mask, data["labels"], case["organ_mapping"] or None, ssim=ssim,
                           device=tokenizer.device)
        use = codebook_usage(tokens.indices, tokenizer.num_embeddings)
        all_indices.append(tokens.indices)
        depth_rows += depth_metrics(tokenizer, tokens, recon, target, mask, case["case"])
        row = {
            "case": case["case"],
            "dataset": case["dataset"],
            "case_id": case["case_id"],
            **{k: m.get(k) for k in ("psnr_body", "ssim_body", "psnr", "ssim", "mae_hu_body", "rmse_hu_body")},
            "tokens": len(tokens),
            "codes_used": use["codes_used"],
            "perplexity": use["perplexity"],
            "support_voxels": int((mask & (win > 0)).sum()),
            "body_voxels": int(mask.sum()),
            "encode_s": enc_s,
            "decode_s": dec_s,
            "encode_peak_mb": pm_enc.peak_mb,
            "decode_peak_mb": pm_dec.peak_mb,
        }
        for organ, mae in (m.get("organ_mae_hu") or {}).items():
            organ_rows.append({"case": case["case"], "organ": organ, "mae_hu": mae})
        if pictures:
            pic = save_three_plane(
                out / "cases" / f"{_safe_name(case['case'])}.png",
                target,
                recon,
                mask=mask,
                title=f"{case['case']}  PSNR(body) {row['psnr_body']:.2f} dB  MAE {row['mae_hu_body']:.1f} HU",
            )
            row["picture"] = os.path.relpath(pic, out)
        rows.append(row)
        log(
            f"[{n}/{len(found)}] {case['case']}: PSNR body {row['psnr_body']:.2f} dB, SSIM body "
            f"{fmt_value(row['ssim_body'])}, MAE {row['mae_hu_body']:.1f} HU, "
            f"{row['tokens']} tokens, encode {enc_s:.1f} s, decode {dec_s:.1f} s"
        )
    usage = codebook_usage(all_indices, tokenizer.num_embeddings)
    overall = {k: _nanmean([r.get(k) for r in rows]) for k in CSV_COLUMNS[3:10] + CSV_COLUMNS[14:]}
    overall["tokens_per_scan"] = _nanmean([r["tokens"] for r in rows])
    overall["codes_used"] = usage["codes_used"]
    overall["codebook_usage"] = usage["usage"]
    overall["perplexity"] = usage["perplexity"]
    overall.pop("tokens", None)
    organs: dict[str, list[float]] = {}
    for r in organ_rows:
        organs.setdefault(r["organ"], []).append(r["mae_hu"])
    codes = [np.asarray(x).reshape(len(x), -1) for x in all_indices]
    level_counts = [np.bincount(np.concatenate([c[:, d] for c in codes]).astype(np.int64),
                                minlength=tokenizer.num_embeddings).tolist() for d in range(codes[0].shape[1])]
    summary = {
        "model": tokenizer.source,
        "data_dir": str(data_dir),
        "window": w.to_dict(),
        "resolution": tokenizer.resolution,
        "num_cases": len(rows),
        "num_embeddings": tokenizer.num_embeddings,
        "device": str(tokenizer.device),
        "tile": tokenizer.tile,
        "overall": overall,
        "organ_mae_hu": {k: _nanmean(v) for k, v in sorted(organs.items())},
        "per_depth": per_depth_summary(depth_rows, all_indices, tokenizer.num_embeddings),
        "code_counts": level_counts[0],  # first code level
        "code_counts_per_level": level_counts,
        "training_cases": training_cases(tokenizer.source),
        "cases": rows,
        "reference": "window volume inside the body mask (0 outside), window range [0, 1]",
    }
    save_csv(out / "metrics.csv", rows, CSV_COLUMNS)
    if organ_rows:
        save_csv(out / "organs.csv", organ_rows, ["case", "organ", "mae_hu"])
    save_json(out / "summary.json", summary)
    write_report(out, summary)
    return summary


def training_cases(model_source: Any) -> list[str] | None:
    """Cases the model was trained on: ``cases.json`` of the run that wrote the checkpoint, or None."""
    import json

    p = Path(str(model_source or ""))
    for run in (p.parent.parent, p.parent, p):
        f = run / "cases.json"
        if f.is_file():
            try:
                return list(json.loads(f.read_text()).get("train", []))
            except (ValueError, OSError):
                return None
    return None


# ------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./run.sh evaluate", description="Evaluate a model on whole processed scans.")
    p.add_argument("--ckpt", default=None, help="checkpoint RUN_DIR/ckpts/*.pt (model from RUN_DIR/config.json), or a run folder")
    p.add_argument("--config", default=None, help="run config.json for --ckpt (default: RUN_DIR/config.json)")
    p.add_argument("--bundle", default=None, help="exported bundle folder instead of --ckpt")
    p.add_argument("--data_dir", "--data-dir", required=True, help="processed datasets (output of ./run.sh preprocess)")
    p.add_argument("--window", default=None, help="window to evaluate (must be the model's; default: the model's)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--max_cases", "--max-cases", type=int, default=None, help="at most this many cases")
    p.add_argument("--cases", nargs="+", default=None, help="only these cases (dataset/case_id or case_id)")
    p.add_argument("--tile", type=int, default=None, help=f"latent tile edge (default {DEFAULT_TILE_CUDA} on CUDA, {DEFAULT_TILE} on CPU; 0: untiled)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--no-ssim", action="store_true", help="skip SSIM (faster)")
    p.add_argument("--no-pictures", action="store_true", help="skip the per-case pictures")
    a = p.parse_args(argv)
    with cli_errors():
        from pipeline.tokenizer import Tokenizer

        kw: dict[str, Any] = {}
        if a.tile is not None:
            kw["tile"] = a.tile or None
        if a.bundle and a.ckpt:
            raise TokenizerError("pass either --bundle or --ckpt, not both")
        if a.bundle:
            tok = Tokenizer.from_bundle(a.bundle, device=a.device, **kw)
        elif a.ckpt:
            tok = Tokenizer.from_checkpoint(a.ckpt, config=a.config, device=a.device, **kw)
        else:
            raise TokenizerError("no model given; pass --ckpt RUN_DIR/ckpts/vqvae_ema0.9999_stepNNNNNNN.pt or --bundle DIR")
        summary = evaluate(tok, a.data_dir, a.out, a.window, a.max_cases, a.cases, ssim=not a.no_ssim, pictures=not a.no_pictures)
        ov = summary["overall"]
        print(
            f"{summary['num_cases']} cases: PSNR body {fmt_value(ov.get('psnr_body'))} dB, SSIM body {fmt_value(ov.get('ssim_body'))}, "
            f"MAE body {fmt_value(ov.get('mae_hu_body'))} HU, codes used {ov.get('codes_used')}, perplexity {fmt_value(ov.get('perplexity'))}"
        )
        print(f"report: {Path(a.out) / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

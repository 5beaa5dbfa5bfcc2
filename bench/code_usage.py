"""Which codes a trained ctvq uses on which scans: do the held-out scans reach fewer codes than
scans the model was trained on, and which codes does no scan use?

Each ``--run NAME=DIR`` (a ctvq run folder with ``ckpts/``, e.g. ``--work/ctvq/stage2`` of
``bench/quality.py``) encodes every case of ``--train`` and ``--eval`` (in the window the run was
trained on) and counts its codes (the first level's, for a residual quantizer). Per run the table
gives: the held-out scans' codes used and perplexity (pooled); the training scans' (pooled); the
codes used by training scans holding about as many tokens as the held-out ones (median over every
set of training scans with 0.8-1.25x the held-out tokens: what a scan the model was trained on
reaches, so a held-out figure below it is a content gap, one near it a per-scan limit), and by sets
holding twice and four times as many (what a larger held-out set would reach, by the same measure);
and the codes no training scan uses. A second table sorts the codes by their share of the training
tokens (in multiples of the average code's): how many codes each band holds, how many of those the
held-out scans leave unused, on how many training scans they appear and what share of the training
tokens they hold; it shows whether what a new scan misses is rare on the training scans too (an uneven
book) or common there (a content gap). The JSON adds every scan's tokens and codes, and per training scan
the share of its tokens on codes no held-out scan uses. The code counts go to a ``.npz`` beside it
(keys ``RUN|train|CASE`` and ``RUN|eval|CASE``, the run's settings under ``__meta__``), which
``--counts`` analyses again without a model.

    python bench/code_usage.py --run shipped=/tmp/q/ctvq/stage2 --run codebook=/tmp/q/ctvq/stage1 \\
        --train TRAIN --eval EVAL --out bench/results/code_usage.json
    python bench/code_usage.py --counts bench/results/code_usage.npz --out /tmp/again.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as C  # noqa: E402
from pipeline.io_utils import save_text  # noqa: E402

#: training-scan sets counted as "as many tokens" as the held-out scans: this range of their total
ALIKE = (0.8, 1.25)
#: larger training-scan sets, in multiples of the held-out tokens (each the same ALIKE range around it)
LARGER = (2, 4)
#: at most this many training scans are enumerated in every combination (random sets beyond)
ENUMERATE_UP_TO = 16
#: upper edges of the bands of a code's training tokens, in multiples of the average code's (0: unused)
SHARE_BANDS = (0.0, 0.05, 0.2, 0.5, 1.0, 3.0, float("inf"))

COLUMNS = [("run", "run"), ("eval_codes_used", "held-out: codes used"), ("eval_perplexity", "held-out: perplexity"),
           ("train_codes_used", "training: codes used"), ("train_perplexity", "training: perplexity"),
           ("alike_codes_used", "training scans of as many tokens: codes used (median, range)"),
           ("larger_codes_used", f"of {' / '.join(f'{t}x' for t in LARGER)} the tokens: codes used (median)"),
           ("unused_in_training", "codes no training scan uses")]
BAND_COLUMNS = [("run", "run"), ("band", "training tokens on the code (x the average code's)"), ("codes", "codes"),
                ("eval_unused", "of them unused on the held-out scans"),
                ("median_scans", "training scans using them (median)"), ("train_share", "share of the training tokens")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                   help="a ctvq run folder (with ckpts/) to count, under NAME (letters, digits, - and _)")
    p.add_argument("--train", type=Path, help="processed training folder (./run.sh preprocess output)")
    p.add_argument("--eval", type=Path, help="processed held-out folder")
    p.add_argument("--counts", type=Path, help="analyse the code counts an earlier run saved (.npz) instead of encoding")
    C.add_common_args(p, "code_usage")
    args = p.parse_args(argv)
    encoding = bool(args.run or args.train or args.eval)
    if args.counts is not None and encoding:
        p.error("--counts analyses saved counts; leave out --run, --train and --eval with it")
    if args.counts is None and not (args.run and args.train and args.eval):
        p.error("give --run NAME=DIR (one or more), --train and --eval, or --counts FILE.npz")
    args.runs = {}
    for item in args.run:
        name, sep, folder = item.partition("=")
        if not sep or not folder or re.fullmatch(r"[A-Za-z0-9_-]+", name) is None:
            p.error(f"--run {item!r} is not NAME=DIR (NAME of letters, digits, - and _), e.g. --run shipped=/tmp/q/ctvq/stage2")
        if name in args.runs:
            p.error(f"--run {name} is given twice; give each run its own NAME")
        args.runs[name] = Path(folder)
    return args


def count_codes(runs: dict[str, Path], folders: dict[str, Path], device: torch.device) -> dict[str, np.ndarray]:
    """``{"RUN|SPLIT|CASE": counts [K]}`` of every case of every folder, encoded by every run (every run
    and folder checked first, so a mistake ends the script before any scan is encoded)."""
    from pipeline.evaluate import find_cases, level_codes
    from pipeline.infer import Tokenizer
    from pipeline.io_utils import CheckpointError, TokenizerError
    from pipeline.processed import case_geometry, load_case

    for split, data_dir in folders.items():
        if not data_dir.is_dir():
            raise SystemExit(f"code_usage: --{split} {data_dir} is not a folder; pass a ./run.sh preprocess output folder")
    plan = {}
    for name, run in runs.items():
        try:
            tok = Tokenizer.from_checkpoint(run, device=device)
        except (CheckpointError, TokenizerError, FileNotFoundError) as e:
            raise SystemExit(f"code_usage: --run {name}={run}: no trained run there ({' '.join(str(e).split(';')[0].split())}); "
                             "pass a run folder of ./run.sh train (it holds config.json and ckpts/)") from None
        try:
            cases_of = {split: find_cases(data_dir, tok.window, tok.resolution) for split, data_dir in folders.items()}
        except ValueError as e:
            raise SystemExit(f"code_usage: run {name}: {' '.join(str(e).split())}") from None
        for split, cases in cases_of.items():
            if not cases:
                raise SystemExit(f"code_usage: --{split} {folders[split]} holds no complete case with the {tok.window.name} "
                                 f"window at {tok.resolution}^3 that run {name} was trained on; preprocess it with that window")
        plan[name] = (tok, cases_of)
    counts = {}
    for name, (tok, cases_of) in plan.items():
        for split, cases in cases_of.items():
            for case in cases:
                data = load_case(case)
                tokens = tok.encode_arrays(data["window"], data["mask"], **case_geometry(data["info"]))
                first = level_codes(tokens.indices)
                key = f"{name}|{split}|{case['case']}"
                counts[key] = np.bincount(first, minlength=tok.num_embeddings)
                print(f"{key}: {int((counts[key] > 0).sum())} codes of {len(first)} tokens", flush=True)
    return counts


def alike_sets(tokens: dict[str, int], target: int, seed: int = 0) -> list[tuple[str, ...]]:
    """Sets of scans (names of ``tokens``) holding ``ALIKE`` times ``target`` tokens in all: every
    combination of up to ``ENUMERATE_UP_TO`` scans, random sets of more."""
    names = sorted(tokens)
    lo, hi = ALIKE[0] * target, ALIKE[1] * target
    if len(names) <= ENUMERATE_UP_TO:
        candidates = (s for r in range(1, len(names) + 1) for s in itertools.combinations(names, r))
    else:
        rng = np.random.default_rng(seed)
        candidates = (tuple(sorted(rng.choice(names, int(rng.integers(1, len(names) + 1)), replace=False)))
                      for _ in range(4096))
    return sorted({s for s in candidates if lo <= sum(tokens[n] for n in s) <= hi})


def share_bands(train_scans: dict[str, np.ndarray], eval_unused: np.ndarray) -> list[dict]:
    """The codes in bands of their training tokens (``SHARE_BANDS``, multiples of the average code's):
    per band its upper edge (None: no edge), the codes in it, those unused on the held-out scans, the
    median number of training scans using them and their share of the training tokens."""
    per_scan = np.stack(list(train_scans.values()))
    pooled = per_scan.sum(0)
    relative = pooled / max(1.0, pooled.sum() / pooled.size)
    bands, lower = [], -1.0
    for upper in SHARE_BANDS:
        inside = (relative > lower) & (relative <= upper) if upper > 0 else relative == 0
        bands.append({"upto": None if upper == float("inf") else upper, "codes": int(inside.sum()),
                      "eval_unused": int((inside & eval_unused).sum()),
                      "median_scans": float(np.median((per_scan[:, inside] > 0).sum(0))) if inside.any() else 0.0,
                      "train_share": float(pooled[inside].sum() / max(1, pooled.sum()))})
        lower = upper
    return bands


def analyse(counts: dict[str, np.ndarray], seed: int = 0) -> dict[str, dict]:
    """Per run: pooled usage of the held-out and of the training scans, the codes of training scans
    holding about as many tokens as the held-out ones, every scan's figures, and each training scan's
    share of tokens on codes the held-out scans leave unused."""
    from networks.quantizer import perplexity_of

    out = {}
    for run in dict.fromkeys(key.split("|", 1)[0] for key in counts):
        scans = {split: {key.split("|", 2)[2]: c for key, c in counts.items() if key.startswith(f"{run}|{split}|")}
                 for split in ("train", "eval")}
        if not scans["train"] or not scans["eval"]:
            raise SystemExit(f"code_usage: run {run} has no {'training' if not scans['train'] else 'held-out'} scans "
                             "in the counts; count both folders")
        pooled = {split: sum(scans[split].values()) for split in scans}
        usage = {split: perplexity_of(torch.as_tensor(pooled[split], dtype=torch.float64)) for split in pooled}
        unused = pooled["eval"] == 0
        train_tokens = {case: int(c.sum()) for case, c in scans["train"].items()}

        def codes_of_sets(times: int) -> list[int]:
            sets = alike_sets(train_tokens, times * int(pooled["eval"].sum()), seed)
            return [int((sum(scans["train"][n] for n in s) > 0).sum()) for s in sets]

        alike = codes_of_sets(1)
        larger = {str(times): codes_of_sets(times) for times in LARGER}
        out[run] = {"codebook": int(unused.size), "eval_tokens": int(pooled["eval"].sum()),
                    "eval_codes_used": usage["eval"]["codes_used"], "eval_perplexity": usage["eval"]["perplexity"],
                    "train_tokens": int(pooled["train"].sum()), "train_codes_used": usage["train"]["codes_used"],
                    "train_perplexity": usage["train"]["perplexity"],
                    "alike_sets": len(alike), "alike_codes_used": [int(np.median(alike)), min(alike), max(alike)] if alike else None,
                    "larger_codes_used": {times: [int(np.median(c)), min(c), max(c), len(c)] if c else None
                                          for times, c in larger.items()},
                    "unused_in_training": int((pooled["train"] == 0).sum()),
                    "by_training_share": share_bands(scans["train"], unused),
                    "scans": {split: {case: {"tokens": int(c.sum()), "codes_used": int((c > 0).sum())}
                                      for case, c in scans[split].items()} for split in scans},
                    "train_share_on_eval_unused": {case: float(c[unused].sum() / max(1, c.sum()))
                                                   for case, c in scans["train"].items()}}
    return out


def display_row(run: str, r: dict) -> dict:
    def pct(n: int) -> str:
        return f"{n} ({100 * n / r['codebook']:.0f} %)"

    alike = r["alike_codes_used"]
    return {"run": run, "eval_codes_used": pct(r["eval_codes_used"]), "eval_perplexity": f"{r['eval_perplexity']:.0f}",
            "train_codes_used": pct(r["train_codes_used"]), "train_perplexity": f"{r['train_perplexity']:.0f}",
            "alike_codes_used": (f"{pct(alike[0])}, {alike[1]}-{alike[2]} ({r['alike_sets']} set{'s' if r['alike_sets'] > 1 else ''})"
                                 if alike else "no such set"),
            "larger_codes_used": " / ".join(pct(c[0]) if c else "no such set" for c in r["larger_codes_used"].values())
                                 if "larger_codes_used" in r else "n/a",
            "unused_in_training": pct(r["unused_in_training"])}


def band_rows(run: str, r: dict) -> list[dict]:
    """The rows of the second table: one per band of ``r["by_training_share"]``."""
    rows, lower = [], None
    for band in r["by_training_share"]:
        upper = band["upto"]
        name = "0" if upper == 0 else f"> {lower:g}" if upper is None else f"{lower:g}-{upper:g}"
        rows.append({"run": run, "band": name, "codes": band["codes"], "eval_unused": band["eval_unused"],
                     "median_scans": f"{band['median_scans']:g}", "train_share": f"{100 * band['train_share']:.1f} %"})
        lower = upper
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.counts is not None:
        try:
            with np.load(args.counts) as saved:
                counts = {key: saved[key] for key in saved.files if key != "__meta__"}
                meta = json.loads(str(saved["__meta__"])) if "__meta__" in saved.files else {}
        except (OSError, ValueError, AttributeError) as e:
            raise SystemExit(f"code_usage: --counts {args.counts}: not counts this script saved ({type(e).__name__}); "
                             "pass the .npz written beside an earlier --out") from None
    else:
        device = C.resolve_device(args.device)
        torch.backends.cudnn.benchmark = False  # ctvq's tiles change shape: no per-shape tuning
        counts = count_codes(args.runs, {"train": args.train, "eval": args.eval}, device)
        meta = {"env": C.env_info(device), "run_folders": args.runs, "train_dir": args.train, "eval_dir": args.eval}
        meta = json.loads(json.dumps(meta, default=C.jsonable))
        npz = args.out.with_suffix(".npz")
        npz.parent.mkdir(parents=True, exist_ok=True)
        partial = npz.with_name(npz.name + ".partial")
        with open(partial, "wb") as f:  # written under a temporary name, then renamed
            np.savez_compressed(f, __meta__=np.array(json.dumps(meta)), **counts)
        partial.replace(npz)
    results = analyse(counts, args.seed)
    C.write_json(args.out, {**meta, **({"counts": str(args.counts)} if args.counts else {}), "runs": results})
    table = C.markdown_table([display_row(run, r) for run, r in results.items()], COLUMNS)
    table += "\n\n" + C.markdown_table([row for run, r in results.items() for row in band_rows(run, r)], BAND_COLUMNS)
    save_text(args.out.with_suffix(".md"), table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()

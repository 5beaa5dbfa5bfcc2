"""Token quality at equal GPU time: ctvq against MONAI ``VQVAE``, scored on whole scans neither saw.

ctvq is trained by the shipped recipe (``bundles/ct_vqvae/stage0.json`` -> ``stage1.json`` ->
``stage2.json``, through ``pipeline.train`` like ``./run.sh train``), every training case used
(``num_val=0``), the minutes shared between the stages by ``--stage-split``. MONAI ``VQVAE`` (the
benchmarks' 8x, 8192 x 32 config) is trained on dense ``--crop``^3 crops of the window times the
body mask, batch 2, L1 plus its VQ loss, AdamW 1e-4, fp16, for as long as ctvq's stages took in all
(stage 1's codebook refit, which runs after its minutes, included), or ``--minutes`` without ctvq. Both models then encode and decode each
whole evaluation scan, scored by ``pipeline.metrics`` (PSNR/SSIM and MAE inside the body, per-organ
MAE where labels exist, codes used and perplexity over the tokens of cells holding body voxels (of
the first level for ``vq_depth`` > 1; each level's under ``"per_depth"``), tokens per scan); ctvq also decodes its continuous latents with the quantiser left out (PSNR and
MAE ``*_unquantized``: what quantisation costs against what the autoencoder loses). Writes a JSON
(``"ctvq"``, ``"monai_vqvae"``, ``"env"``), a Markdown table beside it and one picture per case
(input, then each model: ctvq, its variants, VQVAE, with its error).

Trained weights stay in ``--work``; a model that finished there is evaluated again without
training (delete its folder to train it anew). A stage 1 too short for its k-means (smoke runs) lets
stage 2 train the codebook (``frozen_parts ["Encoder"]``), and says so.

    python bench/quality.py --train DIR --eval DIR --minutes 4 [--window lung] [--out FILE.json]
    python bench/quality.py --train DIR --eval DIR --minutes 0.2 --small --device cpu   # smoke run
    python bench/quality.py ... --variant fsq:network_def#vq_type='"fsq"' --variant d4:network_def#vq_depth=4

Each ``--variant NAME:KEY=VALUE`` trains one more ctvq with that override on top of the shipped
recipe (repeat a NAME to give it several), for the same minutes, into ``--work/ctvq_NAME``; the
JSON gets ``"variants": {NAME: {...}}`` with the fields of ``"ctvq"``, the table a row each. An
override ``stageN:KEY=VALUE`` applies to stage N only, e.g. ``--variant
joint:stage2:'frozen_parts=[]'`` (stage 2 trains the encoder and the codebook too, not only the decoder).
A variant whose overrides leave its first stages as ``ctvq``'s starts from ``ctvq``'s runs of those
stages instead of training them again (``"shared_stages"`` in the JSON, e.g. ``[0, 1]`` for a
``stage2:`` override): every model still has the same minutes of training, the run spends only the
variant's own stages' minutes on it, and the comparison is of the stage that differs, free of the
spread between two stage-0 runs. ``--work`` records each model's settings (with a digest of the
bundle configs): a model trained with others is refused, not reported under this run's name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common as C  # noqa: E402

BUNDLE = ROOT / "bundles" / "ct_vqvae"
METRICS = ("psnr_body", "ssim_body", "mae_hu_body", "codes_used", "perplexity", "tokens")
COLUMNS = [("model", "model"), ("psnr_body", "PSNR body (dB)"), ("ssim_body", "SSIM body"),
           ("mae_hu_body", "MAE body (HU)"), ("psnr_body_unquantized", "PSNR body, quantiser left out (dB)"), ("codes_used", "codes used"), ("perplexity", "perplexity"),
           ("tokens", "tokens per scan"), ("train_steps", "steps"), ("train_seconds", "training (s)")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, type=Path, help="processed training folder (./run.sh preprocess output)")
    p.add_argument("--eval", required=True, type=Path, help="processed evaluation folder (whole scans, never trained on)")
    p.add_argument("--minutes", required=True, type=float, help="training time of each model")
    p.add_argument("--small", action="store_true",
                   help=f"tiny models (CPU smoke run; --out defaults to {C.scratch_dir() / 'quality.json'})")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to train and evaluate on (default: cuda when available, else cpu)")
    p.add_argument("--window", default="lung", help="window both models learn (default lung)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON result; a Markdown table and the pictures go beside it (default: "
                        f"bench/results/quality.json; with --small {C.scratch_dir() / 'quality.json'}, outside "
                        "the repository)")
    p.add_argument("--work", type=Path, help="run folders and weights (default: <out stem>_work/ beside --out)")
    p.add_argument("--stage-split", default="0.6,0.05,0.35",
                   help="shares of --minutes for ctvq's stages 0, 1, 2 (default 0.6,0.05,0.35)")
    p.add_argument("--ctvq-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every ctvq stage (e.g. network_def#vq_depth=4), or for one "
                        "stage as stageN:KEY=VALUE (e.g. 'stage2:frozen_parts=[]')")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="train and score one more ctvq with this override (repeat NAME for several overrides)")
    p.add_argument("--models", nargs="+", default=["ctvq", "monai_vqvae"], choices=["ctvq", "monai_vqvae"],
                   help="models to train and score (default both; variants are ctvq models)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default: up to 8, the CPUs there are)")
    p.add_argument("--crop", type=int, default=128, help="VQVAE crop edge (default 128)")
    p.add_argument("--train-only", action="store_true", help="train (or keep) the models, evaluate later")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = (C.scratch_dir() if args.small else C.RESULTS_DIR) / "quality.json"
    args.work = args.work or args.out.with_suffix("").parent / (args.out.stem + "_work")
    args.split = [float(s) for s in args.stage_split.split(",")]
    if len(args.split) != 3 or abs(sum(args.split) - 1) > 1e-6:
        p.error(f"--stage-split {args.stage_split!r} needs three shares that sum to 1, e.g. 0.45,0.1,0.45")
    if args.workers is None:
        args.workers = min(8, len(os.sched_getaffinity(0)))
    args.variants = {}
    for item in args.variant:
        name, sep, override = item.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or "=" not in override:
            p.error(f"--variant {item!r} is not NAME:KEY=VALUE (NAME of letters, digits, - and _), "
                    "e.g. d4:network_def#vq_depth=4")
        args.variants.setdefault(name, []).append(override)
    return args


def resolution_of(data_dir: Path) -> int:
    from pipeline.dataset import find_datasets

    found = find_datasets(data_dir)
    if not found:
        raise SystemExit(f"quality: {data_dir} holds no processed dataset; run ./run.sh preprocess RAW {data_dir} first")
    return int(json.loads((found[0] / "dataset_config.json").read_text()).get("resolution", 512))


# ------------------------------------------------------------------------------------------ ctvq
def _finished(run: Path) -> tuple[int, float] | None:
    """(steps, training seconds) from a stage's log, or None when it did not finish."""
    log = run / "log.txt"
    hits = re.findall(r"Training finished: (\d+) steps, ([\d.]+) s", log.read_text()) if log.is_file() else []
    return (int(hits[-1][0]), float(hits[-1][1])) if hits else None


def ctvq_models(args) -> dict[str, list[str]]:
    """ctvq models of this run: ``{"ctvq": shared overrides, "ctvq_NAME": shared + variant's}``."""
    models = {"ctvq": list(args.ctvq_override)}
    for name, extra in args.variants.items():
        models[f"ctvq_{name}"] = [*args.ctvq_override, *extra]
    return models


def stage_overrides(overrides: list[str], stage: int) -> list[str]:
    """The overrides that apply to ``stage``: all but those of the form ``stageN:KEY=VALUE`` for another N."""
    out = []
    for item in overrides:
        only, sep, rest = item.partition(":")
        if not sep or re.fullmatch(r"stage[012]", only) is None:
            out.append(item)
        elif only == f"stage{stage}":
            out.append(rest)
    return out


def shared_stages(overrides: list[str], base: list[str]) -> int:
    """How many leading stages a model with ``overrides`` trains exactly as the one with ``base``."""
    return next((s for s in range(3) if stage_overrides(overrides, s) != stage_overrides(base, s)), 3)


def train_ctvq(args, resolution: int, device: torch.device, name: str = "ctvq", overrides: list[str] | None = None) -> dict:
    """Train (or find finished in ``--work/name``) one ctvq through the shipped stage configs; the
    leading stages a variant trains exactly as ``ctvq`` does are ``ctvq``'s own folders (trained first)."""
    from pipeline import train
    from pipeline.runs import STAGE1_WITHOUT_KMEANS, find_checkpoint, stage2_codebook_overrides

    common = ["--data_dir", str(args.train), "--override", f'window_type="{args.window}"',
              "--override", "dataset#args#num_val=0", "--override", f"network_def#resolution={resolution // 8}",
              "--override", f"num_workers={args.workers}", "--override", f"seed={args.seed}"]
    for key in ("max_steps", "i_save", "i_val", "i_sample"):
        common += ["--override", f"{key}=100000000"]
    overrides = list(args.ctvq_override if overrides is None else overrides)
    shared = 0 if name == "ctvq" else shared_stages(overrides, list(args.ctvq_override))
    config_files = [BUNDLE / f"stage{s}.json" for s in range(3)] + ([BUNDLE / "demo.json"] if args.small else [])
    settings = {"minutes": args.minutes, "stage_split": args.split, "ctvq_override": overrides,
                "window": args.window, "small": args.small, "train": str(args.train), "seed": args.seed,
                "shared_stages": list(range(shared)),  # a model trained from its own earlier stages is another model
                "configs": hashlib.sha256(b"".join(f.read_bytes() for f in config_files)).hexdigest()[:16]}
    home = args.work / name
    record = home / "settings.json"
    if record.is_file() and json.loads(record.read_text()) != settings:
        raise SystemExit(f"quality: {record.parent} was trained with other settings ({record.read_text().strip()}); "
                         "pass another --work or delete that folder")
    C.write_json(record, settings)
    steps, seconds, folders = [], [], []
    for stage, share in enumerate(args.split):
        run = (args.work / "ctvq" if stage < shared else home) / f"stage{stage}"
        folders.append(run)
        done = _finished(run)
        if done is None:
            configs = ["--config", str(BUNDLE / f"stage{stage}.json")]
            if args.small:
                configs += ["--config", str(BUNDLE / "demo.json")]
            extra = []
            if stage == 1:
                extra = ["--override", f'pretrained_vae_path="{find_checkpoint(folders[0], weights="model")}"']
            elif stage == 2:
                unfrozen = stage2_codebook_overrides(folders[1])  # minutes too short for stage 1's k-means
                if unfrozen:
                    print(f"{name}: {STAGE1_WITHOUT_KMEANS}", flush=True)
                extra = ["--load_dir", str(folders[1]), "--ckpt", "latest", *unfrozen]
            for item in stage_overrides(overrides, stage):
                extra += ["--override", item]
            argv = [*configs, "--output_dir", str(run), *common, "--override", f"max_minutes={args.minutes * share}", *extra]
            print(f"{name} stage {stage}: {args.minutes * share:.2f} min", flush=True)
            if train.main(argv) != 0:
                raise SystemExit(f"quality: {name} stage {stage} failed; see {run / 'log.txt'}")
            done = _finished(run)
            if done is None:
                raise SystemExit(f"quality: {name} stage {stage} wrote no 'Training finished' line; see {run / 'log.txt'}")
        steps.append(done[0])
        seconds.append(done[1])
    refits = [re.findall(r"codebook refitted by k-means .* in ([\d.]+) s", (run / "log.txt").read_text()) for run in folders]
    refit = [float(found[-1]) for found in refits if found]
    return {"run": folders[2], "train_steps": sum(steps), "train_seconds": sum(seconds),
            "stage_steps": steps, "stage_seconds": seconds, "overrides": overrides,
            "shared_stages": list(range(shared)), "refit_seconds": sum(refit) if refit else None}


# ----------------------------------------------------------------------------------- MONAI VQVAE
class DenseCrops(torch.utils.data.IterableDataset):
    """Endless random ``crop``^3 crops of the window times the body mask, centred on the support."""

    def __init__(self, data_dir: Path, window: str, crop: int, resolution: int, seed: int):
        from pipeline.dataset import CTWindowSparseDataset

        self.ds = CTWindowSparseDataset(data_dir, window_type=window, split="all", max_points=crop**3, seed=seed)
        self.crop, self.resolution, self.seed = min(crop, resolution), resolution, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng(self.seed + (info.id if info else 0))
        res = self.resolution
        while True:
            i = int(rng.integers(len(self.ds)))
            box = self.ds.crop_box(i, int(rng.integers(2**31)))
            centre = [(box[a] + box[a + 3]) // 2 for a in range(3)]
            lo = [min(max(0, c - self.crop // 2), res - self.crop) for c in centre]
            win, mask = self.ds.load_region(i, [*lo, *(v + self.crop for v in lo)])
            vol = win if mask is None else win * mask
            yield torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None]


def train_vqvae(args, resolution: int, device: torch.device, seconds: float) -> dict:
    work = args.work / "monai_vqvae"
    weights = work / "model.pt"
    if (work / "train.json").is_file() and weights.is_file():
        return {**json.loads((work / "train.json").read_text()), "weights": weights}
    C.seed_all(args.seed)
    torch.backends.cudnn.benchmark = True  # one crop shape throughout
    model = C.build_vqvae(args.small, device)
    crops = DenseCrops(args.train, args.window, args.crop, resolution, args.seed)
    loader = torch.utils.data.DataLoader(crops, batch_size=2, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    opt = C.adamw(model.parameters(), 1e-4, device)
    amp = device.type == "cuda"
    scaler = C.grad_scaler(device, amp)
    budget, steps, started = seconds, 0, None
    print(f"monai_vqvae: {seconds:.1f} s", flush=True)
    model.train()
    for x in loader:
        x = x.to(device, non_blocking=True)
        with C.autocast(device, amp):
            recon, q_loss = model(x)
            loss = torch.nn.functional.l1_loss(recon.float(), x) + q_loss.float()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        steps += 1
        now = time.perf_counter()
        started = started or now  # like ctvq's trainer: the clock starts after the first step
        if now - started >= budget:
            break
    C.sync(device)
    torch.backends.cudnn.benchmark = False
    result = {"train_steps": steps, "train_seconds": time.perf_counter() - started}
    work.mkdir(parents=True, exist_ok=True)
    from pipeline.handlers import save_torch

    save_torch(model.state_dict(), weights)
    C.write_json(work / "train.json", result)
    return {**result, "weights": weights}


@torch.no_grad()
def vqvae_reconstruct(model, target: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Whole-volume reconstruction and the code index of every latent cell."""
    x = torch.from_numpy(target)[None, None].to(device)
    with C.autocast(device, device.type == "cuda"):
        idx = model.index_quantize(x)
        recon = model.decode_samples(idx)
    return recon[0, 0].float().clamp(0, 1).cpu().numpy(), idx[0].cpu().numpy()


# ------------------------------------------------------------------------------------ evaluation
def body_cells(mask: np.ndarray, factor: int = 8) -> np.ndarray:
    """Latent cells holding any body voxel (the cells ctvq makes tokens of), as a boolean grid."""
    r = mask.shape[0] // factor
    return mask.reshape(r, factor, r, factor, r, factor).any(axis=(1, 3, 5))


def evaluate_models(args, trained: dict[str, dict], device: torch.device, resolution: int) -> dict:
    """Score every trained model (``{name: train result}``; ctvq models have a ``"run"``) on the
    whole evaluation scans; ``{name: means, usage, training figures and per-case rows}``."""
    from pipeline.evaluate import depth_metrics, find_cases, level_codes, per_depth_summary
    from pipeline.infer import Tokenizer
    from pipeline.metrics import codebook_usage, volume_metrics
    from pipeline.processed import case_geometry, load_case
    from pipeline.visualize import save_three_plane
    from transforms import parse_window

    toks = {name: Tokenizer.from_checkpoint(t["run"], device=device) for name, t in trained.items() if "run" in t}
    codebook = {name: tok.num_embeddings for name, tok in toks.items()}
    net = None
    if "monai_vqvae" in trained:
        net = C.build_vqvae(args.small, device)
        net.load_state_dict(torch.load(trained["monai_vqvae"]["weights"], map_location=device, weights_only=True))
        net.eval()
        codebook["monai_vqvae"] = int(net.num_embeddings)
    window = parse_window(args.window)
    cases = find_cases(args.eval, args.window, resolution)
    if not cases:
        raise SystemExit(f"quality: {args.eval} holds no complete case with the {args.window} window")
    rows = {name: [] for name in trained}
    indices = {name: [] for name in trained}
    depth_rows = {name: [] for name in toks}
    pictures = args.out.parent / f"{args.out.stem}_pictures"
    for case in cases:
        data = load_case(case)
        win, mask = data["window"], data["mask"]
        target = np.where(mask, win, 0.0).astype(np.float32)
        recons = {}
        unquantized = {}
        for name, tok in toks.items():
            tokens = tok.encode_arrays(win, mask, **case_geometry(data["info"]))
            recons[name] = tok.decode(tokens)
            indices[name].append(np.asarray(tokens.indices))
            depth_rows[name] += depth_metrics(tok, tokens, recons[name], target, mask, case["case"])
            m = volume_metrics(tok.reconstruct_unquantized(win, mask), target, window, mask, ssim=False, device=device)
            unquantized[name] = {"psnr_body_unquantized": m["psnr_body"], "mae_hu_body_unquantized": m["mae_hu_body"]}
        if net is not None:
            recon, idx = vqvae_reconstruct(net, target, device)
            recons["monai_vqvae"] = recon
            indices["monai_vqvae"].append(idx[body_cells(mask)])
        for name, recon in recons.items():
            m = volume_metrics(recon, target, window, mask, data["labels"], case["organ_mapping"] or None, device=device)
            use = codebook_usage(level_codes(indices[name][-1]), codebook[name])
            tokens_per_scan = len(indices[name][-1]) if name in toks else int(np.prod(body_cells(mask).shape))
            rows[name].append({"case": case["case"], **{k: m.get(k) for k in METRICS[:3]},
                               "organ_mae_hu": m.get("organ_mae_hu"), "codes_used": use["codes_used"],
                               "perplexity": use["perplexity"], "tokens": tokens_per_scan, **unquantized.get(name, {})})
            print(f"{name} {case['case']}: PSNR body {m['psnr_body']:.2f} dB, MAE {m['mae_hu_body']:.1f} HU", flush=True)
        save_three_plane(pictures / f"{case['case'].replace('/', '__')}.png", target, recons, mask=mask, title=case["case"])
    out = {}
    for name, result in trained.items():
        pooled = codebook_usage(np.concatenate([level_codes(i) for i in indices[name]]) if indices[name] else np.zeros(0, int),
                                codebook[name])
        mean = {m: float(np.mean([r[m] for r in rows[name]])) for m in METRICS[:3]}
        out[name] = {**mean, "codes_used": pooled["codes_used"], "codebook_usage": pooled["usage"],
                     "perplexity": pooled["perplexity"], "tokens": float(np.mean([r["tokens"] for r in rows[name]])),
                     "train_steps": result["train_steps"], "train_seconds": result["train_seconds"],
                     "cases": rows[name]}
        if name in toks:
            for key in ("psnr_body_unquantized", "mae_hu_body_unquantized"):
                out[name][key] = float(np.mean([r[key] for r in rows[name]]))
            out[name]["stage_steps"] = result["stage_steps"]
            out[name]["stage_seconds"] = result["stage_seconds"]
            out[name]["overrides"] = result["overrides"]
            out[name]["shared_stages"] = result["shared_stages"]
            out[name]["refit_seconds"] = result.get("refit_seconds")
            out[name]["per_depth"] = per_depth_summary(depth_rows[name], indices[name], codebook[name])
    return out


def display_row(name: str, result: dict) -> dict:
    """One table row, numbers rounded for reading."""
    digits = {"psnr_body": 2, "ssim_body": 3, "mae_hu_body": 1, "psnr_body_unquantized": 2, "perplexity": 0, "tokens": 0,
              "train_seconds": 0}
    row = {"model": name, **result}
    for key, n in digits.items():
        if isinstance(row.get(key), (int, float)):
            row[key] = f"{row[key]:.{n}f}"
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = C.resolve_device(args.device)
    # fixed-shape dense models tune cuDNN per shape (VQVAE turns it on); ctvq's shapes change every step
    torch.backends.cudnn.benchmark = False
    resolution = resolution_of(args.train)
    if resolution_of(args.eval) != resolution:
        raise SystemExit("quality: --train and --eval were preprocessed at different resolutions; use one --resolution")
    trained = {}
    if "ctvq" in args.models:
        for name, overrides in ctvq_models(args).items():
            trained[name] = train_ctvq(args, resolution, device, name, overrides)
    if "monai_vqvae" in args.models:
        # the same GPU time as ctvq's stages, whose clock does not stop for the codebook refit
        seconds = max(args.minutes * 60.0, trained["ctvq"]["train_seconds"] if "ctvq" in trained else 0.0)
        trained["monai_vqvae"] = train_vqvae(args, resolution, device, seconds)
    if args.train_only:
        return {}
    results = evaluate_models(args, trained, device, resolution)
    variants = {name[len("ctvq_"):]: results.pop(name) for name in list(results) if name.startswith("ctvq_")}
    payload = {**results, "env": C.env_info(device), "minutes": args.minutes, "window": args.window,
               "train_dir": args.train.name, "eval_dir": args.eval.name, "resolution": resolution,
               "stage_split": args.split, "ctvq_overrides": args.ctvq_override, "small": args.small}
    if variants:
        payload["variants"] = variants
    rows = [display_row(k, v) for k, v in results.items() if k == "ctvq"]
    rows += [display_row(f"ctvq {k} ({'; '.join(args.variants[k])})", v) for k, v in variants.items()]
    rows += [display_row(k, v) for k, v in results.items() if k != "ctvq"]
    C.write_json(args.out, payload)
    table = C.markdown_table(rows, COLUMNS)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return payload


if __name__ == "__main__":
    main()

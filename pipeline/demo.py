"""End-to-end demo (``./run.sh demo``): phantoms (or your scans) -> preprocess -> stages 0, 1, 2 -> evaluate.

::

    python -m pipeline.demo [--raw DIR] [--out demo_output] [--config bundles/ct_vqvae/demo.json]
                            [--resolution 64] [--steps N] [--seeds 0 1 2] [--window soft_tissue]

1. Builds a raw dataset of code-generated CT phantoms (``pipeline.phantom``), or takes ``--raw``.
2. Preprocesses it with ``pipeline.preprocess`` at the reduced resolution of ``demo.json``.
3. Trains stage 0 (autoencoder), stage 1 (codebook, from stage 0) and stage 2 (decoder on
   stage 1's codebook, from stage 1) through the training command line with the ``demo.json`` overlay (tiny model,
   few steps); uses the GPU when present.
4. Evaluates the stage-2 model on the whole scans, exports it as a MONAI bundle, and prints
   where the run folders, TensorBoard logs, sample pictures and the report are.

Everything lives under ``--out``; the ``demo`` block of ``demo.json`` holds the demo's settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEMO_CONFIG", "run_demo", "main"]

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_DIR = ROOT / "bundles" / "ct_vqvae"
DEMO_CONFIG = BUNDLE_DIR / "demo.json"


def _latest(run_dir: Path, ema: bool = False) -> Path:
    from pipeline.runs import find_checkpoint

    return find_checkpoint(run_dir, None, "ema" if ema else "model")


def _train(stage: int, config: Path, out: Path, data: Path, steps: int, extra: Sequence[str], log, threads: int = 1) -> Path:
    run_dir = out / "runs" / f"stage{stage}"
    every = max(1, steps)
    cmd = [
        sys.executable, "-m", "pipeline.train",
        "--config", str(BUNDLE_DIR / f"stage{stage}.json"), "--config", str(config),
        "--output_dir", str(run_dir), "--data_dir", str(data),
        "--override", f"max_steps={steps}",
        "--override", f"i_save={every}",
        "--override", f"i_val={every}",
        "--override", f"i_sample={max(1, steps // 2)}",
        *extra,
    ]
    log(f"\n== stage {stage}: {' '.join(shlex.quote(c) for c in cmd[1:])}")
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=str(ROOT), env=env)
    if r.returncode != 0:
        raise SystemExit(f"demo: stage {stage} training failed (exit {r.returncode}); see {run_dir / 'log.txt'}")
    log(f"== stage {stage} done in {time.perf_counter() - t0:.0f} s")
    return run_dir


def run_demo(
    out: str | os.PathLike = "demo_output",
    raw: str | os.PathLike | None = None,
    config: str | os.PathLike = DEMO_CONFIG,
    resolution: int | None = None,
    steps: int | None = None,
    seeds: Sequence[int] | None = None,
    window: str | None = None,
    phantom_shape: Sequence[int] | None = None,
    log=print,
) -> dict:
    """Run the whole demo; returns the paths it wrote.

    Args:
        out: demo folder (raw/, processed_dataset/, runs/stage{0,1,2}/, eval/, bundle/).
        raw: raw CT folder to use instead of phantoms (layout as for ``./run.sh preprocess``).
        config: the demo overlay (``bundles/ct_vqvae/demo.json``).
        resolution: cube side (default: ``demo.resolution``; the model's latent grid follows it).
        steps: training steps of every stage (default: ``demo.steps`` per stage).
        seeds: phantom seeds (default: ``demo.seeds``).
        window: window to train on (default: ``demo.window``).
        phantom_shape: phantom voxels (default: ``demo.phantom_shape``).
        log: message function.
    """
    from pipeline import preprocess
    from pipeline.evaluate import evaluate
    from pipeline.export import export_bundle
    from pipeline.infer import Tokenizer
    from pipeline.phantom import write_phantom_dataset
    from pipeline.runs import STAGE1_WITHOUT_KMEANS, stage2_codebook_overrides

    t_start = time.perf_counter()
    config = Path(config)
    cfg = json.loads(config.read_text())
    demo = cfg.get("demo", {})
    out = Path(out).resolve()
    if (out / "runs").is_dir() and any((out / "runs").iterdir()):
        raise SystemExit(f"demo: {out} holds an earlier demo (its runs/ has training runs); remove that folder or "
                         "pass another --out")
    resolution = int(resolution or demo.get("resolution", 64))
    if resolution % 8:
        raise SystemExit(f"demo: --resolution {resolution} must be a multiple of 8")
    if raw is not None and not Path(raw).is_dir():  # before anything is written
        raise SystemExit(f"demo: --raw {raw} is not a folder; pass a folder of CT scans (DICOM, NIfTI, NRRD, MHA)")
    out.mkdir(parents=True, exist_ok=True)
    window = window or demo.get("window") or cfg.get("window_type", "soft_tissue")
    stage_steps = {int(k): int(v) for k, v in (demo.get("steps") or {}).items()}
    # the demo's model is tiny: one thread per process; several OpenMP threads on cores that other
    # jobs also use wait for each other and run 10-40x slower
    threads = int(demo.get("threads", 1))
    import torch

    torch.set_num_threads(threads)

    # 1. raw data
    mapping = None
    if raw is None:
        raw_dir = out / "raw"
        seeds = list(seeds if seeds is not None else demo.get("seeds", [0, 1, 2]))
        shape = list(phantom_shape or demo.get("phantom_shape", [96, 96, 72]))
        log(f"== phantoms: seeds {seeds}, {'x'.join(map(str, shape))} voxels -> {raw_dir}")
        write_phantom_dataset(raw_dir, seeds, shape, float(demo.get("phantom_spacing", 4.0)))
        mapping = raw_dir / "organ_mapping.json"
    else:
        raw_dir = Path(raw)
        cand = raw_dir / "organ_mapping.json"
        mapping = cand if cand.is_file() else None

    # 2. preprocess
    data = out / "processed_dataset"
    log(f"== preprocess {raw_dir} -> {data} at {resolution}^3, window {window}")
    summary = preprocess.run(
        raw_dir, data, mapping, num_workers=int(demo.get("preprocess_workers", 0)), resolution=resolution,
        windows=[window], progress=False, log=log,
    )
    log(preprocess.summary_line(summary, data))
    if not summary.get("ok"):
        raise SystemExit(f"demo: no case could be preprocessed from {raw_dir}; see {data}/*/metadata.csv")

    # 3. stages 0, 1, 2 through the training command line
    latent = resolution // 8
    common = ["--override", f"window_type={json.dumps(window)}", "--override", f"network_def#resolution={latent}"]

    def n(stage: int) -> int:
        return int(steps or stage_steps.get(stage, cfg.get("max_steps", 30)))

    def extra(stage: int) -> list[str]:  # demo.stage_overrides: per-stage config values
        over = (demo.get("stage_overrides") or {}).get(str(stage), {})
        return common + [a for k, v in over.items() for a in ("--override", f"{k}={json.dumps(v)}")]

    run0 = _train(0, config, out, data, n(0), extra(0), log, threads)
    run1 = _train(1, config, out, data, n(1), extra(1) + ["--override", f"pretrained_vae_path={json.dumps(str(_latest(run0)))}"],
                  log, threads)
    unfrozen = stage2_codebook_overrides(run1)  # a short --steps: stage 2 runs k-means itself
    if unfrozen:
        log(f"demo: {STAGE1_WITHOUT_KMEANS}; give stage 1 more steps for the shipped recipe")
    run2 = _train(2, config, out, data, n(2), extra(2) + ["--load_dir", str(run1), "--ckpt", "latest", *unfrozen], log, threads)

    # 4. evaluate the stage-2 model on whole scans, export it
    ckpt = _latest(run2, ema=False)
    log(f"\n== evaluate {ckpt}")
    tok = Tokenizer.from_checkpoint(ckpt, tile=int(demo.get("tile", 4)))
    report = evaluate(tok, data, out / "eval", max_cases=demo.get("eval_max_cases"), log=log)
    bundle = export_bundle(run2, out / "bundle" / "ct_vqvae", ckpt=ckpt, eval_summary=report, make_zip=False,
                           overwrite=True)

    paths = {
        "raw": raw_dir,
        "processed": data,
        "runs": [run0, run1, run2],
        "tensorboard": [r / "tb_logs" for r in (run0, run1, run2)],
        "samples": [r / "samples" for r in (run0, run1, run2)],
        "report": out / "eval" / "report.html",
        "bundle": bundle,
    }
    ov = report["overall"]
    log("\n== demo finished in {:.0f} s".format(time.perf_counter() - t_start))
    log(f"raw scans:        {raw_dir}")
    log(f"processed data:   {data}")
    for r in (run0, run1, run2):
        log(f"run folder:       {r}  (ckpts/, samples/, log.txt)")
    log(f"TensorBoard:      tensorboard --logdir {out / 'runs'}")
    log(f"sample pictures:  {', '.join(str(r / 'samples') for r in (run0, run1, run2))}")
    log(f"evaluation:       {paths['report']}  (PSNR body {ov.get('psnr_body') or float('nan'):.2f} dB, "
        f"MAE body {ov.get('mae_hu_body') or float('nan'):.1f} HU)")
    log(f"bundle:           {bundle}")
    log(f"tokens of a scan: ./run.sh encode SCAN tokens.npz --bundle {bundle}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./run.sh demo", description=__doc__.split("\n")[0])
    p.add_argument("--raw", default=None, help="raw CT folder to use instead of generated phantoms")
    p.add_argument("--out", default="demo_output", help="demo folder (default: %(default)s)")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="demo overlay config (default: bundles/ct_vqvae/demo.json)")
    p.add_argument("--resolution", type=int, default=None, help="cube side (default from demo.json)")
    p.add_argument("--steps", type=int, default=None, help="training steps per stage (default from demo.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="phantom seeds (default from demo.json)")
    p.add_argument("--window", default=None, help="window to train (default from demo.json)")
    p.add_argument("--phantom-shape", type=int, nargs=3, default=None, help="phantom voxels X Y Z")
    a = p.parse_args(argv)
    from pipeline.infer import cli_errors

    with cli_errors():
        run_demo(a.out, a.raw, a.config, a.resolution, a.steps, a.seeds, a.window, a.phantom_shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())

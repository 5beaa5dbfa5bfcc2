"""CPU smoke runs of the bench/ scripts: tiny volume, tiny models, one or two timed calls each."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common as C  # noqa: E402
from bench.scan import crop_box, load_scan, make_crop  # noqa: E402
from bench.timing import measure, run_guarded  # noqa: E402

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_cache")


def _ok_or_skipped(rows, allow_skip=("skipped: networks not importable",)):
    for r in rows:
        status = r.get("status", "")
        assert status == "ok" or status.startswith(allow_skip), r


def test_measure_and_table(tmp_path):
    calls = []
    t = measure(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=5)
    assert len(calls) == 7 and t.n == 5 and t.warmup == 2 and t.median_s >= 0 and t.peak_bytes is None
    capped = measure(lambda: __import__("time").sleep(0.02), torch.device("cpu"), warmup=1, repeats=50,
                       max_seconds=0.1, min_repeats=2)
    assert capped.capped and 2 <= capped.n < 50 and capped.label.endswith("(capped)")
    slow = measure(lambda: __import__("time").sleep(0.05), torch.device("cpu"), warmup=3, repeats=20,
                     max_seconds=0.01)
    assert slow.warmup_only and slow.n == 1 and slow.label == "1 (warm-up only)"
    table = C.markdown_table([{"a": 1, "b": "x"}, {"a": 2}], [("a", "A"), ("b", "B")])
    assert table.splitlines() == ["| A | B |", "|---|---|", "| 1 | x |", "| 2 | - |"]
    out = C.write_json(tmp_path / "r" / "x.json", {"t": t, "p": tmp_path})
    assert json.loads(out.read_text())["t"]["n"] == 5
    assert not list(out.parent.glob(".*tmp*"))


def test_failures_become_rows():
    def boom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    assert run_guarded(boom, torch.device("cpu")) == {"status": "OOM"}
    res = run_guarded(lambda: (_ for _ in ()).throw(ValueError("bad shape")), torch.device("cpu"))
    assert res["status"].startswith("error: ValueError: bad shape")


def test_crop_box_is_aligned_and_inside():
    box = crop_box((250, 3, 509), 128, 512)
    assert [(s.start, s.stop) for s in box] == [(184, 312), (0, 128), (384, 512)]
    assert all(s.start % 8 == 0 for s in box)
    with pytest.raises(ValueError, match="larger than"):
        crop_box((0, 0, 0), 64, 32)


def test_phantom_case_layout(cache):
    import argparse

    args = argparse.Namespace(case=None, nifti=None, cache=cache, window="lung", resolution=32, small=True)
    scan = load_scan(args)
    assert scan.window.shape == (32, 32, 32) and scan.body.dtype == bool
    ds_root = scan.case_dir.parent.parent
    cfg = json.loads((ds_root / "dataset_config.json").read_text())
    assert cfg["windows"]["lung"]["file"] == "windows/lung_w1500_l-600.npy"
    assert (scan.case_dir / ".complete").exists() and (ds_root / "metadata.csv").exists()
    crop = make_crop(scan, 16, torch.device("cpu"))
    assert crop.dense.shape == (1, 1, 16, 16, 16) and crop.coords.dtype == torch.int32
    # the sparse view is the dense view's support, in full-grid coordinates
    lo = torch.tensor([s.start for s in crop.box])
    local = crop.coords[:, 1:].long() - lo
    assert torch.equal(crop.dense[0, 0][local[:, 0], local[:, 1], local[:, 2]], crop.feats[:, 0])
    assert int((crop.dense > 0).sum()) <= crop.coords.shape[0]
    assert 0 < crop.occupancy <= 1 and np.isclose(crop.occupancy, crop.coords.shape[0] / 16**3)


@pytest.mark.parametrize("script", ["train_step", "inference", "dataloader", "sparse_ops", "profile_step", "quality", "code_usage",
                                    "codebook_fit"])
def test_help(script, capsys):
    mod = __import__(f"bench.{script}", fromlist=["parse_args"])
    with pytest.raises(SystemExit) as e:
        mod.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--device" in out and "--small" in out and "--out" in out


def _option_help(help_text: str, option: str) -> str:
    """The help of ``option`` in an argparse ``--help`` text, on one line."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(option + " ") or line.strip() == option)
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].strip().startswith("-") or not lines[i].strip()), len(lines))
    return " ".join(" ".join(lines[start:end]).split())


COMMON_SCRIPTS = ["train_step", "inference", "dataloader", "sparse_ops", "profile_step"]


@pytest.mark.parametrize("script", COMMON_SCRIPTS)
def test_small_runs_write_outside_the_repository(script):
    """``--small`` moves ``--out``'s default to $TMPDIR/ctvq_bench (the committed bench/results/ stay as
    they are); full runs keep bench/results/<name>.json, and an explicit --out wins in either order."""
    import tempfile

    mod = __import__(f"bench.{script}", fromlist=["parse_args"])
    assert mod.parse_args([]).out == C.RESULTS_DIR / f"{script}.json"
    small = mod.parse_args(["--small"]).out
    assert small == Path(tempfile.gettempdir()) / "ctvq_bench" / f"{script}.json"
    assert ROOT not in small.resolve().parents
    for argv in (["--small", "--out", "x.json"], ["--out", "x.json", "--small"]):
        assert mod.parse_args(argv).out == Path("x.json")
    assert mod.parse_args(["--out", str(C.RESULTS_DIR / f"{script}.json"), "--small"]).out == \
        C.RESULTS_DIR / f"{script}.json"


@pytest.mark.parametrize("script", COMMON_SCRIPTS)
def test_budget_help_shows_the_scripts_own_default(script, capsys):
    mod = __import__(f"bench.{script}", fromlist=["parse_args"])
    with pytest.raises(SystemExit):
        mod.parse_args(["--help"])
    budget = _option_help(capsys.readouterr().out, "--budget")
    if script in C.BUDGETS:
        assert mod.parse_args([]).default_budget == C.BUDGETS[script]
        assert f"default: {C.BUDGETS[script]:g} on cuda" in budget
        others = [f"{v:g}" for k, v in C.BUDGETS.items() if k != script and v != C.BUDGETS[script]]
        assert not any(f" {o} " in budget for o in others), budget
    else:
        assert "no time budget" in budget


def test_dataloader_help_matches_its_defaults(capsys):
    from bench import dataloader

    assert dataloader.parse_args([]).workers == [1, 2, 4, 8]
    assert "1, 2, 4 and 8" in " ".join(dataloader.__doc__.split())
    with pytest.raises(SystemExit):
        dataloader.parse_args(["--help"])
    case = _option_help(capsys.readouterr().out, "--case")
    assert "compact" in case and "whole dataset" in case
    readme = " ".join((ROOT / "bench" / "README.md").read_text().split())
    assert "1, 2, 4 and 8 DataLoader workers" in readme and "1, 2 and 4 DataLoader workers" not in readme


def test_quality_out_and_help(capsys, tmp_path):
    import tempfile

    from bench import quality

    base = ["--train", str(tmp_path), "--eval", str(tmp_path), "--minutes", "1"]
    full = quality.parse_args(base)
    assert full.out == C.RESULTS_DIR / "quality.json" and full.work == C.RESULTS_DIR / "quality_work"
    small = quality.parse_args([*base, "--small"])
    assert small.out == Path(tempfile.gettempdir()) / "ctvq_bench" / "quality.json"
    assert ROOT not in small.work.resolve().parents
    with pytest.raises(SystemExit):
        quality.parse_args(["--help"])
    out = capsys.readouterr().out
    for opt, default in (("--out", "bench/results/quality.json"), ("--stage-split", "0.6,0.05,0.35"),
                         ("--device", "cuda when available"), ("--seed", "default 0")):
        assert default in _option_help(out, opt), opt
    # its work folder is never committed
    assert "bench/results/*_work/" in (ROOT / ".gitignore").read_text().splitlines()
    # a stageN: override reaches that stage only
    items = ["seed=1", 'stage2:frozen_parts=["Encoder"]', "stage0:learning_rate=0.001"]
    assert quality.stage_overrides(items, 0) == ["seed=1", "learning_rate=0.001"]
    assert quality.stage_overrides(items, 1) == ["seed=1"]
    assert quality.stage_overrides(items, 2) == ["seed=1", 'frozen_parts=["Encoder"]']
    # a variant shares the default's leading stages its overrides leave alone
    assert quality.shared_stages(["stage1:x=1"], []) == 1 and quality.shared_stages(["seed=1"], []) == 0
    assert quality.shared_stages(["stage2:a=1", "stage2:b=2"], ["stage2:a=1"]) == 2
    assert quality.shared_stages(["seed=1"], ["seed=1"]) == 3


def test_train_step_smoke(cache, tmp_path):
    from bench import train_step

    out = tmp_path / "train_step.json"
    payload = train_step.main(["--small", "--device", "cpu", "--crops", "8", "--warmup", "0", "--repeats", "1",
                               "--cache", str(cache), "--resolution", "32", "--budget", "600", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "train_step" and len(data["rows"]) == len(train_step.MODELS)
    assert {r["key"] for r in data["rows"]} == set(train_step.MODELS)
    _ok_or_skipped(data["rows"])
    for r in data["rows"]:
        if r["status"] == "ok":
            assert r["median_s"] > 0 and r["voxels_per_s"] == pytest.approx(8**3 / r["median_s"])
    assert "| model | params | precision | crop |" in payload["table_markdown"]


def test_train_step_variants(cache, tmp_path, capsys):
    """``--variant NAME:KEY=VALUE`` adds a row per ctvq model, built with that argument."""
    from bench import train_step

    args = train_step.parse_args(["--variant", "w2:window_size=2", "--variant", "w2:vq_entropy_rows=64"])
    assert args.variants == {"w2": {"window_size": 2, "vq_entropy_rows": 64}}
    for bad in ("w2", "w2:window_size", "w2:window_size=two", ":window_size=2"):
        with pytest.raises(SystemExit):
            train_step.parse_args(["--variant", bad])
        assert "NAME:KEY=VALUE" in capsys.readouterr().err
    out = tmp_path / "train_step.json"
    train_step.main(["--small", "--device", "cpu", "--crops", "8", "--warmup", "0", "--repeats", "1", "--cache", str(cache),
                     "--resolution", "32", "--models", "ours-fp16-grid", "monai-vqvae", "--variant", "deep:num_blocks=2",
                     "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["key"] for r in rows] == ["ours-fp16-grid", "monai-vqvae", "ours-fp16-grid[deep]"]
    _ok_or_skipped(rows)
    assert "num_blocks=2" in rows[2]["model"]
    if rows[0]["status"] == "ok":  # twice the transformer blocks of the --small model
        assert rows[2]["params"] > rows[0]["params"]


def test_inference_smoke(cache, tmp_path):
    from bench import inference

    out = tmp_path / "inference.json"
    inference.main(["--small", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--budget", "600", "--cache", str(cache),
                    "--resolution", "32", "--ours-convs", "auto", "spconv", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    _ok_or_skipped(rows)
    ops = {(r["model"].split()[0], r.get("op")) for r in rows if r["status"] == "ok"}
    assert {("MAISI", "encode"), ("MAISI", "decode")} <= ops
    if C.networks_available()[0]:
        assert {("ctvq", "encode"), ("ctvq", "decode")} <= ops
        ours = [r for r in rows if r["model"].startswith("ctvq") and r["status"] == "ok"]
        assert len(ours) == 4 and sum(r["how"].endswith(", spconv convs") for r in ours) == 2
        # same weights and scan: both conv paths give the same tokens
        assert len({r["tokens"] for r in ours if r["op"] == "encode"}) == 1


def test_dataloader_smoke(cache, tmp_path):
    pytest.importorskip("pipeline.dataset")
    from bench import dataloader

    out = tmp_path / "dataloader.json"
    dataloader.main(["--small", "--device", "cpu", "--workers", "0", "1", "--num-crops", "3", "--step-rate", "2",
                     "--cache", str(cache), "--resolution", "32", "--max-points", "1000", "--out", str(out)])
    data = json.loads(out.read_text())
    assert [r["workers"] for r in data["rows"]] == [0, 1]
    _ok_or_skipped(data["rows"])
    for r in data["rows"]:
        assert r["crops"] >= 1 and r["mean_points"] <= 1000
        assert r["ratio_value"] == pytest.approx(r["crops_per_s_value"] / 2)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (the copy it leaves out)")
def test_dataloader_without_the_gpu_copy(cache, tmp_path):
    from bench import dataloader

    notes = {}
    for flags in ([], ["--no-gpu-copy"]):
        out = tmp_path / f"dl{len(flags)}.json"
        dataloader.main(["--small", "--device", "cuda", "--workers", "1", "--num-crops", "3", "--cache", str(cache),
                         "--resolution", "32", "--max-points", "1000", "--out", str(out), *flags])
        data = json.loads(out.read_text())
        assert data["rows"][0]["crops"] >= 1
        notes[len(flags)] = data["notes"][0]
    assert "pinned and copied to the GPU" in notes[0] and "not copied to the GPU (--no-gpu-copy)" in notes[1]


def test_sparse_ops_smoke(tmp_path):
    from bench import sparse_ops

    out = tmp_path / "sparse_ops.json"
    sparse_ops.main(["--small", "--device", "cpu", "--repeats", "1", "--occupancies", "1", "0.5", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    _ok_or_skipped(rows)
    convs = [r for r in rows if r["op"].startswith("subm3")]
    # each conv through spconv (Native on CPU) and dense, at both occupancies
    assert len(convs) == 2 * 2 * len(sparse_ops.SMALL_CONVS)
    assert {r["algo"] for r in convs} == {"native", "dense"}
    assert all(min(r["fwd_s"], r["fwd_new_s"], r["fwd_bwd_s"]) > 0 for r in convs)
    full = {r["op"]: r["voxels"] for r in convs if r["occupancy"] == "100%"}
    assert all(r["voxels"] < full[r["op"]] for r in convs if r["occupancy"] != "100%")
    assert {"downsample 32 ch", "layer norm 32 ch", "subdivide 32 ch"} <= {r["op"] for r in rows}


def test_profile_step_smoke(cache, tmp_path):
    from bench import profile_step

    out = tmp_path / "profile_step.json"
    profile_step.main(["--small", "--device", "cpu", "--steps", "1", "--cache", str(cache), "--resolution", "32",
                       "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    regions = {r["region"] for r in row["regions"]}
    assert {"Encoder.downsample.0", "vq", "Decoder.upsample.2"} <= regions and row["wall_ms"] > 0
    assert row["ops_by_cpu"] and row["ops_by_cpu"][0]["self_cpu_ms"] > 0


@pytest.fixture(scope="module")
def quality_data(tmp_path_factory) -> Path:
    """Processed phantom training (2 cases) and evaluation (1 other case) folders at 32^3, lung window."""
    from pipeline import preprocess
    from pipeline.phantom import write_phantom_dataset

    tmp = tmp_path_factory.mktemp("quality_data")
    for name, seeds in (("train", [0, 1]), ("eval", [7])):
        write_phantom_dataset(tmp / f"raw_{name}", seeds=seeds, shape=(40, 40, 30), spacing=8.0)
        summary = preprocess.run(tmp / f"raw_{name}", tmp / name, tmp / f"raw_{name}" / "organ_mapping.json",
                                 num_workers=0, resolution=32, windows=["lung"], progress=False, log=lambda *a, **k: None)
        assert summary["ok"] == len(seeds)
    return tmp


def test_quality_smoke(quality_data, tmp_path, capsys):
    """Both models trained for the same (tiny) time on the training cases, scored on the unseen case;
    a second call evaluates the kept weights without training again."""
    from bench import quality

    out = tmp_path / "q.json"
    argv = ["--train", str(quality_data / "train"), "--eval", str(quality_data / "eval"), "--minutes", "0.05",
            "--small", "--device", "cpu", "--workers", "0", "--out", str(out)]
    res = quality.main(argv)
    assert "CTVQ_COMMAND" not in __import__("os").environ  # each in-process stage recorded its own command
    assert "stage2.json" in (tmp_path / "q_work" / "ctvq" / "stage2" / "command.txt").read_text()
    # a few steps end stage 1 before k-means: stage 2 then trains the codebook instead of freezing a random one
    assert "ctvq: stage 1 ended before the codebook's k-means, so stage 2 trains the codebook too" in capsys.readouterr().out
    assert json.loads((tmp_path / "q_work" / "ctvq" / "stage2" / "config.json").read_text())["frozen_parts"] == ["Encoder"]
    saved = json.loads(out.read_text())
    assert set(saved) >= {"ctvq", "monai_vqvae", "env"} and saved["env"]["device"] == "cpu"
    for name in ("ctvq", "monai_vqvae"):
        r = saved[name]
        assert {"psnr_body", "ssim_body", "mae_hu_body", "codes_used", "perplexity", "train_steps", "train_seconds"} <= set(r)
        assert r["train_steps"] > 0 and 0 < r["train_seconds"] < 60 and np.isfinite(r["psnr_body"])
        assert [c["case"] for c in r["cases"]] == ["phantom/phantom_007"]  # never a training case
        assert r["cases"][0]["organ_mae_hu"]  # the phantom has organ labels
    assert saved["ctvq"]["tokens"] < saved["monai_vqvae"]["tokens"]  # tokens only inside the body
    assert saved["monai_vqvae"]["train_seconds"] >= saved["ctvq"]["train_seconds"]  # as long as ctvq took in all
    # the quantiser left out: a different reconstruction, scored the same way
    assert np.isfinite(saved["ctvq"]["psnr_body_unquantized"]) and "psnr_body_unquantized" not in saved["monai_vqvae"]
    assert saved["ctvq"]["psnr_body_unquantized"] != pytest.approx(saved["ctvq"]["psnr_body"], abs=1e-6)
    assert len(saved["ctvq"]["stage_steps"]) == 3 and all(s > 0 for s in saved["ctvq"]["stage_steps"])
    assert (tmp_path / "q_pictures" / "phantom__phantom_007.png").stat().st_size > 10_000
    assert out.with_suffix(".md").read_text().startswith("| model |")
    again = quality.main(argv)  # weights kept in q_work: evaluated again, not retrained
    for name in ("ctvq", "monai_vqvae"):
        assert again[name]["train_steps"] == res[name]["train_steps"]
        assert again[name]["psnr_body"] == pytest.approx(res[name]["psnr_body"], abs=1e-4)


def test_quality_refuses_a_bad_stage_split(quality_data):
    from bench import quality

    with pytest.raises(SystemExit):
        quality.parse_args(["--train", "a", "--eval", "b", "--minutes", "1", "--stage-split", "0.5,0.5"])


def test_quality_reports_every_residual_depth(quality_data, tmp_path):
    """Variants are trained beside the default in one run and reported under their names, each level scored."""
    from bench import quality

    argv = ["--train", str(quality_data / "train"), "--eval", str(quality_data / "eval"), "--minutes", "0.03", "--small",
            "--device", "cpu", "--workers", "0", "--models", "ctvq", "--out", str(tmp_path / "q.json")]
    res = quality.main(argv + ["--variant", "d2:network_def#vq_depth=2", "--variant", 'sample:network_def#vq_entropy_scope="sample"'])
    assert "monai_vqvae" not in res and set(res["variants"]) == {"d2", "sample"}
    assert [r["depth"] for r in res["ctvq"]["per_depth"]] == [1]
    rows = res["variants"]["d2"]["per_depth"]
    assert [r["depth"] for r in rows] == [1, 2] and res["variants"]["d2"]["overrides"] == ["network_def#vq_depth=2"]
    assert res["variants"]["d2"]["shared_stages"] == []  # a network_def override changes every stage
    assert all(np.isfinite(r["psnr_body"]) and r["codes_used"] > 0 for r in rows)
    d2 = res["variants"]["d2"]  # its usage is that of the first level, as a depth-1 reader's tokens
    assert d2["codes_used"] == rows[0]["codes_used"] and d2["perplexity"] == pytest.approx(rows[0]["perplexity"])
    assert "| ctvq d2 (network_def#vq_depth=2) |" in (tmp_path / "q.md").read_text()
    with pytest.raises(SystemExit, match="trained with other settings"):  # never reported under another name
        quality.main(argv + ["--ctvq-override", "network_def#vq_depth=2"])
    with pytest.raises(SystemExit):
        quality.parse_args(argv + ["--variant", "no-override"])


def test_code_usage_counts_every_scan_and_analyses_them_again(quality_data, tmp_path):
    """Codes counted per scan for two checkpoints of one trained ctvq; the saved counts give the same analysis."""
    from bench import code_usage, quality

    work = tmp_path / "q_work"
    quality.main(["--train", str(quality_data / "train"), "--eval", str(quality_data / "eval"), "--minutes", "0.03",
                  "--small", "--device", "cpu", "--workers", "0", "--models", "ctvq", "--train-only", "--work", str(work),
                  "--out", str(tmp_path / "q.json")])
    out = tmp_path / "usage.json"
    argv = ["--train", str(quality_data / "train"), "--eval", str(quality_data / "eval"), "--device", "cpu", "--out", str(out)]
    res = code_usage.main(argv + ["--run", f"shipped={work / 'ctvq' / 'stage2'}", "--run", f"codebook={work / 'ctvq' / 'stage1'}"])
    assert list(res) == ["shipped", "codebook"]
    with np.load(out.with_suffix(".npz")) as saved:
        counts = {k: saved[k] for k in saved.files if k != "__meta__"}
    assert sorted(k.split("|", 1)[1] for k in counts if k.startswith("shipped|")) == [
        "eval|phantom/phantom_007", "train|phantom/phantom_000", "train|phantom/phantom_001"]
    for run, r in res.items():
        pooled_eval = sum(c for k, c in counts.items() if k.startswith(f"{run}|eval|"))
        pooled_train = sum(c for k, c in counts.items() if k.startswith(f"{run}|train|"))
        assert r["eval_tokens"] == pooled_eval.sum() > 0 and r["eval_codes_used"] == int((pooled_eval > 0).sum())
        assert r["unused_in_training"] == int((pooled_train == 0).sum())
        assert r["scans"]["eval"]["phantom/phantom_007"]["tokens"] == r["eval_tokens"]
        assert set(r["train_share_on_eval_unused"]) == {"phantom/phantom_000", "phantom/phantom_001"}
        assert all(0.0 <= s <= 1.0 for s in r["train_share_on_eval_unused"].values())
    assert json.loads(out.read_text())["runs"] == res
    again = code_usage.main(["--counts", str(out.with_suffix(".npz")), "--out", str(tmp_path / "again.json")])
    saved = json.loads((tmp_path / "again.json").read_text())
    assert again == res and saved["runs"] == res
    assert saved["env"]["device"] == "cpu" and set(saved["run_folders"]) == {"shipped", "codebook"}  # the counting run's
    # a run folder that holds no run ends the script in one line before any scan is encoded
    with pytest.raises(SystemExit, match=r"--run nothing=.*: no trained run there .*pass a run folder of ./run.sh train"):
        code_usage.main(argv + ["--run", f"shipped={work / 'ctvq' / 'stage2'}", "--run", f"nothing={tmp_path}"])
    with pytest.raises(SystemExit, match="not counts this script saved"):
        code_usage.main(["--counts", str(out), "--out", str(tmp_path / "bad.json")])
    assert out.with_suffix(".md").read_text().startswith("| run | held-out: codes used |")
    for bad in (["--run", "no-equals-sign", "--train", "a", "--eval", "b"], ["--run", "a|b=x", "--train", "a", "--eval", "b"],
                ["--run", "a=x", "--run", "a=y", "--train", "a", "--eval", "b"], ["--counts", "c.npz", "--train", "a"]):
        with pytest.raises(SystemExit):
            code_usage.parse_args(bad)


def test_codebook_fit_scores_each_book_on_the_held_out_scans(quality_data, tmp_path):
    """Books fitted again to a trained ctvq's whole-scan latents, each scored on the held-out case:
    the run's own book gives the tokens and fidelity the run's tokenizer gives, and the run's weights
    are left as they were."""
    from bench import codebook_fit, quality
    from pipeline.evaluate import find_cases
    from pipeline.metrics import volume_metrics
    from pipeline.processed import case_geometry, load_case
    from pipeline.tokenizer import Tokenizer

    work = tmp_path / "q_work"
    quality.main(["--train", str(quality_data / "train"), "--eval", str(quality_data / "eval"), "--minutes", "0.03",
                  "--small", "--device", "cpu", "--workers", "0", "--models", "ctvq", "--train-only", "--work", str(work),
                  "--out", str(tmp_path / "q.json")])
    run = work / "ctvq" / "stage2"
    out = tmp_path / "fit.json"
    res = codebook_fit.main(["--run", str(run), "--train", str(quality_data / "train"), "--eval", str(quality_data / "eval"),
                             "--device", "cpu", "--out", str(out)])
    assert list(res) == list(codebook_fit.METHODS)
    tok = Tokenizer.from_checkpoint(run, device="cpu")
    (case,) = find_cases(quality_data / "eval", tok.window, tok.resolution)
    data = load_case(case)
    tokens = tok.encode_arrays(data["window"], data["mask"], **case_geometry(data["info"]))
    m = volume_metrics(tok.decode(tokens), np.where(data["mask"], data["window"], 0.0), tok.window, data["mask"], ssim=False)
    own = res["run"]
    assert own["eval_codes_used"] == own["eval_codes_per_case"][0] == len(np.unique(tokens.indices))
    assert own["psnr_body"] == pytest.approx(m["psnr_body"], abs=1e-4)
    for method, r in res.items():
        assert 0 < r["eval_codes_used"] <= 128 and r["eval_latent_mse"] >= 0 and np.isfinite(r["psnr_body"]), method
    # k-means on every training latent fits them at least as closely as the book a few steps left
    assert res["kmeans"]["eval_latent_mse"] < own["eval_latent_mse"]
    assert json.loads(out.read_text())["methods"]["run"]["eval_codes_used"] == own["eval_codes_used"]
    assert out.with_suffix(".md").read_text().startswith("| method | held-out: codes used |")
    with pytest.raises(SystemExit, match="no trained run there"):
        codebook_fit.main(["--run", str(tmp_path), "--train", str(quality_data / "train"), "--eval", str(quality_data / "eval"),
                           "--device", "cpu", "--out", str(out)])


def test_equal_share_assignment_fills_every_code_to_its_share():
    from bench.codebook_fit import equal_share_assignment

    x = 0.01 * torch.randn(1000, 4)  # every row nearest the first code
    codes = torch.cat([torch.zeros(1, 4), torch.randn(9, 4) + 3])
    a = equal_share_assignment(x, codes)
    assert torch.equal(torch.bincount(a, minlength=10), torch.full((10,), 100))
    # the first code keeps the rows closest to it
    assert x[a == 0].norm(dim=1).max() <= x[a != 0].norm(dim=1).min()


def test_code_usage_compares_with_training_scans_of_as_many_tokens():
    from bench import code_usage

    tokens = {"a": 100, "b": 50, "c": 60, "d": 400}
    # 0.8-1.25 x 110 tokens: b + c (110) and a (100); never d, a + b (150) or a + c (160)
    assert code_usage.alike_sets(tokens, 110) == [("a",), ("b", "c")]
    k = 8
    counts = {"r|train|a": np.bincount([0, 1, 2, 3], minlength=k), "r|train|b": np.bincount([0, 0, 4, 4], minlength=k),
              "r|eval|x": np.bincount([0, 1, 2, 5], minlength=k)}
    (r,) = code_usage.analyse(counts).values()
    # sets of 3.2-5 training tokens: {a} (4 codes) and {b} (2 codes), not {a, b} (8 tokens)
    assert r["alike_sets"] == 2 and r["alike_codes_used"] == [3, 2, 4]
    # 2x: 6.4-10 tokens, {a, b} (codes 0-4 in 8 tokens); 4x: 12.8-20 tokens, no such set
    assert r["larger_codes_used"] == {"2": [5, 5, 5, 1], "4": None}
    assert code_usage.display_row("r", r)["larger_codes_used"] == "5 (62 %) / no such set"
    assert r["unused_in_training"] == 3 and r["eval_codes_used"] == 4  # codes 5, 6, 7; codes 0, 1, 2, 5
    assert r["train_share_on_eval_unused"] == {"a": 0.25, "b": 0.5}  # codes 3 and 4 are not held-out codes
    # training tokens per code [3, 1, 1, 1, 2, 0, 0, 0], the average code's 1; held-out codes 0, 1, 2, 5
    bands = {b["upto"]: (b["codes"], b["eval_unused"], b["median_scans"], b["train_share"]) for b in r["by_training_share"]}
    assert bands == {0.0: (3, 2, 0.0, 0.0), 0.05: (0, 0, 0.0, 0.0), 0.2: (0, 0, 0.0, 0.0), 0.5: (0, 0, 0.0, 0.0),
                     1.0: (3, 1, 1.0, 3 / 8), 3.0: (2, 1, 1.5, 5 / 8), None: (0, 0, 0.0, 0.0)}
    assert [row["band"] for row in code_usage.band_rows("r", r)] == ["0", "0-0.05", "0.05-0.2", "0.2-0.5", "0.5-1", "1-3", "> 3"]
    with pytest.raises(SystemExit, match="no held-out scans"):
        code_usage.analyse({"r|train|a": counts["r|train|a"]})


def test_quality_variant_of_stage2_starts_from_the_default_stages(quality_data, tmp_path):
    """A stage-2-only variant trains only its stage 2, from ctvq's stage 1: the shipped stage 2 keeps the
    encoder and the codebook frozen, the variant trains them too."""
    from bench import quality

    work = tmp_path / "q_work"
    res = quality.main(["--train", str(quality_data / "train"), "--eval", str(quality_data / "eval"), "--minutes", "0.03",
                        "--small", "--device", "cpu", "--workers", "0", "--models", "ctvq", "--work", str(work),
                        "--variant", "joint:stage2:frozen_parts=[]", "--out", str(tmp_path / "q.json"),
                        "--ctvq-override", "network_def#vq_kmeans_init_points=16"])  # k-means within stage 1's few steps
    joint = res["variants"]["joint"]
    assert joint["shared_stages"] == [0, 1] and res["ctvq"]["shared_stages"] == []
    assert joint["stage_steps"][:2] == res["ctvq"]["stage_steps"][:2]
    assert sorted(p.name for p in (work / "ctvq_joint").iterdir() if p.is_dir()) == ["stage2"]
    assert str(work / "ctvq" / "stage1") in (work / "ctvq_joint" / "stage2" / "command.txt").read_text()
    assert "[Stage 2] Joint training: Decoder (Encoder, Codebook frozen)" in (work / "ctvq" / "stage2" / "log.txt").read_text()
    assert "[Stage 2] Joint training: Encoder + Decoder + Codebook" in (work / "ctvq_joint" / "stage2" / "log.txt").read_text()


def test_bench_device_is_the_pipeline_device():
    """The benchmarks resolve --device as the pipeline does, in one line when the GPU is absent."""
    assert C.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"^device 'cuda': no CUDA GPU is visible here; use cpu$"):
            C.resolve_device("cuda")

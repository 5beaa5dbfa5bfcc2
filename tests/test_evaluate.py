"""Whole-scan evaluation: metrics.csv, summary.json, pictures and report.html from processed phantoms."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY, tiny_net
from pipeline.evaluate import evaluate, find_cases, main
from pipeline.infer import Tokenizer
from pipeline.io_utils import TokenizerError
from pipeline.processed import ProcessedCase

ROOT = Path(__file__).resolve().parents[1]


def make_run(folder: Path, window="soft_tissue", **over) -> Path:
    net = tiny_net(0, **over)
    (folder / "ckpts").mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"window_type": window, "network_def": {**TINY, **over}}))
    torch.save(net.state_dict(), folder / "ckpts" / "vqvae_ema0.9999_step0000005.pt")
    return folder


@pytest.fixture(scope="module")
def raw_phantoms(tmp_path_factory):
    from pipeline.phantom import write_phantom_dataset

    raw = tmp_path_factory.mktemp("eval_raw")
    write_phantom_dataset(raw, seeds=[0, 1], shape=(40, 40, 30), spacing=8.0)
    return raw


def _preprocess(raw: Path, out: Path, layout: str) -> Path:
    from pipeline import preprocess

    summary = preprocess.run(raw, out, raw / "organ_mapping.json", num_workers=0, resolution=32,
                             windows=["soft_tissue"], progress=False, log=lambda *a, **k: None, layout=layout)
    assert summary["ok"] == 2
    assert not (out / ".preprocess.lock").exists()  # no zero-byte lock file stays
    return out


@pytest.fixture(scope="module")
def processed(raw_phantoms, tmp_path_factory):
    return _preprocess(raw_phantoms, tmp_path_factory.mktemp("eval_compact") / "processed", "compact")


def test_compact_and_guide_layouts_give_the_same_metrics(raw_phantoms, processed, tmp_path):
    """The same cases evaluated from the compact layout and from --layout guide: same support,
    tokens and codes; metrics equal up to the guide's float16 windows."""
    guide = _preprocess(raw_phantoms, tmp_path / "guide", "guide")
    assert not list(processed.rglob("*.npy")) and list(guide.rglob("windows/*.npy"))
    tok = Tokenizer.from_checkpoint(make_run(tmp_path / "run") / "ckpts" / "vqvae_ema0.9999_step0000005.pt", device="cpu")
    a = evaluate(tok, processed, tmp_path / "a", pictures=False, log=lambda *a: None)
    b = evaluate(tok, guide, tmp_path / "b", pictures=False, log=lambda *a: None)
    assert [r["case"] for r in a["cases"]] == [r["case"] for r in b["cases"]] == ["phantom/phantom_000", "phantom/phantom_001"]
    for ra, rb in zip(a["cases"], b["cases"]):
        for k in ("support_voxels", "body_voxels", "tokens"):
            assert ra[k] == rb[k], k
        for k in ("psnr_body", "psnr", "ssim_body", "ssim"):
            assert ra[k] == pytest.approx(rb[k], abs=0.05), k
        for k in ("mae_hu_body", "rmse_hu_body"):
            assert ra[k] == pytest.approx(rb[k], abs=0.5), k
    assert a["organ_mae_hu"].keys() == b["organ_mae_hu"].keys()


def test_cli_report(processed, tmp_path):
    run = make_run(tmp_path / "run")
    out = tmp_path / "report"
    assert main(["--ckpt", str(run / "ckpts" / "vqvae_ema0.9999_step0000005.pt"), "--data_dir", str(processed),
                 "--out", str(out), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["case"] for r in rows] == ["phantom/phantom_000", "phantom/phantom_001"]
    for r in rows:
        for k in ("psnr_body", "ssim_body", "psnr", "ssim", "mae_hu_body", "rmse_hu_body", "encode_s", "decode_s", "encode_peak_mb"):
            assert math.isfinite(float(r[k])), k
        assert int(r["tokens"]) > 0 and int(r["codes_used"]) >= 1
        assert (out / r["picture"]).is_file()
    s = json.loads((out / "summary.json").read_text())
    assert s["num_cases"] == 2 and s["window"]["name"] == "soft_tissue" and s["resolution"] == 32
    ov = s["overall"]
    assert 0 < ov["codes_used"] <= 64 and ov["perplexity"] >= 1 and ov["tokens_per_scan"] > 0
    assert {"liver", "spine", "lung_left"} <= set(s["organ_mae_hu"])
    assert all(v >= 0 for v in s["organ_mae_hu"].values())
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "phantom/phantom_000" in html and "<img" in html and "liver" in html
    assert (out / "organs.csv").is_file()


def test_metrics_match_direct_computation(processed, tmp_path):
    """The report's numbers are those of pipeline.metrics on the decoded whole scan."""
    from pipeline.metrics import psnr

    tok = Tokenizer.from_checkpoint(make_run(tmp_path / "run") / "ckpts" / "vqvae_ema0.9999_step0000005.pt", device="cpu")
    s = evaluate(tok, processed, tmp_path / "r", max_cases=1, ssim=False, pictures=False, log=lambda *a: None)
    case = find_cases(processed, tok.window, 32)[0]
    pc = ProcessedCase(case["dir"])
    win, mask = pc.window(tok.window), pc.body_mask()
    recon = tok.decode(tok.encode_arrays(win, mask))
    assert s["cases"][0]["psnr_body"] == pytest.approx(psnr(recon, win, mask), abs=1e-6)
    assert s["cases"][0]["ssim_body"] is None and s["num_cases"] == 1


def test_cases_selects_by_name_and_refuses_unknown_names(processed, tmp_path):
    """--cases takes dataset/case_id or case_id; a name not in the folder is refused with the names
    there, before anything is written, rather than dropped."""
    tok = Tokenizer.from_checkpoint(make_run(tmp_path / "run") / "ckpts" / "vqvae_ema0.9999_step0000005.pt", device="cpu")
    s = evaluate(tok, processed, tmp_path / "r", cases=["phantom_001"], ssim=False, pictures=False, log=lambda *a: None)
    assert [r["case"] for r in s["cases"]] == ["phantom/phantom_001"]
    for asked in (["nosuch"], ["phantom/phantom_000", "nosuch"]):
        with pytest.raises(TokenizerError, match=r"no complete soft_tissue case named nosuch; .*phantom/phantom_000, phantom/phantom_001"):
            evaluate(tok, processed, tmp_path / "bad", cases=asked, ssim=False, pictures=False, log=lambda *a: None)
    assert not (tmp_path / "bad").exists()


def test_bundle_config_workflow(processed, tmp_path):
    """bundles/ct_vqvae/evaluate.json runs with MONAI's ConfigWorkflow."""
    from monai.bundle import ConfigWorkflow

    run = make_run(tmp_path / "run")
    wf = ConfigWorkflow(config_file=str(ROOT / "bundles" / "ct_vqvae" / "evaluate.json"), workflow_type=None,
                        meta_file=str(ROOT / "bundles" / "ct_vqvae" / "metadata.json"), logging_file=False,
                        ckpt=str(run / "ckpts" / "vqvae_ema0.9999_step0000005.pt"), data_dir=str(processed),
                        output_dir=str(tmp_path / "wf"), device="cpu", ssim=False, pictures=False, max_cases=1)
    wf.initialize()
    wf.run()
    assert json.loads((tmp_path / "wf" / "summary.json").read_text())["num_cases"] == 1


def test_errors(raw_phantoms, processed, tmp_path, capsys):
    run = make_run(tmp_path / "run")
    ck = str(run / "ckpts" / "vqvae_ema0.9999_step0000005.pt")

    def one_line(argv):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code != 0 and err.startswith("error:") and "\n" not in err
        return err

    assert "lung" in one_line(["--ckpt", ck, "--data_dir", str(processed), "--window", "lung", "--out", str(tmp_path / "o")])
    assert "preprocess" in one_line(["--ckpt", ck, "--data_dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "--ckpt" in one_line(["--data_dir", str(processed), "--out", str(tmp_path / "o")])
    lung = make_run(tmp_path / "lung", window="lung")
    guide = _preprocess(raw_phantoms, tmp_path / "guide", "guide")  # soft_tissue files only
    assert "lung" in one_line(["--ckpt", str(lung / "ckpts" / "vqvae_ema0.9999_step0000005.pt"), "--data_dir", str(guide),
                               "--out", str(tmp_path / "o")])
    assert len(find_cases(processed, "lung", 32)) == 2  # compact cases compute any window
    with pytest.raises(TokenizerError, match="resolution"):
        find_cases(processed, "soft_tissue", resolution=64)


def _report_summary(tmp_path):
    """The summary of a real evaluation, written under tmp_path / "work" / "eval", from a run that trained on phantom_000."""
    return {
        "model": str(tmp_path / "work" / "runs" / "s2" / "ckpts" / "vqvae_step0000400.pt"),
        "data_dir": str(tmp_path / "work" / "processed_dataset"),
        "window": {"name": "soft_tissue", "width": 400.0, "level": 50.0}, "resolution": 64, "num_cases": 2,
        "num_embeddings": 8, "device": "cpu", "tile": 4,
        "overall": {"psnr_body": 17.0, "ssim_body": 0.62, "mae_hu_body": 31.6, "encode_peak_mb": 655.4,
                    "codebook_usage": 0.75, "codes_used": 6},
        "organ_mae_hu": {"liver": 23.7, "spine": 213.2},
        "code_counts": [5, 0, 3, 9, 1, 1, 2, 0],
        "training_cases": ["phantom/phantom_000"],
        "cases": [{"case": f"phantom/phantom_00{i}", "dataset": "phantom", "case_id": f"phantom_00{i}",
                   "psnr_body": 17.0 + i, "mae_hu_body": 30.0, "encode_peak_mb": 640.7, "tokens": 174,
                   "picture": f"cases/phantom__phantom_00{i}.png"} for i in range(2)],
    }


def test_report_reads_without_keys_or_machine_paths(tmp_path):
    from pipeline.report import write_report

    out = tmp_path / "work" / "eval"
    out.mkdir(parents=True)
    html = write_report(out, _report_summary(tmp_path)).read_text(encoding="utf-8")
    assert "PSNR inside the body (dB)" in html and "Peak memory while encoding (MB)" in html
    assert "Share of the codebook used (%)</td><td>75<" in html and "Codes used (of 8)" in html
    assert ">psnr_body<" not in html and ">encode_peak_mb<" not in html
    assert str(tmp_path) not in html and "../runs/s2/ckpts/vqvae_step0000400.pt" in html
    assert "<tr class=train><td title='phantom/phantom_000'>phantom_000</td><td>T</td>" in html
    assert "<tr><td title='phantom/phantom_001'>phantom_001</td><td></td>" in html
    assert "1 of 2 cases were used in training" in html
    assert "<a href='cases/phantom__phantom_000.png'><img" in html
    for plot in ("organ_mae.png", "codebook_usage.png"):
        assert f"src='{plot}'" in html and (out / plot).stat().st_size > 1000


def test_report_fits_a_1280px_browser(tmp_path):
    """Rendered in headless Chromium at 1280 px: nothing runs off the page, and it draws."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    from pipeline.report import write_report
    from pipeline.visualize import save_three_plane

    out = tmp_path / "work" / "eval"
    summary = _report_summary(tmp_path)
    import numpy as np

    vol = np.random.default_rng(0).random((32, 32, 32)).astype(np.float32)
    for r in summary["cases"]:
        save_three_plane(out / r["picture"], vol, vol * 0.9, title=r["case"])
    page = write_report(out, summary)
    probe = out / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace(
        "</body>", "<script>window.onload=()=>document.body.setAttribute('data-overflow',"
                   "document.documentElement.scrollWidth>window.innerWidth)</script></body>"), encoding="utf-8")
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"]
    dom = subprocess.run(args + ["--dump-dom", probe.as_uri()], capture_output=True, encoding="utf-8", errors="replace", timeout=120).stdout
    assert 'data-overflow="false"' in dom, dom[:500]
    shot = tmp_path / "report.png"
    subprocess.run(args + [f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10000


def test_residual_model_is_scored_at_every_depth(processed, tmp_path):
    """summary.json gives PSNR / MAE for each decoding depth and the usage of each code level."""
    tok = Tokenizer.from_checkpoint(make_run(tmp_path / "run", vq_depth=2), device="cpu", tile=None)
    summary = evaluate(tok, processed, tmp_path / "report", pictures=False, ssim=False, log=lambda *a: None)
    rows = summary["per_depth"]
    assert [r["depth"] for r in rows] == [1, 2]
    assert rows[1]["psnr_body"] == pytest.approx(summary["overall"]["psnr_body"])  # the full depth is the headline
    assert rows[0]["psnr_body"] != pytest.approx(rows[1]["psnr_body"]) and all(r["codes_used"] > 0 for r in rows)
    levels = summary["code_counts_per_level"]  # the usage histogram of report.html, one curve per level
    assert len(levels) == 2 and levels[0] == summary["code_counts"]
    assert [sum(1 for c in level if c) for level in levels] == [r["codes_used"] for r in rows]
    assert sum(levels[0]) == sum(levels[1]) == sum(c["tokens"] for c in summary["cases"])
    assert (tmp_path / "report" / "codebook_usage.png").stat().st_size > 5000
    single = evaluate(Tokenizer.from_checkpoint(make_run(tmp_path / "one"), device="cpu", tile=None), processed,
                      tmp_path / "report1", pictures=False, ssim=False, log=lambda *a: None)
    assert [r["depth"] for r in single["per_depth"]] == [1]


def test_level_codes_of_any_depth():
    from pipeline.evaluate import level_codes

    assert level_codes(np.array([[1, 2], [3, 4]])).tolist() == [1, 3]
    assert level_codes(np.array([[1, 2], [3, 4]]), 2).tolist() == [2, 4]
    assert level_codes([5, 6]).tolist() == [5, 6]
    assert level_codes(np.zeros((0, 4), int)).shape == (0,)  # a scan without body cells


def test_per_depth_summary_counts_each_level_and_takes_empty_scans():
    from pipeline.evaluate import per_depth_summary

    rows = [{"depth": d, "case": c, "psnr_body": p, "mae_hu_body": m}
            for d, c, p, m in ((1, "a", 20.0, 50.0), (2, "a", 22.0, 40.0), (1, "b", 30.0, 30.0), (2, "b", 32.0, 20.0))]
    indices = [np.array([[1, 2], [3, 2]]), np.zeros((0, 2), int)]  # scan b holds no body cell
    out = per_depth_summary(rows, indices, 8)
    assert [(r["depth"], r["psnr_body"], r["mae_hu_body"], r["codes_used"]) for r in out] == [(1, 25.0, 40.0, 2), (2, 27.0, 30.0, 1)]

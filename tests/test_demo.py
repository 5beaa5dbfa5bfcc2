"""The end-to-end demo at a tiny size: phantoms -> preprocess -> stages 0/1/2 -> evaluate -> bundle."""
import json
from pathlib import Path

import pytest

from pipeline.demo import DEMO_CONFIG, main


def test_demo_config_is_an_overlay():
    from monai.bundle import ConfigParser

    root = Path(DEMO_CONFIG).parent
    cfg = ConfigParser.load_config_files([str(root / "stage1.json"), str(DEMO_CONFIG)])
    assert cfg["network_def"]["_target_"] == "networks.SparseVQVAE"  # merged, not replaced
    assert cfg["network_def"]["model_channels"] < 512 and cfg["max_steps"] <= 100
    assert cfg["dataset"]["args"]["max_points"] <= 30000 and cfg["demo"]["resolution"] % 8 == 0
    # the demo's crops are a few latent cells across: a crop margin would leave k-means no cell, and
    # stages 1 and 2 would end with the random codebook
    assert cfg["network_def"]["vq_crop_margin"] == 0


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capfd, monkeypatch):
    import subprocess

    import pipeline.demo as demo

    envs, real_run = [], subprocess.run

    def run(cmd, **kw):
        envs.append(kw.get("env") or {})
        return real_run(cmd, **kw)

    monkeypatch.setattr(demo.subprocess, "run", run)
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--resolution", "32", "--steps", "2", "--seeds", "0", "1",
                 "--phantom-shape", "40", "40", "30"]) == 0
    text, err = capfd.readouterr()
    # each training process runs on one thread: OpenMP threads on shared cores wait for each other
    assert [e.get("OMP_NUM_THREADS") for e in envs] == ["1", "1", "1"]
    assert "preprocess: 2 cases in 1 dataset: 2 ok, 0 failed, 0 skipped" in text
    # two steps end stage 1 before k-means: stage 2 then trains the codebook instead of freezing a random one
    assert "demo: stage 1 ended before the codebook's k-means, so stage 2 trains the codebook too" in text
    assert json.loads((out / "runs" / "stage2" / "config.json").read_text())["frozen_parts"] == ["Encoder"]
    # a clean run prints no warning that is ours to fix
    for noise in ("Warning", "is_fx_tracing", "optional_packages_version", "parsing config_file", "Traceback"):
        assert noise not in text + err, (noise, (text + err)[-3000:])
    assert (out / "bundle" / "ct_vqvae").stat().st_mode & 0o755 == 0o755
    for stage in (0, 1, 2):
        run = out / "runs" / f"stage{stage}"
        assert list((run / "ckpts").glob("vqvae_step*.pt")), stage
        assert (run / "config.json").is_file() and (run / "tb_logs").is_dir()
        assert str(run) in text
    assert list((out / "runs" / "stage2" / "samples").rglob("*.png"))
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["num_cases"] == 2 and summary["resolution"] == 32
    assert (out / "eval" / "report.html").is_file() and "report.html" in text and "tensorboard --logdir" in text
    assert (out / "bundle" / "ct_vqvae" / "models" / "model.pt").is_file()
    cfg = json.loads((out / "runs" / "stage1" / "config.json").read_text())
    assert cfg["training_stage"] == 1 and cfg["window_type"] == "soft_tissue"
    # a second demo into the same folder is refused at once, in one line, before any work
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(SystemExit) as refused:
        main(["--out", str(out), "--steps", "2"])
    assert refused.value.code == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"error: demo: {out.resolve()} holds an earlier demo (its runs/ has training runs); remove that "
                   "folder or pass another --out"]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_demo_output_is_ignored_by_git():
    import shutil
    import subprocess

    root = Path(DEMO_CONFIG).parents[2]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    assert subprocess.run(["git", "check-ignore", "-q", "demo_output/"], cwd=root).returncode == 0

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


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--resolution", "32", "--steps", "2", "--seeds", "0", "1",
                 "--phantom-shape", "40", "40", "30"]) == 0
    text = capsys.readouterr().out
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

"""The training bundle configs: each stage file runs alone (``--config_file stageN.json``), so the three
hold the same workflow; this keeps them the same except for the settings a stage changes."""
import json
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "ct_vqvae"

#: what stage 0, 1 and 2 set differently (README: "Learning rates", section 2)
STAGE_KEYS = {
    "training_stage", "output_dir", "learning_rate", "warmup_steps", "lr_scheduler", "loss_type", "max_steps",
    "quantize", "network_def#vq_kmeans_init", "network_def#vq_kmeans_init_points", "network_def#vq_reservoir_size",
    "network_def#vq_restart_every", "network_def#vq_dead_code_steps", "frozen_parts", "refit_codebook",
}


def _flat(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}#"))
    return out


def test_stages_differ_only_in_stage_settings():
    configs = [_flat(json.loads((BUNDLE / f"stage{n}.json").read_text())) for n in range(3)]
    differ = {k for k in set().union(*configs) if len({json.dumps(c.get(k, "<absent>")) for c in configs}) > 1}
    assert {k.split("#")[0] if k.startswith("lr_scheduler") else k for k in differ} <= STAGE_KEYS, differ
    assert [c["training_stage"] for c in configs] == [0, 1, 2]


def test_model_zoo_workflow_shape():
    for n in range(3):
        cfg = json.loads((BUNDLE / f"stage{n}.json").read_text())
        assert isinstance(cfg["initialize"], list) and isinstance(cfg["run"], list)
        assert cfg["training"] == "@run"  # `python -m monai.bundle run training` as in the README
        assert "name" not in cfg["dataset"]
        assert cfg["train"]["trainer"]["run_folder"] == "@run_folder"

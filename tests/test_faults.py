"""Broken inputs, damaged files and misuses: each ends in one clear line (or a listed row), never
in lost data, code run from a file, or a wrong result with exit 0.

The broken-input corpus is generated here: damaged and crafted checkpoints, crafted bundles,
token files outside the latent grid, DICOM series with two UIDs / a missing or odd slice, a label
map far from its image, symlink loops, zips without DICOM, huge NIfTI headers, unreadable files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

TINY = dict(resolution=4, model_channels=16, latent_channels=8, channels=(8, 8, 16, 16), num_embeddings=16,
            num_blocks=1, num_heads=2, window_size=4)
CONFIG = {"training_stage": 0, "network_def": {"_target_": "networks.SparseVQVAE", **TINY}}


class Payload:
    """Pickles to a call of ``os.system`` (what a crafted checkpoint would run on load)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CTVQ_DEBUG", None)
    return env


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m <args>`` from the repository root."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Asserts a non-zero exit with one error line (no traceback) holding ``words``; returns it."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines, proc.stdout[-2000:]
    for w in words:
        assert w in lines[-1], lines[-1]
    return lines[-1]


# ------------------------------------------------------------------------------ training runs


def _model(**over):
    from networks import SparseVQVAE

    torch.manual_seed(0)
    return SparseVQVAE(**{**TINY, **over})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from test_dataset import write_processed_dataset

    from pipeline.dataset import CTWindowSparseDataset

    root = tmp_path_factory.mktemp("data")
    write_processed_dataset(root, "synth", num_cases=2, resolution=32, failed=0)
    return CTWindowSparseDataset(root, "lung", split="all", max_points=1500, min_points=10)


def _trainer(ds, out: Path, steps: int, load_dir=None, model=None):
    from pipeline.dataset import StepSampler, sparse_collate
    from pipeline.handlers import CheckpointHandler, EMAHandler
    from pipeline.stages import prepare_run_folder
    from pipeline.trainer import SparseVQVAETrainer

    run = prepare_run_folder(out, load_dir=load_dir, ckpt="latest" if load_dir else None, training_stage=0,
                             config={**CONFIG, "max_steps": steps}, log_file=False)
    model = model or _model()
    sampler = StepSampler(ds, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=sparse_collate)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tr = SparseVQVAETrainer("cpu", steps, loader, model, opt, quantize=False,
                            train_handlers=[EMAHandler(0.9), CheckpointHandler(out, interval=2, ema_rate=0.9)])
    tr.resume(run)
    return tr


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    _trainer(data, out, 2).run()
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".train.lock"))
    return dst


def test_misc_checkpoint_loads_weights_only_and_resumes(data, run_dir, tmp_path):
    misc = torch.load(run_dir / "ckpts" / "misc_step0000002.pt", weights_only=True)
    assert misc["step"] == 2 and misc["optimizer"]["state"] and isinstance(misc["rng"]["python"], list)
    run = _copy_run(run_dir, tmp_path / "run")
    tr = _trainer(data, run, 4, load_dir=run)
    assert tr.state.iteration == 2
    tr.run()
    assert (run / "ckpts" / "misc_step0000004.pt").is_file()
    assert json.loads((run / "config.json").read_text())["max_steps"] == 4  # written once the resume loaded


@pytest.mark.parametrize("name", ["vqvae_step0000002.pt", "misc_step0000002.pt", "vqvae_ema0.9_step0000002.pt"])
def test_crafted_checkpoint_does_not_run(data, run_dir, tmp_path, name):
    from pipeline.io_utils import CheckpointError

    run = _copy_run(run_dir, tmp_path / "run")
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, run / "ckpts" / name)
    before = (run / "config.json").read_text()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as err:
        _trainer(data, run, 4, load_dir=run)
    assert not marker.exists()
    assert "refused" in str(err.value) and "\n" not in str(err.value)
    assert (run / "config.json").read_text() == before


@pytest.mark.parametrize("name,size", [("vqvae_step0000002.pt", 100), ("misc_step0000002.pt", 300),
                                       ("vqvae_ema0.9_step0000002.pt", 0)])
def test_damaged_checkpoint_is_one_line_before_any_write(data, run_dir, tmp_path, name, size):
    from pipeline.io_utils import CheckpointError

    run = _copy_run(run_dir, tmp_path / "run")
    path = run / "ckpts" / name
    path.write_bytes(path.read_bytes()[:size])
    before = (run / "config.json").read_text(), (run / "command.txt").read_text()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as err:
        _trainer(data, run, 4, load_dir=run)
    msg = str(err.value)
    assert "\n" not in msg and ("--ckpt" in msg or "delete it" in msg), msg
    assert ((run / "config.json").read_text(), (run / "command.txt").read_text()) == before


def test_checkpoint_of_another_model_size(data, run_dir, tmp_path):
    from pipeline.io_utils import CheckpointError

    run = _copy_run(run_dir, tmp_path / "run")
    before = (run / "config.json").read_text()
    with pytest.raises(CheckpointError, match="another model") as err:
        _trainer(data, run, 4, load_dir=run, model=_model(latent_channels=4))
    assert "vqvae_step0000002.pt" in str(err.value) and "shape" in str(err.value)
    assert (run / "config.json").read_text() == before


def test_second_training_into_a_busy_folder_is_refused(data, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; from pipeline.io_utils import FolderLock; "
         f"FolderLock({str(out)!r}, '.train.lock', 'busy').acquire(); print('locked', flush=True); time.sleep(60)"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FileExistsError, match="another training run"):
            _trainer(data, out, 2)
        assert not (out / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    _trainer(data, out, 2).run()  # free again once the other run ended
    assert (out / "ckpts" / "misc_step0000002.pt").is_file()


def test_override_typo_and_bad_json_are_refused(tmp_path):
    from pipeline.train import main

    base = ["--config", str(ROOT / "bundles" / "ct_vqvae" / "stage0.json"), "--output_dir", str(tmp_path / "run"),
            "--data_dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="learnign_rate: no such key .*did you mean learning_rate"):
        main(base + ["--override", "learnign_rate=0.1"])
    with pytest.raises(SystemExit, match="did you mean dataset#args#max_points"):
        main(base + ["--override", "dataset#args#max_pionts=5"])
    with pytest.raises(SystemExit, match="not valid JSON"):
        main(base + ["--override", 'dataset#args={"max_points": }'])
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ export


def test_export_never_deletes_what_it_did_not_write(tmp_path):
    from test_export import make_run

    from pipeline.export import export_bundle
    from pipeline.infer import TokenizerError

    run = make_run(tmp_path / "run")
    kept = sorted(p.relative_to(run) for p in run.rglob("*"))
    for out in (run, run.parent):  # the run folder itself, or a folder holding it
        with pytest.raises(TokenizerError, match="run folder"):
            export_bundle(run, out, make_zip=False, overwrite=True)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == kept
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(TokenizerError, match="not empty; pass --overwrite"):
        export_bundle(run, mine, make_zip=False)
    with pytest.raises(TokenizerError, match="not written by export"):
        export_bundle(run, mine, make_zip=False, overwrite=True)
    assert (mine / "notes.txt").read_text() == "mine"
    b = export_bundle(run, tmp_path / "b")
    with pytest.raises(TokenizerError, match="not empty"):
        export_bundle(run, b)
    (b / "docs" / "extra.md").write_text("added by hand")
    with pytest.raises(TokenizerError, match="docs/extra.md"):
        export_bundle(run, b, overwrite=True)
    (b / "docs" / "extra.md").unlink()
    assert export_bundle(run, b, overwrite=True) == b and (b / "models" / "model.pt").is_file()


def test_export_cli_refuses_non_empty_out(tmp_path):
    from test_export import make_run

    run = make_run(tmp_path / "run")
    proc = cli("pipeline.export", "--run", str(run), "--out", str(run))
    one_line_error(proc, str(run))
    assert (run / "ckpts" / "vqvae_step0000020.pt").is_file() and (run / "config.json").is_file()


# ------------------------------------------------------------------------------ bundles and tokens


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from test_export import make_run

    from pipeline.export import export_bundle

    tmp = tmp_path_factory.mktemp("bundle")
    return export_bundle(make_run(tmp / "run"), tmp / "ct_vqvae", make_zip=False)


def _crafted_bundle(bundle: Path, tmp: Path, edit) -> Path:
    import shutil

    b = tmp / "crafted"
    shutil.copytree(bundle, b)
    cfg = json.loads((b / "configs" / "inference.json").read_text())
    edit(cfg)
    (b / "configs" / "inference.json").write_text(json.dumps(cfg))
    return b


def test_bundle_expressions_are_not_run(bundle, tmp_path):
    from pipeline.infer import Tokenizer, TokenizerError

    marker = tmp_path / "pwned"
    cmd = f"$__import__('os').system('touch {marker}') or 2"

    def in_network(cfg):
        cfg["network_def"]["num_heads"] = cmd

    def target(cfg):
        cfg["network_def"]["_target_"] = "os.system"
        cfg["network_def"]["command"] = f"touch {marker}"

    def in_preprocessing(cfg):
        cfg["preprocessing"]["transforms"].insert(0, {"_target_": "os.system", "command": f"touch {marker}"})

    def in_window(cfg):
        cfg["resolution"] = cmd

    for edit, words in ((in_network, "network_def#num_heads"), (target, "os.system"), (in_window, "resolution")):
        b = _crafted_bundle(bundle, tmp_path / edit.__name__, edit)
        with pytest.raises(TokenizerError, match=words) as err:
            Tokenizer.from_bundle(b, device="cpu")
        assert "--trust-bundle" in str(err.value) and not marker.exists()
    b = _crafted_bundle(bundle, tmp_path / "pre", in_preprocessing)
    tok = Tokenizer.from_bundle(b, device="cpu")  # the standard transforms, the bundle's are not built
    assert not marker.exists() and tok.preprocessing is not None and not marker.exists()
    # a crafted model.pt in a bundle is refused too
    torch.save({"w": Payload(marker)}, b / "models" / "model.pt")
    with pytest.raises(TokenizerError, match="model.pt"):
        Tokenizer.from_bundle(b, device="cpu")
    assert not marker.exists()
    # trusting a bundle you wrote runs it (the MONAI behaviour), on request only
    b = _crafted_bundle(bundle, tmp_path / "trusted", in_network)
    Tokenizer.from_bundle(b, device="cpu", trust=True)
    assert marker.exists()


def test_decode_refuses_tokens_outside_the_latent_grid(bundle, tmp_path):
    import numpy as np

    from pipeline.infer import CTTokens, Tokenizer, TokenizerError

    tok = Tokenizer.from_bundle(bundle, device="cpu")
    latent = (tok.resolution // 8,) * 3
    good = CTTokens(coords=np.array([[0, 1, 2], [3, 3, 3]], np.int32), indices=np.array([1, 2]), window=tok.window,
                    resolution=tok.resolution, latent_shape=latent, cube_affine=np.eye(4), codebook=tok.codebook)
    assert tok.decode(good).any()
    bad = CTTokens(**{**good.__dict__, "coords": np.array([[0, 1, 2], [latent[0] + 5, 0, 0]], np.int32)})
    path = bad.save(tmp_path / "bad.npz")
    with pytest.raises(TokenizerError, match="1 of 2 tokens lie outside"):
        tok.decode(bad)
    proc = cli("pipeline.infer", "decode", str(path), str(tmp_path / "out.nii.gz"), "--bundle", str(bundle), "--device", "cpu")
    one_line_error(proc, "outside", "encode the scan again")
    assert not (tmp_path / "out.nii.gz").exists()

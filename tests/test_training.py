"""Staged training through the bundle configs on CPU with a tiny model.

- stage 0 -> 1 -> 2 chain through ``python -m monai.bundle run training`` (subprocesses);
- stage 1 freezing (summary file and unchanged Encoder / Decoder weights);
- stage 1 without weights fails naming stage 0 and pretrained_vae_path;
- resume at step k reproduces the uninterrupted run's losses; a used folder is not overwritten;
- a 2-process gloo run through ``python -m pipeline.train --num_gpus 2``.

Data: the shared abdomen NIfTI scans preprocessed to 64^3 with pipeline.preprocess, or a tiny
synthetic processed dataset when the shared scans are absent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "ct_vqvae"
sys.path.insert(0, str(Path(__file__).parent))

TINY = {
    "network_def#resolution": 8,
    "network_def#model_channels": 16,
    "network_def#latent_channels": 8,
    "network_def#channels": [8, 16, 16],
    "network_def#num_embeddings": 64,
    "network_def#num_blocks": 1,
    "network_def#num_heads": 2,
    "network_def#window_size": 4,
    "network_def#vq_kmeans_init_points": 16,
    "network_def#vq_reservoir_size": 256,
    "network_def#vq_crop_margin": 0,  # crops of 3 latent cells have no inside: k-means would wait for rows
    "dataset#args#max_points": 8000,
    "batch_size_per_gpu": 2,
    "num_workers": 0,
    "i_log": 1,
    "val_cases": 1,
}
STEP_RE = re.compile(r"Step (\d+): loss=(\S+) recon=(\S+) vq=(\S+) commitment=(\S+)")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from conftest import _ct_data_dir

    out = tmp_path_factory.mktemp("processed")
    ct = _ct_data_dir() / "abdomen_nifti"
    if (ct / "example_ct.nii.gz").is_file():
        try:
            from pipeline.preprocess import run as preprocess
        except ImportError:
            preprocess = None
        if preprocess is not None:
            raw = tmp_path_factory.mktemp("raw") / "abdomen"
            raw.mkdir()
            for name in ("example_ct.nii.gz", "example_ct_sm.nii.gz"):
                os.symlink(ct / name, raw / name)
            res = preprocess(raw.parent, out, num_workers=0, resolution=64, windows=["lung"], progress=False,
                             log=lambda *a, **k: None)
            if res["ok"] >= 2:
                return out
    from test_dataset import write_processed_dataset

    write_processed_dataset(out, "synth", num_cases=3, resolution=64, failed=0)
    return out


def _args(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += [f"--{k}", json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)]
    return out


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def bundle_run(stage: str, **overrides) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(BUNDLE / stage),
           *_args({**TINY, **overrides})]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def step_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for m in STEP_RE.finditer((run_dir / "log.txt").read_text()):
        out[int(m.group(1))] = float(m.group(2))
    return out


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def chain(data_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    s0, s1, s2 = runs / "s0", runs / "s1", runs / "s2"
    common = {"data_dir": str(data_dir), "i_save": 2}
    p0 = bundle_run("stage0.json", output_dir=str(s0), max_steps=3, i_sample=3, i_val=100, **common)
    _ok(p0)
    p1 = bundle_run("stage1.json", output_dir=str(s1), max_steps=3, i_sample=100, i_val=3,
                    pretrained_vae_path=str(s0 / "ckpts" / "vqvae_step0000003.pt"), **common)
    _ok(p1)
    p2 = bundle_run("stage2.json", output_dir=str(s2), max_steps=2, i_sample=100, i_val=100, load_dir=str(s1),
                    ckpt="latest", **common)
    _ok(p2)
    return {"s0": s0, "s1": s1, "s2": s2, "out": [p0.stdout, p1.stdout, p2.stdout]}


def test_stage_chain_files(chain):
    for name, last in (("s0", 3), ("s1", 3), ("s2", 2)):
        run = chain[name]
        ck = run / "ckpts"
        for f in (f"vqvae_step{last:07d}.pt", f"vqvae_ema0.9999_step{last:07d}.pt", f"misc_step{last:07d}.pt"):
            assert (ck / f).is_file(), f"{name}: {f} missing"
        assert (run / "vqvae_model_summary.txt").is_file() and (run / "command.txt").is_file()
        assert any((run / "tb_logs").iterdir())
        assert "monai.bundle run training" in (run / "command.txt").read_text()
        losses = step_losses(run)
        assert sorted(losses) == list(range(1, last + 1)), f"{name}: {losses}"
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
        # config.json is the resolved config: the model rebuilds from it
        from monai.bundle import ConfigParser

        cfg = json.loads((run / "config.json").read_text())
        assert cfg["network_def"]["model_channels"] == 16
        model = ConfigParser(cfg).get_parsed_content("network_def")
        model.load_state_dict(torch.load(ck / f"vqvae_step{last:07d}.pt", weights_only=True))
    assert (chain["s0"] / "samples" / "step0000003.png").is_file()
    log1 = (chain["s1"] / "log.txt").read_text()
    assert "[Stage 1]" in log1 and "Total parameters:" in log1 and "Trainable parameters:" in log1
    assert "Validation step 3:" in log1 and "psnr_body=" in log1 and "mae_hu_body=" in log1
    log2 = (chain["s2"] / "log.txt").read_text()
    assert "[Stage 2]" in log2 and "Loading checkpoint from step 3" in log2


def test_stage1_refits_the_codebook_and_stage2_keeps_it(chain, data_dir):
    """Stage 1 ends by fitting the book again to the latents of its whole training scans and saves
    that book in both weight files of its last step; stage 2 (vq frozen) decodes with exactly that book."""
    from networks.quantizer import perplexity_of
    from pipeline.evaluate import find_cases
    from pipeline.processed import load_case
    from pipeline.tokenizer import Tokenizer

    log1 = (chain["s1"] / "log.txt").read_text()
    m = re.search(r"Step 3: codebook refitted by k-means to ([\d,]+) latents of (\d+) whole training scans", log1)
    assert m is not None, log1[-2000:]
    assert log1.rindex("codebook refitted") < log1.rindex("Saved checkpoint step 3")
    ck = chain["s1"] / "ckpts"
    model = torch.load(ck / "vqvae_step0000003.pt", weights_only=True)
    ema = torch.load(ck / "vqvae_ema0.9999_step0000003.pt", weights_only=True)
    assert torch.equal(model["vq.embeddings.weight"], ema["vq.embeddings.weight"])
    tok = Tokenizer.from_checkpoint(ck / "vqvae_step0000003.pt", device="cpu")
    train = set(json.loads((chain["s1"] / "cases.json").read_text())["train"])  # the validation case is not fitted
    cases = [c for c in find_cases(data_dir, tok.window, tok.resolution) if c["case"] in train]
    z = torch.cat([tok.latents(load_case(c)["window"], load_case(c)["mask"]) for c in cases])
    assert int(m.group(1).replace(",", "")) == z.shape[0] and int(m.group(2)) == len(cases)
    books = {}
    for name, step in (("trained", 2), ("refit", 3)):  # step 2's files were written before the refit
        weights = torch.load(ck / f"vqvae_step000000{step}.pt", weights_only=True)
        tok.network.load_state_dict(weights)
        books[name] = perplexity_of(torch.bincount(tok.network.vq.quantize_indices(z), minlength=64).double())
    assert books["refit"]["perplexity"] > books["trained"]["perplexity"], books
    stage2 = torch.load(chain["s2"] / "ckpts" / "vqvae_step0000002.pt", weights_only=True)
    assert torch.equal(stage2["vq.embeddings.weight"], model["vq.embeddings.weight"])
    assert "codebook refitted" not in (chain["s2"] / "log.txt").read_text()


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """A user's mistake: non-zero exit, its line last, no traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and "Failed to instantiate" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith("error: ") and all(w in last for w in words), last
    return last


def test_stage1_refuses_checkpoint_of_another_size(chain, data_dir, tmp_path):
    """A checkpoint of another model size stops stage 1 at once in one line naming the sizes, before
    k-means, and the run folder made for it is removed."""
    out = tmp_path / "new" / "s1"
    proc = bundle_run("stage1.json", data_dir=str(data_dir), output_dir=str(out), max_steps=3,
                      pretrained_vae_path=str(chain["s0"] / "ckpts" / "vqvae_step0000003.pt"),
                      **{"network_def#model_channels": 32, "network_def#latent_channels": 4})
    last = _one_line_error(proc, "pretrained_vae_path", "another model", "model_channels 16 vs 32",
                           "latent_channels 8 vs 4")
    assert "k-means" not in proc.stdout + proc.stderr and "[Stage 1]" not in proc.stdout, last
    assert not (tmp_path / "new").exists()


def test_bundle_run_user_error_is_one_line(tmp_path):
    """A data_dir that does not exist, through python -m monai.bundle run: one line, no run folder."""
    out = tmp_path / "outputs" / "s0"
    proc = bundle_run("stage0.json", data_dir=str(tmp_path / "processed_dataset"), output_dir=str(out), max_steps=1)
    _one_line_error(proc, "processed_dataset", "is not a folder", "./run.sh preprocess")
    assert not (tmp_path / "outputs").exists()
    assert "parsing config_file" in proc.stderr  # MONAI's own warning of monai.bundle run stays
    # a misspelled key would be added to the config without a word by MONAI's runner: refused
    proc = bundle_run("stage0.json", data_dir=str(tmp_path), output_dir=str(out), max_step=1)
    _one_line_error(proc, "--max_step: no such key in", "did you mean max_steps?")
    assert not (tmp_path / "outputs").exists()
    # a value of the wrong kind, read as Fire reads it, is refused before the datasets are built
    proc = bundle_run("stage0.json", data_dir=str(tmp_path), output_dir=str(out), max_steps="abc")
    _one_line_error(proc, "--max_steps=abc: needs a number", "e.g. --max_steps 100000")
    assert not (tmp_path / "outputs").exists()
    # JSON's true is a string to Fire: the refusal gives the spelling MONAI's runner reads
    proc = bundle_run("stage0.json", data_dir=str(tmp_path), output_dir=str(out), amp=True)
    _one_line_error(proc, "--amp=true: needs True or False (Python, as MONAI's runner reads it)", "e.g. --amp False")
    assert not (tmp_path / "outputs").exists()


def test_resume_with_other_frozen_parts_names_the_setting(chain, data_dir, tmp_path):
    """A stage 2 run resumed with the Encoder trainable (its run froze it) is refused in one line naming
    both values and the fixes, before anything in the run folder changes."""
    import shutil

    run = tmp_path / "s2"
    shutil.copytree(chain["s2"], run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = bundle_run("stage2.json", output_dir=str(run), data_dir=str(data_dir), max_steps=3, i_save=2, i_sample=100,
                      i_val=100, load_dir=str(run), ckpt="latest", frozen_parts=[])
    _one_line_error(proc, "trained with frozen_parts [\"Encoder\", \"vq\"], this run asks for []",
                    "--override 'frozen_parts=[\"Encoder\", \"vq\"]'", "pretrained_vae_path")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # no lock left either


def test_train_cli_user_error_is_one_line(data_dir, tmp_path):
    """The same through ./run.sh train, with our own configs trusted (no MONAI warning)."""
    out = tmp_path / "runs" / "s2"
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(BUNDLE / "stage2.json"), "--output_dir", str(out),
           "--data_dir", str(data_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    _one_line_error(proc, "stage 2 starts from a stage 1 run", "--load_dir")
    assert proc.returncode == 2 and not (tmp_path / "runs").exists()
    assert "Warning" not in proc.stderr, proc.stderr


def _summary_grads(run: Path) -> dict[str, str]:
    """``{parameter: Grad column}`` of a run's vqvae_model_summary.txt."""
    summary = (run / "vqvae_model_summary.txt").read_text().splitlines()
    assert any(l.startswith("Name") and "Shape" in l and "Grad" in l for l in summary)
    return {l.split()[0]: l.split()[-1] for l in summary if l.startswith(("Encoder.", "Decoder.", "vq."))}


def test_stage1_freezing(chain):
    grads = _summary_grads(chain["s1"])
    assert grads and all(g == "False" for n, g in grads.items() if not n.startswith("vq."))
    assert grads["vq.embeddings.weight"] == "True"
    s0 = torch.load(chain["s0"] / "ckpts" / "vqvae_step0000003.pt", weights_only=True)
    s1 = torch.load(chain["s1"] / "ckpts" / "vqvae_step0000003.pt", weights_only=True)
    for k, v in s0.items():
        if k.startswith(("Encoder.", "Decoder.")):
            assert torch.equal(v, s1[k]), f"{k} changed in stage 1"
    assert not torch.equal(s0["vq.embeddings.weight"], s1["vq.embeddings.weight"])
    assert bool(s1["vq.initialized"])  # k-means ran
    # stage 2 as shipped (frozen_parts ["Encoder", "vq"]): the decoder trains on the tokens of the
    # latents and the book stage 1 fitted
    s2_grads = _summary_grads(chain["s2"])
    assert {n.split(".")[0] for n, g in s2_grads.items() if g == "True"} == {"Decoder"}
    assert all(g == "False" for n, g in s2_grads.items() if n.startswith(("Encoder.", "vq.")))
    assert "[Stage 2] Joint training: Decoder (Encoder, Codebook frozen)" in (chain["s2"] / "log.txt").read_text()


def test_ema_follows_kmeans_codebook(chain):
    """The EMA checkpoint holds the k-means codebook of stage 1, not the random one it replaced (step 2:
    before the refit at the end, which writes its book into both files)."""
    init = torch.load(chain["s0"] / "ckpts" / "vqvae_step0000003.pt", weights_only=True)["vq.embeddings.weight"]
    plain = torch.load(chain["s1"] / "ckpts" / "vqvae_step0000002.pt", weights_only=True)["vq.embeddings.weight"]
    ema = torch.load(chain["s1"] / "ckpts" / "vqvae_ema0.9999_step0000002.pt", weights_only=True)["vq.embeddings.weight"]
    assert (ema - plain).norm() < 0.2 * (init - plain).norm()


def test_ema_decay_warms_up():
    from pipeline.handlers import EMAHandler

    ema = EMAHandler(0.9999)
    assert ema.decay(1) == pytest.approx(2 / 11) and ema.decay(100) == pytest.approx(101 / 110)
    assert ema.decay(10**7) == 0.9999 and EMAHandler(0.9999, warmup=False).decay(1) == 0.9999

    class _State:
        iteration, output = 1, {}

    class _Engine:
        state = _State()

    net = torch.nn.Linear(2, 2)
    ema.model = net
    ema.reset()
    before = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema(_Engine())
    torch.testing.assert_close(ema.shadow["weight"], before + (1 - 2 / 11))


def _inproc(stage: str, **overrides):
    import warnings

    from monai.bundle import run

    warnings.filterwarnings("ignore", message="parsing config_file", category=UserWarning)  # our own configs
    run("training", config_file=str(BUNDLE / stage), logging_file=str(BUNDLE / "logging.conf"), **{**TINY, **overrides})


def test_stage1_needs_weights(data_dir, tmp_path):
    with pytest.raises(Exception) as err:
        _inproc("stage1.json", data_dir=str(data_dir), output_dir=str(tmp_path / "s1"), max_steps=1)
    chain_msgs = []
    e = err.value
    while e is not None:
        chain_msgs.append(str(e))
        e = e.__cause__
    text = " ".join(chain_msgs)
    assert "stage 0" in text and "pretrained_vae_path" in text


def test_resume_reproduces_losses(data_dir, tmp_path):
    common = {
        "data_dir": str(data_dir), "i_save": 100, "i_sample": 100, "i_val": 100,
        "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.ExponentialLR", "optimizer": "@optimizer", "gamma": 0.9},
    }
    full, part = tmp_path / "full", tmp_path / "part"
    _inproc("stage0.json", output_dir=str(full), max_steps=7, **common)
    _inproc("stage0.json", output_dir=str(part), max_steps=2, **common)
    # reusing a run folder without --ckpt is refused, with the resume command in the message
    with pytest.raises(Exception) as err:
        _inproc("stage0.json", output_dir=str(part), max_steps=7, **common)
    msg = str(err.value) + str(err.value.__cause__)
    assert "--load_dir" in msg and "--ckpt latest" in msg
    _inproc("stage0.json", output_dir=str(part), load_dir=str(part), ckpt="latest", max_steps=7, **common)
    a, b = step_losses(full), step_losses(part)
    assert sorted(b) == list(range(1, 8)), b
    for s in range(3, 8):
        assert b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-6), (s, a, b)
    misc = torch.load(part / "ckpts" / "misc_step0000007.pt", weights_only=True)
    assert misc["step"] == 7 and misc["scheduler"]["last_epoch"] == 7 and misc["sampler"]["start_step"] == 7
    assert "Loading checkpoint from step 2" in (part / "log.txt").read_text()


def test_two_process_gloo(data_dir, tmp_path):
    out = tmp_path / "ddp"
    over = [f"{k}={json.dumps(v)}" for k, v in {**TINY, "i_save": 2, "i_sample": 100, "i_val": 2}.items()]
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(BUNDLE / "stage0.json"), "--output_dir", str(out),
           "--data_dir", str(data_dir), "--num_gpus", "2", "--master_port", str(free_port()),
           *sum((["--override", o] for o in over), []), "--override", "max_steps=2"]
    env = _env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    _ok(proc)
    ck = sorted(p.name for p in (out / "ckpts").iterdir())
    assert ck == ["misc_step0000002.pt", "vqvae_ema0.9999_step0000002.pt", "vqvae_step0000002.pt"], ck
    assert sorted(step_losses(out)) == [1, 2]
    assert (out / "log.txt").read_text().count("Step 2: loss=") == 1
    misc = torch.load(out / "ckpts" / "misc_step0000002.pt", weights_only=True)
    assert misc["world_size"] == 2
    assert "./run.sh train" in (out / "command.txt").read_text()


def test_two_process_stage1_refits_the_codebook_on_rank_0(chain, data_dir, tmp_path):
    """Under torchrun rank 0 refits the book alone while the other rank waits for it; both ranks end,
    and the last checkpoint holds the refitted book (the same in both weight files)."""
    out = tmp_path / "ddp2"
    over = [f"{k}={json.dumps(v)}" for k, v in {**TINY, "i_save": 100, "i_sample": 100, "i_val": 100}.items()]
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(BUNDLE / "stage1.json"), "--output_dir", str(out),
           "--data_dir", str(data_dir), "--num_gpus", "2", "--master_port", str(free_port()),
           "--override", f'pretrained_vae_path="{chain["s0"] / "ckpts" / "vqvae_step0000003.pt"}"',
           *sum((["--override", o] for o in over), []), "--override", "max_steps=2"]
    env = _env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    _ok(proc)
    log = (out / "log.txt").read_text()
    assert log.count("codebook refitted by k-means") == 1 and "codebook refit failed" not in log
    model = torch.load(out / "ckpts" / "vqvae_step0000002.pt", weights_only=True)
    ema = torch.load(out / "ckpts" / "vqvae_ema0.9999_step0000002.pt", weights_only=True)
    stage1 = torch.load(sorted((chain["s1"] / "ckpts").glob("vqvae_step*.pt"))[-1], weights_only=True)
    assert torch.equal(model["vq.embeddings.weight"], ema["vq.embeddings.weight"])
    # the same encoder, training scans and seed: rank 0's fit is the one a single process made
    assert torch.allclose(model["vq.embeddings.weight"], stage1["vq.embeddings.weight"], atol=1e-5)

"""Bundle export: MONAI bundle layout, metadata schema, loading elsewhere, same tokens as the run."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY, tiny_net
from pipeline.bundle_docs import MB_METADATA_SCHEMA
from pipeline.export import export_bundle, main, verify_bundle
from pipeline.infer import Tokenizer
from pipeline.io_utils import TokenizerError
from pipeline.phantom import write_phantom

ROOT = Path(__file__).resolve().parents[1]


def make_run(folder: Path, window="lung") -> Path:
    """A run folder as pipeline.train writes it, with different plain and EMA weights."""
    (folder / "ckpts").mkdir(parents=True, exist_ok=True)
    cfg = {"window_type": window, "lambda_vq": 1.0, "network_def": {**TINY, "lambda_vq": "@lambda_vq"}}
    (folder / "config.json").write_text(json.dumps(cfg))
    for seed, name in ((0, "vqvae_step0000020.pt"), (1, "vqvae_ema0.9999_step0000020.pt"), (2, "vqvae_ema0.9999_step0000010.pt")):
        torch.save(tiny_net(seed).state_dict(), folder / "ckpts" / name)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    run = make_run(tmp / "run")
    summary = {"num_cases": 2, "overall": {"psnr_body": 30.5, "ssim_body": 0.9, "mae_hu_body": 12.0, "perplexity": 20.0}}
    (tmp / "summary.json").write_text(json.dumps(summary))
    assert main(["--run", str(run), "--out", str(tmp / "dist" / "ct_vqvae"), "--eval", str(tmp / "summary.json")]) == 0
    return run, tmp / "dist" / "ct_vqvae"


def test_layout_and_metadata(exported):
    run, b = exported
    for rel in ("configs/metadata.json", "configs/inference.json", "configs/logging.conf", "models/model.pt",
                "docs/README.md", "docs/license.txt", "LICENSE"):
        assert (b / rel).is_file(), rel
    meta = json.loads((b / "configs" / "metadata.json").read_text())
    import monai

    assert meta["monai_version"] == monai.__version__ and meta["pytorch_version"] == torch.__version__.split("+")[0]
    assert meta["numpy_version"] == np.__version__ and "spconv" in meta["required_packages_version"]
    assert meta["window"] == {"name": "lung", "width": 1500.0, "level": -600.0}
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32, 32]
    assert meta["network_data_format"]["outputs"]["tokens"]["value_range"] == [0, 63]
    assert meta["eval_metrics"]["psnr_body"] == 30.5
    readme = (b / "docs" / "README.md").read_text()
    assert "lung" in readme and "30.5" in readme and "TorchScript" in readme and "ONNX" in readme
    inf = json.loads((b / "configs" / "inference.json").read_text())
    assert inf["network_def"]["lambda_vq"] == 1.0 and inf["window"]["name"] == "lung" and inf["resolution"] == 32
    assert inf["preprocessing"] == {"_target_": "transforms.CTModelInputd", "window": "@window",
                                    "resolution": "@resolution"}
    # EMA weights of the latest step by default
    sd = torch.load(b / "models" / "model.pt", weights_only=True)
    ema = torch.load(run / "ckpts" / "vqvae_ema0.9999_step0000020.pt", weights_only=True)
    assert all(torch.equal(sd[k], ema[k]) for k in ema)
    with zipfile.ZipFile(b.with_name("ct_vqvae.zip")) as zf:
        assert "ct_vqvae/configs/metadata.json" in zf.namelist() and "ct_vqvae/models/model.pt" in zf.namelist()


def test_readable_and_portable(tmp_path):
    """Others on a shared server can read the bundle (0755 / 0644 under umask 022); its README names no
    path of this machine and shows commands that work beside a copied bundle; no deprecated metadata key."""
    run = make_run(tmp_path / "work" / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["data_dir"] = str(tmp_path / "work" / "processed_dataset")
    (run / "config.json").write_text(json.dumps(cfg))
    old = os.umask(0o022)
    try:
        b = export_bundle(run, tmp_path / "dist" / "ct_vqvae",
                          eval_summary={"num_cases": 1, "data_dir": cfg["data_dir"], "overall": {"psnr_body": 30.0}})
    finally:
        os.umask(old)
    modes = {p.relative_to(b).as_posix() or ".": p.stat().st_mode & 0o777 for p in [b, *b.rglob("*")]}
    assert modes["."] == 0o755 and modes["models"] == 0o755 and modes["models/model.pt"] == 0o644, modes
    assert set(modes.values()) == {0o755, 0o644}, modes
    assert (b.with_name("ct_vqvae.zip").stat().st_mode & 0o777) == 0o644
    readme = (b / "docs" / "README.md").read_text()
    meta_text = (b / "configs" / "metadata.json").read_text()
    for text in (readme, meta_text):
        assert str(tmp_path) not in text and "/tmp" not in text
    assert "processed_dataset" in readme
    assert "./run.sh" not in readme and readme.count("python -m monai.bundle run") == 2 and "--mode decode" in readme
    assert "monai.bundle.load('ct_vqvae', bundle_dir='.', workflow_type='inference')" in readme
    assert "optional_packages_version" not in meta_text


def test_verify_metadata(exported, tmp_path):
    pytest.importorskip("jsonschema", reason="monai.bundle.verify_metadata needs jsonschema (in requirements.txt)")
    _, b = exported
    verify_bundle(b)  # monai.bundle.verify_metadata against the local schema (no download)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(MB_METADATA_SCHEMA))
    verify_bundle(b, schema_file=schema)
    bad = tmp_path / "bad"
    shutil.copytree(b, bad)
    meta = json.loads((bad / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["modality"]
    (bad / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError):
        verify_bundle(bad)


def test_same_tokens_when_copied_alone(exported, tmp_path):
    run, b = exported
    alone = tmp_path / "elsewhere" / "ct_vqvae"
    shutil.copytree(b, alone)
    scan = write_phantom(tmp_path / "raw", seed=3, shape=(40, 40, 30), spacing=8.0)["ct"]
    ref = Tokenizer.from_checkpoint(run / "ckpts" / "vqvae_ema0.9999_step0000020.pt", device="cpu").encode(str(scan))
    tok = Tokenizer.from_bundle(alone, device="cpu")
    t = tok.encode(str(scan))
    assert np.array_equal(t.indices, ref.indices) and np.array_equal(t.coords, ref.coords)
    # monai.bundle.load builds network_def from configs/inference.json and loads models/model.pt
    import monai.bundle

    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = monai.bundle.load(name="ct_vqvae", bundle_dir=str(alone.parent), workflow_type="inference", device="cpu")
    assert isinstance(net, torch.nn.Module) and not any("deprecated" in str(w.message) for w in caught)
    sd = torch.load(alone / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in sd.items())
    # ConfigWorkflow, as `python -m monai.bundle run` does
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=str(alone / "configs" / "inference.json"), workflow_type="inference",
                        bundle_root=str(alone), input_files=[str(scan)], output_dir=str(tmp_path / "out"), device="cpu")
    wf.initialize()
    wf.run()
    wf.finalize()
    from pipeline.tokens import CTTokens

    out = CTTokens.load(tmp_path / "out" / f"{scan.name[:-7]}_tokens.npz")
    assert np.array_equal(out.indices, ref.indices)


@pytest.mark.slow
def test_monai_bundle_run_cli(exported, tmp_path):
    """`python -m monai.bundle run` in another folder, the bundle copied there alone."""
    _, b = exported
    shutil.copytree(b, tmp_path / "ct_vqvae")
    scan = write_phantom(tmp_path, seed=0, shape=(40, 40, 30), spacing=8.0)["ct"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "ct_vqvae/configs/inference.json",
         "--bundle_root", "ct_vqvae", "--input_files", f"['{scan.name}']", "--output_dir", "out", "--device", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "phantom_000_tokens.npz").is_file()
    assert f"encoded {scan.name} -> out/phantom_000_tokens.npz" in r.stdout + r.stderr  # says what it wrote
    # a missing input: named in one line and skipped, the other still written, one error line last
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "ct_vqvae/configs/inference.json",
         "--bundle_root", "ct_vqvae", "--input_files", f"['nope.nii.gz', '{scan.name}']", "--output_dir", "out2",
         "--device", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[-1].startswith("error: 1 of 2 input(s) failed, e.g. nope.nii.gz")
    assert "skipped nope.nii.gz" in r.stdout + r.stderr and (tmp_path / "out2" / "phantom_000_tokens.npz").is_file()
    # a device this machine lacks: one line, nothing written
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "ct_vqvae/configs/inference.json",
         "--bundle_root", "ct_vqvae", "--input_files", f"['{scan.name}']", "--output_dir", "out3",
         "--device", "cpu" if torch.cuda.is_available() else "cuda", "--tile", "-16"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    expected = "error: tile -16" if torch.cuda.is_available() else "error: device 'cuda': no CUDA GPU is visible here; use cpu"
    assert r.returncode != 0 and "Traceback" not in r.stderr and lines[-1].startswith(expected), r.stderr[-2000:]
    assert not (tmp_path / "out3").exists()


def test_choice_of_weights_and_errors(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    out = export_bundle(run, tmp_path / "plain", weights="model", make_zip=False)
    sd = torch.load(out / "models" / "model.pt", weights_only=True)
    plain = torch.load(run / "ckpts" / "vqvae_step0000020.pt", weights_only=True)
    assert all(torch.equal(sd[k], plain[k]) for k in plain) and not (tmp_path / "plain.zip").exists()
    out = export_bundle(run, tmp_path / "old", ckpt=run / "ckpts" / "vqvae_ema0.9999_step0000010.pt", make_zip=False)
    old = torch.load(run / "ckpts" / "vqvae_ema0.9999_step0000010.pt", weights_only=True)
    assert all(torch.equal(torch.load(out / "models" / "model.pt", weights_only=True)[k], old[k]) for k in old)
    # a step number, as train --ckpt takes it: that step's EMA weights (plain ones with --weights model)
    assert main(["--run", str(run), "--ckpt", "10", "--out", str(tmp_path / "step10"), "--no-zip"]) == 0
    out = tmp_path / "step10"
    assert all(torch.equal(torch.load(out / "models" / "model.pt", weights_only=True)[k], old[k]) for k in old)
    with pytest.raises(TokenizerError, match=r"no weights of step 15 \(steps saved: 10, 20\)"):
        export_bundle(run, tmp_path / "step15", ckpt="15")
    # re-export over an existing bundle replaces it with --overwrite, and its zip: without a new zip
    # the old one would no longer hold this bundle
    (tmp_path / "old.zip").write_bytes(b"an earlier export's zip")
    export_bundle(run, tmp_path / "old", make_zip=False, overwrite=True)
    assert not (tmp_path / "old.zip").exists()
    with pytest.raises(TokenizerError, match=r"--eval .*nope\.json: no such file; pass the summary\.json"):
        export_bundle(run, tmp_path / "new", eval_summary=tmp_path / "nope.json")
    assert not (tmp_path / "new").exists()
    # a run without checkpoints / without config: one line, non-zero exit
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((run / "config.json").read_text())
    with pytest.raises(SystemExit) as e:
        main(["--run", str(tmp_path / "empty"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and err.startswith("error:") and "ckpts" in err and "\n" not in err
    with pytest.raises(TokenizerError, match="config.json"):
        export_bundle(tmp_path / "nowhere", tmp_path / "y")
    # a bundle missing a file
    b = export_bundle(run, tmp_path / "b", make_zip=False)
    (b / "models" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="model.pt"):
        verify_bundle(b)  # checks the files before the schema
    with pytest.raises(TokenizerError, match="model.pt"):
        Tokenizer.from_bundle(b)


@pytest.mark.parametrize("vq", [{"vq_depth": 2}, {"vq_type": "fsq", "fsq_levels": [4, 4, 4]}, {"vq_type": "factorized"}, {"vq_type": "simvq"}])
def test_bundle_of_each_quantizer_round_trips_tokens(tmp_path, vq):
    """A run with a residual, FSQ or factorised quantizer exports; the bundle, copied alone, decodes
    the tokens it encodes exactly as the run's checkpoint does."""
    run = tmp_path / "run"
    (run / "ckpts").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"window_type": "lung", "network_def": {**TINY, **vq}}))
    torch.save(tiny_net(0, **vq).state_dict(), run / "ckpts" / "vqvae_step0000005.pt")
    export_bundle(run, tmp_path / "dist" / "b", weights="model", make_zip=False)
    alone = shutil.copytree(tmp_path / "dist" / "b", tmp_path / "elsewhere" / "b")
    from_bundle = Tokenizer.from_bundle(alone, device="cpu", tile=None)
    from_run = Tokenizer.from_checkpoint(run / "ckpts" / "vqvae_step0000005.pt", device="cpu", tile=None)
    w = np.zeros((32, 32, 32), np.float32)
    w[4:28, 6:26, 3:29] = np.random.default_rng(2).random((24, 20, 26))
    tokens = from_bundle.encode_arrays(w, w > 0)
    assert tokens.depth == vq.get("vq_depth", 1) and tokens.codebook == from_run.codebook
    back = type(tokens).load(tokens.save(tmp_path / "t.npz"))
    np.testing.assert_allclose(from_bundle.decode(back), from_run.decode(back), atol=1e-6)
    if tokens.depth > 1:
        np.testing.assert_allclose(from_bundle.decode(back, depth=1), from_run.decode(back, depth=1), atol=1e-6)


def test_export_warns_of_a_codebook_level_without_k_means(tmp_path, capsys):
    """A run that ended before a level's k-means exports, with one warning naming the level."""
    net_def = {**TINY, "vq_depth": 2, "vq_kmeans_init": True}
    run = tmp_path / "run"
    (run / "ckpts").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"window_type": "lung", "network_def": net_def}))
    net = tiny_net(0, vq_depth=2, vq_kmeans_init=True)
    net.vq.levels[0].initialized.fill_(True)  # level 1 got its k-means, level 2 did not
    torch.save(net.state_dict(), run / "ckpts" / "vqvae_step0000005.pt")
    export_bundle(run, tmp_path / "b", weights="model", make_zip=False)
    err = capsys.readouterr().err
    assert "codebook level 2 of 2 never got its k-means" in err and "level 1" not in err
    net.vq.levels[1].initialized.fill_(True)
    torch.save(net.state_dict(), run / "ckpts" / "vqvae_step0000005.pt")
    export_bundle(run, tmp_path / "b", weights="model", make_zip=False, overwrite=True)
    assert "k-means" not in capsys.readouterr().err


def test_checkpoint_by_step_number(tmp_path):
    """``--ckpt STEP``: that step's EMA weights, its plain ones where the step has no EMA file, and a
    one-line error listing the saved steps otherwise."""
    from pipeline.runs import find_checkpoint

    ck = tmp_path / "ckpts"
    ck.mkdir()
    for name in ("vqvae_step0000500.pt", "vqvae_step0001000.pt", "vqvae_ema0.9999_step0001000.pt"):
        (ck / name).write_bytes(b"")
    assert find_checkpoint(tmp_path, "1000").name == "vqvae_ema0.9999_step0001000.pt"
    assert find_checkpoint(tmp_path, "1000", weights="model").name == "vqvae_step0001000.pt"
    assert find_checkpoint(tmp_path, "500").name == "vqvae_step0000500.pt"
    assert find_checkpoint(tmp_path, None).name == "vqvae_ema0.9999_step0001000.pt"
    with pytest.raises(TokenizerError, match=r"no weights of step 700 \(steps saved: 500, 1000\)"):
        find_checkpoint(tmp_path, "700")
    with pytest.raises(TokenizerError, match="checkpoint not found"):
        find_checkpoint(tmp_path, "\u00b2")  # a digit to str.isdigit, not a step number
    # a file that is no checkpoint is named as such, before the run config is looked for
    from pipeline.runs import load_run_model

    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"")
    with pytest.raises(TokenizerError, match=r"scan\.nii\.gz: not a checkpoint; pass a run folder or its ckpts/vqvae_\*step\*\.pt$"):
        load_run_model(scan)

"""Whole-scan encode/decode: Tokenizer API, token files, CLI and its one-line errors."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import TINY, tiny_net
from pipeline.infer import Tokenizer, main, parse_window
from pipeline.io_utils import TokenizerError
from pipeline.tokens import CTTokens
from pipeline.phantom import write_phantom

ROOT = Path(__file__).resolve().parents[1]


def make_run(folder: Path, window="soft_tissue", seed=0, **over) -> Path:
    """A run folder as pipeline.train writes it: config.json + ckpts/."""
    net = tiny_net(seed, **over)
    (folder / "ckpts").mkdir(parents=True, exist_ok=True)
    cfg = {"window_type": window, "use_checkpoint": False, "network_def": {**TINY, **over, "use_checkpoint": "@use_checkpoint"}}
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save(net.state_dict(), folder / "ckpts" / "vqvae_step0000010.pt")
    torch.save(net.state_dict(), folder / "ckpts" / "vqvae_ema0.9999_step0000010.pt")
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("raw"), seed=0, shape=(40, 40, 30), spacing=8.0)["ct"]


def test_tiled_equals_untiled():
    net = tiny_net()
    tiled = Tokenizer(net, "soft_tissue", device="cpu", tile=2)
    whole = Tokenizer(net, "soft_tissue", device="cpu", tile=None)
    rng = np.random.default_rng(0)
    w = np.zeros((32, 32, 32), np.float32)
    w[3:29, 5:27, 2:30] = rng.random((26, 22, 28))
    a, b = tiled.encode_arrays(w, w > 0), whole.encode_arrays(w, w > 0)
    assert len(a) > 8 and np.array_equal(a.coords, b.coords) and np.array_equal(a.indices, b.indices)
    ra, rb = tiled.decode(a), whole.decode(b)
    assert ra.shape == (32, 32, 32) and ra.max() > 0
    np.testing.assert_allclose(ra, rb, atol=1e-5)
    # decoded cells are exactly the 8^3 children of the tokens; zeros elsewhere
    cells = np.zeros((4, 4, 4), bool)
    cells[tuple(a.coords.T)] = True
    assert not ra[~np.kron(cells, np.ones((8, 8, 8), bool)).astype(bool)].any()


def test_long_tile_loops_report_progress(monkeypatch, caplog):
    """A whole scan on a CPU takes minutes: the tile loop says how far it is, at most every 10 s
    (a clock that jumps 11 s per tile here), and never after its last tile."""
    import networks.tiling as tiling

    clock = iter(range(0, 10000, 11))
    monkeypatch.setattr(tiling.time, "monotonic", lambda: float(next(clock)))
    tok = Tokenizer(tiny_net(), "soft_tissue", device="cpu", tile=2)
    w = np.zeros((32, 32, 32), np.float32)
    w[3:29, 5:27, 2:30] = 0.5
    with caplog.at_level("INFO", logger="ctvq.tiles"):
        tok.encode_arrays(w, w > 0)
    lines = [r.getMessage() for r in caplog.records if r.name == "ctvq.tiles"]
    total = int(lines[0].split(" of ")[1].split()[0])
    assert total == 8 and lines[:2] == ["1 of 8 tiles, 11 s", "2 of 8 tiles, 22 s"] and len(lines) == total - 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: arrays are sparsified on the model's device")
def test_gpu_tokens_equal_cpu_tokens():
    """encode_arrays/decode on CUDA (support found on the GPU, fp32) give the CPU's tokens and volume."""
    net = tiny_net()
    rng = np.random.default_rng(1)
    w = np.zeros((32, 32, 32), np.float32)
    w[4:28, 6:26, 3:29] = rng.random((24, 20, 26))
    cpu = Tokenizer(net, "soft_tissue", device="cpu", tile=2)
    gpu = Tokenizer(tiny_net(), "soft_tissue", device="cuda", tile=2, amp=False)
    a, b = cpu.encode_arrays(w, w > 0), gpu.encode_arrays(w, w > 0)
    assert np.array_equal(a.coords, b.coords) and (a.indices == b.indices).mean() > 0.99
    np.testing.assert_allclose(gpu.decode(a), cpu.decode(a), atol=1e-4)


def test_encode_scan_roundtrip(run_dir, phantom, tmp_path):
    tok = Tokenizer.from_checkpoint(run_dir / "ckpts" / "vqvae_ema0.9999_step0000010.pt", device="cpu")
    assert tok.window == parse_window("soft_tissue") and tok.resolution == 32
    t = tok.encode(str(phantom))
    assert len(t) > 0 and t.coords.shape == (len(t), 3) and t.latent_shape == (4, 4, 4)
    assert t.source_shape == (40, 40, 30) and t.original_shape == (40, 40, 30)
    path = t.save(tmp_path / "t.npz")
    back = CTTokens.load(path)
    assert np.array_equal(back.indices, t.indices) and np.array_equal(back.coords, t.coords)
    assert back.window == t.window and np.allclose(back.cube_affine, t.cube_affine)
    assert t.source == str(phantom) and back.source == phantom.name  # no folders in a shared file
    hu, aff = tok.decode_hu(back)
    assert hu.shape == (32, 32, 32) and np.allclose(aff, t.cube_affine)
    w = tok.window
    assert hu.min() >= w.level - w.width / 2 - 1e-3 and hu.max() <= w.level + w.width / 2 + 1e-3
    np.testing.assert_allclose(hu, w.level - w.width / 2 + tok.decode(back) * w.width, atol=1e-3)
    hu2, aff2 = tok.decode_hu(back, original_grid=True)
    assert hu2.shape == (40, 40, 30) and np.allclose(aff2, nib.load(str(phantom)).affine)
    # a MetaTensor gives the same tokens as the path
    from transforms import LoadCT

    t2 = tok.encode(LoadCT()(str(phantom)))
    assert np.array_equal(t2.indices, t.indices)


def test_real_scan_original_grid(ct_data_dir, run_dir, tmp_path):
    scan = ct_data_dir / "abdomen_nifti" / "example_ct_sm.nii.gz"
    tok = Tokenizer.from_checkpoint(run_dir / "ckpts" / "vqvae_step0000010.pt", device="cpu")
    assert main(["encode", str(scan), str(tmp_path / "t.npz"), "--ckpt", str(run_dir / "ckpts" / "vqvae_step0000010.pt")]) == 0
    assert main(["decode", str(tmp_path / "t.npz"), str(tmp_path / "r.nii.gz"), "--ckpt", str(run_dir), "--original-grid"]) == 0
    src, out = nib.load(str(scan)), nib.load(str(tmp_path / "r.nii.gz"))
    assert out.shape == src.shape and np.allclose(out.affine, src.affine, atol=1e-4)
    assert main(["decode", str(tmp_path / "t.npz"), str(tmp_path / "c.nii.gz"), "--ckpt", str(run_dir)]) == 0
    assert nib.load(str(tmp_path / "c.nii.gz")).shape == (32, 32, 32)
    assert np.array_equal(CTTokens.load(tmp_path / "t.npz").indices, tok.encode(str(scan)).indices)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_errors(run_dir, phantom, tmp_path, capsys):
    ck = run_dir / "ckpts" / "vqvae_step0000010.pt"
    # missing checkpoint
    err = _one_line_error(capsys, ["encode", str(phantom), str(tmp_path / "t.npz"), "--ckpt", str(run_dir / "ckpts" / "nope.pt")])
    assert "nope.pt" in err and "checkpoint" in err
    # checkpoint of another model size
    other = make_run(tmp_path / "other", num_embeddings=32)
    (other / "config.json").write_text((run_dir / "config.json").read_text())
    err = _one_line_error(capsys, ["encode", str(phantom), str(tmp_path / "t.npz"), "--ckpt", str(other / "ckpts" / "vqvae_step0000010.pt")])
    assert "vq.embeddings.weight" in err and "config.json" in err
    # a scan the preprocessing refuses
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    err = _one_line_error(capsys, ["encode", str(bad), str(tmp_path / "t.npz"), "--ckpt", str(ck)])
    assert "bad.nii.gz" in err
    # no model given
    assert "--bundle" in _one_line_error(capsys, ["encode", str(phantom), str(tmp_path / "t.npz")])
    # bundle folder without its weights
    b = tmp_path / "bundle"
    (b / "configs").mkdir(parents=True)
    (b / "configs" / "inference.json").write_text(json.dumps({"network_def": TINY, "window_type": "soft_tissue"}))
    err = _one_line_error(capsys, ["encode", str(phantom), str(tmp_path / "t.npz"), "--bundle", str(b)])
    assert "model.pt" in err and "export" in err
    # tokens of another window / another model
    tok = Tokenizer.from_checkpoint(ck, device="cpu")
    t = tok.encode(str(phantom))
    lung = make_run(tmp_path / "lung", window="lung")
    with pytest.raises(TokenizerError, match="window"):
        Tokenizer.from_checkpoint(lung / "ckpts" / "vqvae_step0000010.pt", device="cpu").decode(t)
    t.save(tmp_path / "t.npz")
    other_w = make_run(tmp_path / "seed1", seed=1)
    err = _one_line_error(capsys, ["decode", str(tmp_path / "t.npz"), str(tmp_path / "r.nii.gz"), "--ckpt", str(other_w)])
    assert "another model" in err and err.startswith(f"error: {tmp_path / 't.npz'}:")  # the file the user passed
    assert not (tmp_path / "r.nii.gz").exists()
    # not a token file
    (tmp_path / "x.npz").write_bytes(b"junk")
    assert "x.npz" in _one_line_error(capsys, ["decode", str(tmp_path / "x.npz"), str(tmp_path / "r.nii.gz"), "--ckpt", str(ck)])


@pytest.mark.parametrize("cmd,out,fix", [
    ("encode", "tokens_wrong.nii.gz", ".npz"),
    ("encode", "tokens", ".npz"),
    ("decode", "out.npy", ".nii.gz"),
    ("decode", "out.npz", ".nii.gz"),
    ("encode", "a_folder", "is a folder"),
    ("decode", "a_folder.nii.gz", "is a folder"),
])
def test_out_refused_before_any_work(run_dir, phantom, tmp_path, capsys, monkeypatch, cmd, out, fix):
    """OUT of the wrong kind, or an existing folder: one line naming it and the fix, exit 2, nothing
    written, and the model is never loaded (the check comes first)."""
    import pipeline.infer as infer

    ck = run_dir / "ckpts" / "vqvae_step0000010.pt"
    tokens = tmp_path / "in.npz"
    Tokenizer.from_checkpoint(ck, device="cpu").encode(str(phantom)).save(tokens)
    target = tmp_path / out
    if "folder" in out:
        target.mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    monkeypatch.setattr(infer, "_tokenizer_from_args", lambda a: pytest.fail("the model was loaded"))
    src = str(phantom) if cmd == "encode" else str(tokens)
    with pytest.raises(SystemExit) as e:
        main([cmd, src, str(target), "--ckpt", str(ck), "--device", "cpu"])
    assert e.value.code == 2  # as the module's other usage errors (cli_errors)
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {target}:") and "\n" not in err and fix in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert not target.exists() or target.is_dir() and not any(target.iterdir())


@pytest.mark.parametrize("out", ["r.nii"])
def test_decode_writes_nii_too(run_dir, phantom, tmp_path, out):
    ck = run_dir / "ckpts" / "vqvae_step0000010.pt"
    Tokenizer.from_checkpoint(ck, device="cpu").encode(str(phantom)).save(tmp_path / "t.npz")
    assert main(["decode", str(tmp_path / "t.npz"), str(tmp_path / out), "--ckpt", str(ck), "--device", "cpu"]) == 0
    assert nib.load(str(tmp_path / out)).shape == (32, 32, 32)


def test_atomic_path_refuses_a_folder_before_writing(tmp_path):
    from pipeline.io_utils import atomic_path, save_text

    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        with atomic_path(tmp_path / "d"):
            pytest.fail("the body ran")
    with pytest.raises(IsADirectoryError):
        save_text(tmp_path / "d", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and not any((tmp_path / "d").iterdir())


def test_cli_subprocess_no_traceback(run_dir, tmp_path):
    """run.sh path: a refused scan gives one line on stderr and a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CTVQ_DEBUG", None)
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.infer", "encode", str(tmp_path / "missing_scan.nii.gz"), str(tmp_path / "o.npz"),
         "--ckpt", str(run_dir / "ckpts" / "vqvae_step0000010.pt")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "missing_scan.nii.gz" in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd, source, out", [("encode", "missing_scan.nii.gz", "t.npz"), ("decode", "missing.npz", "o.nii.gz")])
def test_missing_input_refused_before_the_model_loads(tmp_path, capsys, cmd, source, out):
    """A missing scan or token file is named before the bundle is read (here there is no bundle at
    all), so a typo costs no model load, and nothing is written."""
    with pytest.raises(SystemExit) as e:
        main([cmd, str(tmp_path / source), str(tmp_path / out), "--bundle", str(tmp_path / "no_bundle")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / source}: ") and "no_bundle" not in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [(["--device", "gpu"], "device 'gpu' is not a device; use cpu, cuda or cuda:N"),
                                           (["--tile", "-16"], "tile -16: give a latent tile edge >= 1")]
                         + ([] if torch.cuda.is_available() else
                            [(["--device", "cuda"], "device 'cuda': no CUDA GPU is visible here; use cpu")]))
def test_bad_device_or_tile_is_one_line(run_dir, phantom, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["encode", str(phantom), str(tmp_path / "t.npz"), "--ckpt", str(run_dir / "ckpts" / "vqvae_step0000010.pt"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}") and not (tmp_path / "t.npz").exists()


def test_run_sh_takes_paths_relative_to_where_it_runs(run_dir, tmp_path):
    """``/path/to/run.sh decode`` from another folder reads and writes the relative paths given there,
    and runs ctvq's code even where that folder has its own ``pipeline/`` and ``networks.py``."""
    from pipeline.phantom import write_phantom_dataset

    (tmp_path / "pipeline").mkdir()
    for own in (tmp_path / "pipeline" / "__init__.py", tmp_path / "networks.py"):
        own.write_text("raise SystemExit('the user folder\'s own module was imported')\n")

    raw = write_phantom_dataset(tmp_path / "raw", seeds=[0], shape=(24, 24, 20), spacing=8.0)
    scan = sorted(p for p in raw.rglob("*.nii.gz") if "_seg" not in p.name)[0]
    tokens = Tokenizer.from_checkpoint(run_dir / "ckpts" / "vqvae_step0000010.pt", device="cpu").encode(str(scan))
    tokens.save(tmp_path / "t.npz")
    env = {k: v for k, v in os.environ.items() if k != "CTVQ_DEBUG"}
    env["CTVQ_VENV"] = str(Path(sys.executable).parents[1])
    r = subprocess.run([str(ROOT / "run.sh"), "decode", "t.npz", "out.nii.gz", "--ckpt",
                        str(run_dir / "ckpts" / "vqvae_step0000010.pt"), "--device", "cpu"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out.nii.gz").stat().st_size > 0 and not (ROOT / "out.nii.gz").exists()


def test_residual_tokens_round_trip_and_decode_by_depth(tmp_path):
    """A vq_depth=2 model: token files keep both levels and their depth; decode --depth 1 gives the
    coarse volume, --depth 3 is refused in one line."""
    run = make_run(tmp_path / "run", vq_depth=2)
    tok = Tokenizer.from_checkpoint(run, device="cpu", tile=None)
    rng = np.random.default_rng(1)
    w = np.zeros((32, 32, 32), np.float32)
    w[4:28, 6:26, 3:29] = rng.random((24, 20, 26))
    tokens = tok.encode_arrays(w, w > 0)
    assert tokens.indices.shape == (len(tokens), 2) and tokens.depth == 2
    path = tokens.save(tmp_path / "t.npz")
    back = CTTokens.load(path)
    assert back.depth == 2 and np.array_equal(back.indices, tokens.indices)
    full, coarse = tok.decode(back), tok.decode(back, depth=1)
    assert np.abs(full - coarse).max() > 1e-3
    with pytest.raises(TokenizerError, match="--depth 3: .*holds 2 level"):
        tok.decode(back, depth=3)
    out = tmp_path / "coarse.nii.gz"
    tiles = logging.getLogger("ctvq.tiles")
    before = (tiles.level, tiles.propagate, list(tiles.handlers))
    assert main(["decode", str(path), str(out), "--ckpt", str(run / "ckpts" / "vqvae_step0000010.pt"), "--device", "cpu",
                 "--depth", "1"]) == 0
    assert (tiles.level, tiles.propagate, list(tiles.handlers)) == before  # the command's progress logging is undone
    assert nib.load(out).shape == (32, 32, 32)


def test_evaluate_usage_names_run_sh(capsys):
    """``./run.sh evaluate --help`` shows the command the user typed, as train and preprocess do."""
    from pipeline import evaluate

    with pytest.raises(SystemExit) as e:
        evaluate.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ./run.sh evaluate") and "python -m pipeline.evaluate" not in out


@pytest.mark.parametrize("command", [["pipeline.infer", "encode"], ["pipeline.infer", "decode"], ["pipeline.evaluate"],
                                     ["pipeline.train"], ["pipeline.preprocess"]])
def test_help_answers_without_loading_torch(command):
    """``./run.sh encode|decode|evaluate|train|preprocess --help`` print their help without importing
    torch or MONAI (seconds each on a cold start)."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['x', *{command[1:]!r}, '--help']\n"
            "try:\n"
            f"    runpy.run_module({command[0]!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "heavy = sorted(m for m in ('torch', 'monai', 'spconv') if m in sys.modules)\n"
            "print('loaded:', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout and proc.stdout.rstrip().endswith("loaded: []"), proc.stdout[-500:]

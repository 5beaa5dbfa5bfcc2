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
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

TINY = dict(resolution=4, model_channels=16, latent_channels=8, channels=(8, 16, 16), num_embeddings=16,
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
    from pipeline.run_folder import prepare_run_folder
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


def test_train_cli_errors_are_one_line(data, run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / "run")
    misc = run / "ckpts" / "misc_step0000002.pt"
    misc.write_bytes(misc.read_bytes()[:300])
    before = (run / "config.json").read_text()
    base = ["pipeline.train", "--config", str(ROOT / "bundles" / "ct_vqvae" / "stage0.json"),
            "--data_dir", str(Path(data.datasets[0]).parent), "--override", "num_workers=0"]
    one_line_error(cli(*base, "--output_dir", str(run), "--load_dir", str(run), "--ckpt", "latest"),
                   "misc_step0000002.pt", "truncated or corrupt")
    assert (run / "config.json").read_text() == before
    (tmp_path / "file").write_text("x")
    one_line_error(cli(*base, "--output_dir", str(tmp_path / "file")), "is a file")


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
        # resuming it while it runs (no checkpoint yet): the busy folder is named, not a missing checkpoint
        with pytest.raises(FileExistsError, match="another training run"):
            _trainer(data, out, 2, load_dir=out)
        assert not (out / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    _trainer(data, out, 2).run()  # free again once the other run ended
    assert (out / "ckpts" / "misc_step0000002.pt").is_file()


def test_override_typo_and_bad_json_are_refused(tmp_path, monkeypatch, capsys):
    """Each refused in one line on stderr, exit 2 (as every other user error), nothing written."""
    import re

    from pipeline.train import main

    monkeypatch.setenv("CTVQ_COMMAND", "test")  # main() sets it for the run: undone after the test

    base = ["--config", str(ROOT / "bundles" / "ct_vqvae" / "stage0.json"), "--output-dir", str(tmp_path / "run"),
            "--data_dir", str(tmp_path)]  # either spelling of the options
    for override, expected in (
        ("learnign_rate=0.1", "learnign_rate: no such key .*did you mean learning_rate"),
        ("dataset#args#max_pionts=5", "did you mean dataset#args#max_points"),
        ("network_def#vq_reservoir_sise=64", "did you mean network_def#vq_reservoir_size"),  # left at its default
        ('dataset#args={"max_points": }', "not valid JSON"),
        ("max_steps=abc", r"max_steps=abc: needs a number, as the config's 100000; e\.g\. --override max_steps=100000"),
        ("network_def#vq_entropy_weight=high", "needs a number, as the config's 0.1"),
        ("amp=yes", r"amp=yes: needs true or false \(JSON\), e.g. --override amp=false"),
    ):
        assert main(base + ["--override", override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --override ") and re.search(expected, err[0]), err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ export


def test_export_never_deletes_what_it_did_not_write(tmp_path):
    from test_export import make_run

    from pipeline.export import export_bundle
    from pipeline.io_utils import TokenizerError

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
    from pipeline.infer import Tokenizer
    from pipeline.io_utils import TokenizerError

    marker = tmp_path / "pwned"
    cmd = f"$__import__('os').system('touch {marker}') or 2"

    def in_network(cfg):
        cfg["network_def"]["num_heads"] = cmd

    def target(cfg):
        cfg["network_def"]["_target_"] = "os.system"
        cfg["network_def"]["command"] = f"touch {marker}"

    def in_preprocessing(cfg):
        cfg["preprocessing"] = {"_target_": "Compose", "transforms": [
            {"_target_": "os.system", "command": f"touch {marker}"}, cfg["preprocessing"]]}

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

    from pipeline.infer import Tokenizer
    from pipeline.io_utils import TokenizerError
    from pipeline.tokens import CTTokens

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


# ------------------------------------------------------------------------------ raw inputs


def _nifti(path: Path, shape=(24, 24, 16), affine=None, hu=True, dtype="int16") -> Path:
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros(shape, dtype)
    arr[4:-4, 4:-4, 2:-2] = 40 if hu else 1
    if hu:
        arr[arr == 0] = -1000
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def _preprocess(raw: Path, out: Path) -> dict[str, dict]:
    """Runs pipeline.preprocess at 16^3 in this process; returns {dataset/case_id: metadata row}."""
    import csv

    from pipeline.preprocess import run

    run(raw, out, num_workers=0, resolution=16, windows=["lung"], progress=False, log=lambda *a, **k: None)
    rows = {}
    for f in out.glob("*/metadata.csv"):
        with open(f, newline="") as fh:
            rows.update({f"{f.parent.name}/{r['case_id']}": r for r in csv.DictReader(fh)})
    return rows


@pytest.fixture(scope="module")
def phantom(ct_data_dir, tmp_path_factory):
    """Slices of the shared Philips head phantom series (5 mm apart), sorted along the normal."""
    import zipfile

    from transforms import find_dicom_series

    out = tmp_path_factory.mktemp("phantom")
    zipfile.ZipFile(ct_data_dir / "head_dicom_zip/philips_head_phantom_5mm.zip").extractall(out)
    return [Path(f) for f in next(iter(find_dicom_series(out).values()))]


def _series(files, folder: Path, uid: str, keep=None, crop: int | None = None) -> Path:
    """Copies the slices ``keep`` (indices) of ``files`` into ``folder`` as series ``uid`` (slice ``crop``
    cut to 256 x 256: one slice of another size)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    for i in keep if keep is not None else range(len(files)):
        r = sitk.ImageFileReader()
        r.SetFileName(str(files[i]))
        img = r.Execute()
        tags = {k: r.GetMetaData(k) for k in r.GetMetaDataKeys()}
        if i == crop:
            img = img[:256, :256]
        for k, v in tags.items():
            if k.startswith(("0008", "0010", "0018", "0020", "0028|0030", "0028|105")):
                img.SetMetaData(k, v)
        img.SetMetaData("0020|000e", uid)
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetImageIO("GDCMImageIO")
        w.SetFileName(str(folder / f"IM{i:04d}"))
        w.Execute(img)
    return folder


def test_dicom_folder_with_two_series_gives_two_cases(phantom, tmp_path):
    from pipeline.discovery import discover

    folder = tmp_path / "raw" / "d" / "study"
    _series(phantom, folder, "1.2.826.0.1.111", keep=range(0, 8))
    _series(phantom, folder, "1.2.826.0.1.222", keep=range(10, 18))
    (ds,) = discover(tmp_path / "raw")
    assert sorted(c.series_uid for c in ds.cases) == ["1.2.826.0.1.111", "1.2.826.0.1.222"]
    assert len({c.case_id for c in ds.cases}) == 2
    rows = _preprocess(tmp_path / "raw", tmp_path / "out")
    assert len(rows) == 2 and all(r["status"] == "ok" and not r["warning"] for r in rows.values()), rows
    assert sorted(json.loads(r["original_shape"])[2] for r in rows.values()) == [8, 8]
    # the same two series in one zip: one case, and the series not loaded is named
    import zipfile

    from transforms import load_ct

    with zipfile.ZipFile(tmp_path / "two.zip", "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f.name)
    assert any("1 other CT series in it were not loaded" in w for w in load_ct(tmp_path / "two.zip").meta["load_warnings"])


def test_odd_or_missing_slices_are_visible_and_wide_gaps_refused(phantom, tmp_path):
    from transforms import CTLoadError, load_ct

    odd = _series(phantom, tmp_path / "raw" / "d" / "odd", "1.2.3.1", keep=range(8), crop=4)
    gap = _series(phantom, tmp_path / "raw" / "d" / "gap", "1.2.3.2", keep=[0, 1, 2, 3, 5, 6, 7])
    warn = load_ct(odd).meta["load_warnings"]
    assert any("1 slice(s) of series 1.2.3.1 have another size" in w for w in warn), warn
    assert any("about 1 slice(s) missing" in w for w in load_ct(gap).meta["load_warnings"])
    wide = _series(phantom, tmp_path / "wide", "1.2.3.3", keep=[0, 1, 2, 3, 7, 8, 9])
    with pytest.raises(CTLoadError, match="gap of 20.0 mm .*about 3 slices missing"):
        load_ct(wide)
    rows = _preprocess(tmp_path / "raw", tmp_path / "out")
    assert {k: r["status"] for k, r in rows.items()} == {"d/odd": "ok", "d/gap": "ok"}
    assert "another size" in rows["d/odd"]["warning"] and "missing" in rows["d/gap"]["warning"]


def test_label_map_without_overlap_is_refused(tmp_path):
    import numpy as np

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    far, half = aff.copy(), aff.copy()
    far[0, 3] = 10000.0  # 10 m away
    half[0, 3] = 24.0  # shifted by half the image's width
    _nifti(tmp_path / "raw" / "a" / "ct.nii.gz")
    _nifti(tmp_path / "raw" / "a" / "ct_seg.nii.gz", affine=far, hu=False, dtype="uint8")
    _nifti(tmp_path / "raw" / "b" / "ct.nii.gz")
    _nifti(tmp_path / "raw" / "b" / "ct_seg.nii.gz", affine=half, hu=False, dtype="uint8")
    rows = _preprocess(tmp_path / "raw", tmp_path / "out")
    assert rows["a/ct"]["status"] == "failed" and "does not overlap its image" in rows["a/ct"]["error"]
    assert rows["b/ct"]["status"] == "ok" and float(rows["b/ct"]["label_coverage"]) == pytest.approx(0.5, abs=0.05)


def test_every_file_is_a_case_a_label_or_listed(tmp_path):
    import zipfile

    from pipeline.discovery import discover

    d = tmp_path / "raw" / "d"
    d.mkdir(parents=True)
    with zipfile.ZipFile(d / "notes.zip", "w") as zf:
        zf.writestr("readme.txt", "no DICOM here")
    vol = _nifti(tmp_path / "src.nii.gz")
    import SimpleITK as sitk

    sitk.WriteImage(sitk.ReadImage(str(vol)), str(d / "scan.nhdr"))  # detached NRRD: scan.nhdr + scan.raw(.gz)
    (d / "info.json").write_text("{}")
    (ds,) = discover(tmp_path / "raw")
    assert [c.source.name for c in ds.cases] == ["scan.nhdr"]
    files = {p for p in d.iterdir() if p.is_file()}
    listed = {Path(n.split(": ", 1)[0]) for n in ds.ignored}
    assert files == {c.source for c in ds.cases} | listed, ds.ignored
    assert any("notes.zip: a zip without DICOM" in n for n in ds.ignored)
    rows = _preprocess(tmp_path / "raw", tmp_path / "out")
    assert rows["d/scan"]["status"] == "ok"
    cfg = json.loads((tmp_path / "out" / "d" / "dataset_config.json").read_text())
    assert any("notes.zip" in n for n in cfg["ignored"])


def test_symlink_loops_are_followed_once(tmp_path):
    from pipeline.discovery import discover

    d = tmp_path / "raw" / "d"
    _nifti(d / "sub" / "ct.nii.gz")
    os.symlink(d, d / "sub" / "back")  # a loop through the parent
    os.symlink(d / "self", d / "self")  # ELOOP on stat
    for depth in (None, 4):
        (ds,) = discover(tmp_path / "raw", max_depth=depth)
        assert [c.case_id for c in ds.cases] == ["sub__ct"]
        assert any("already searched" in n for n in ds.ignored) and any("self: cannot be read" in n for n in ds.ignored)


def test_huge_header_and_unreadable_files_are_one_line(bundle, tmp_path, monkeypatch):
    import numpy as np

    from transforms import CTLoadError, load_ct

    path = _nifti(tmp_path / "raw" / "d" / "huge.nii")
    raw = bytearray(path.read_bytes())
    raw[42:48] = np.array([30000, 30000, 30000], "<i2").tobytes()  # dim[1..3] of the NIfTI-1 header
    path.write_bytes(bytes(raw))
    with pytest.raises(CTLoadError, match="header claims a 30000 x 30000 x 30000 image"):
        load_ct(path)
    rows = _preprocess(tmp_path / "raw", tmp_path / "out")
    assert "header claims" in rows["d/huge"]["error"] and "IndexError" not in rows["d/huge"]["error"]
    proc = cli("pipeline.infer", "encode", str(path), str(tmp_path / "t.npz"), "--bundle", str(bundle), "--device", "cpu")
    one_line_error(proc, "huge.nii", "header claims")
    ok = _nifti(tmp_path / "ok.nii.gz")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ok else real_access(p, mode))
    with pytest.raises(CTLoadError, match="no permission to read it; fix its permissions"):
        load_ct(ok)


def test_non_hu_volume_message_names_no_missing_option(tmp_path):
    from transforms import CTLoadError, load_ct

    with pytest.raises(CTLoadError) as err:
        load_ct(_nifti(tmp_path / "mask.nii.gz", hu=False, dtype="uint8"))
    assert "Hounsfield" in str(err.value) and "check_hu" not in str(err.value)


def test_preprocess_out_dir_that_is_a_file(tmp_path):
    _nifti(tmp_path / "raw" / "d" / "ct.nii.gz")
    (tmp_path / "out").write_text("a file")
    proc = cli("pipeline.preprocess", str(tmp_path / "raw"), str(tmp_path / "out"), "--no-progress")
    one_line_error(proc, "OUT_DIR", "is a file")
    assert (tmp_path / "out").read_text() == "a file"
    proc = cli("pipeline.preprocess", str(tmp_path / "nope"), str(tmp_path / "o2"), "--no-progress")
    assert proc.stderr.strip().splitlines() == [f"preprocess: error: RAW_DIR {tmp_path / 'nope'} is not a folder; pass "
                                                "the folder of your raw CT collections"] and proc.returncode == 2
    (tmp_path / "empty").mkdir()  # a folder without any CT: a failure for a batch job, not a success
    proc = cli("pipeline.preprocess", str(tmp_path / "empty"), str(tmp_path / "o3"), "--no-progress")
    assert proc.returncode == 2 and f"no CT cases found under {tmp_path / 'empty'}" in proc.stdout + proc.stderr


def test_demo_refuses_missing_raw_before_writing(tmp_path, capsys):
    from pipeline.demo import main

    with pytest.raises(SystemExit) as refused:
        main(["--raw", str(tmp_path / "nope"), "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and f"--raw {tmp_path / 'nope'} is not a folder" in err
    assert not (tmp_path / "demo").exists()


def test_truncated_processed_array_is_skipped_with_its_name(tmp_path):
    from test_dataset import write_processed_dataset

    from pipeline.dataset import CTWindowSparseDataset

    write_processed_dataset(tmp_path, "synth", num_cases=3, resolution=32, failed=0)
    win = next((tmp_path / "synth" / "processed" / "case_001").rglob("lung*.npy"))
    win.write_bytes(win.read_bytes()[:1000])
    ds = CTWindowSparseDataset(tmp_path, "lung", split="all", max_points=1500, min_points=10)
    assert len(ds.cases) == 2 and [f["case"] for f in ds.failed] == ["synth/case_001"]
    assert str(win) in ds.failed[0]["error"] and "rerun ./run.sh preprocess" in ds.failed[0]["error"]
    proc = cli("pipeline.check_data", str(tmp_path), "--window", "lung", "--min_points", "10")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and str(win) in proc.stdout, proc.stdout + proc.stderr


def test_preprocess_names_every_failed_case_with_its_reason_at_the_end(tmp_path):
    """The last lines of a run with bad cases list each one with its reason (a long run's log is read
    from the end), and the run still writes the good case."""
    _nifti(tmp_path / "raw" / "d" / "good.nii.gz")
    for name in ("bad1.nii.gz", "bad2.nii.gz"):
        (tmp_path / "raw" / "d" / name).write_bytes(b"not a nifti at all")
    proc = cli("pipeline.preprocess", str(tmp_path / "raw"), str(tmp_path / "out"), "-", "0", "--resolution", "32",
               "--no-progress")
    assert proc.returncode == 1
    tail = [line for line in proc.stderr.strip().splitlines() if line.startswith("preprocess: failed: ")]
    assert [line.split(":")[2].strip() for line in tail] == ["d/bad1", "d/bad2"], proc.stderr
    assert all(len(line.split(": ", 3)) == 4 and "bad" in line.split(": ", 3)[3] for line in tail), tail
    assert "1 ok, 2 failed" in proc.stdout

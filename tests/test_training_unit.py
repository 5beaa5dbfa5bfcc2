"""Trainer pieces without the bundle runner: losses, non-finite steps, gradient accumulation, stages."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from pipeline import distributed  # noqa: E402
from pipeline.dataset import CTWindowSparseDataset, StepSampler, sparse_collate, to_sparse_tensor  # noqa: E402
from pipeline.stages import freeze_for_stage, model_summary, stage_banner  # noqa: E402
from pipeline.trainer import SparseReconLoss, SparseVQVAETrainer  # noqa: E402

TINY = dict(resolution=2, model_channels=16, latent_channels=8, channels=(8, 8, 16, 16), num_embeddings=16,
            num_blocks=1, num_heads=2, window_size=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from test_dataset import write_processed_dataset

    root = tmp_path_factory.mktemp("data")
    write_processed_dataset(root, "synth", num_cases=2, resolution=32, failed=0)
    return CTWindowSparseDataset(root, "lung", split="all", max_points=1500, min_points=10)


def _model():
    from networks import SparseVQVAE

    torch.manual_seed(0)
    return SparseVQVAE(**TINY)


def _trainer(model, ds, loss=None, batch_split=1, steps=3):
    sampler = StepSampler(ds, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=sparse_collate)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return SparseVQVAETrainer("cpu", steps, loader, model, opt, loss_function=loss or SparseReconLoss("l1_l2"),
                              batch_split=batch_split)


class NaNOnSecondCall(SparseReconLoss):
    def __init__(self):
        super().__init__("l1")
        self.calls = 0

    def forward(self, recon, x):
        self.calls += 1
        out = super().forward(recon, x)
        return out * float("nan") if self.calls == 2 else out


def test_loss_types_and_target(data):
    batch = sparse_collate([data[(0, 0)]])
    x = to_sparse_tensor(batch)
    recon, _ = _model()(x)
    tgt = SparseReconLoss.target(x, recon)
    assert tgt.shape[0] == recon.features.shape[0]
    # the target holds every input voxel (recon covers all children of active cells), 0 elsewhere
    assert torch.isclose(tgt.sum(), x.features.sum(), rtol=1e-4)
    for lt in ("l1", "l2", "l1_l2"):
        assert torch.isfinite(SparseReconLoss(lt)(recon, x))
    with pytest.raises(ValueError, match="loss_type"):
        SparseReconLoss("huber")


def test_nonfinite_step_is_skipped(data):
    model = _model()
    tr = _trainer(model, data, loss=NaNOnSecondCall(), steps=2)
    snaps = []
    from ignite.engine import Events

    tr.add_event_handler(Events.ITERATION_COMPLETED, lambda e: snaps.append({k: v.clone() for k, v in model.state_dict().items()}))
    tr.run()
    assert tr.state.nonfinite_steps == 1 and tr.state.output["skipped"]
    for k, v in snaps[1].items():
        assert torch.isfinite(v.float()).all(), k
        if v.dtype.is_floating_point and not k.startswith("vq."):
            assert torch.equal(v, snaps[0][k]), f"{k} changed on a skipped step"


def test_loss_scale_never_falls_below_the_floor():
    """Recurring non-finite gradients halve the fp16 loss scale each time; it stops at the floor."""
    from pipeline.trainer import MIN_LOSS_SCALE, update_loss_scale

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4 * MIN_LOSS_SCALE)
    scales = []
    for _ in range(5):
        opt.zero_grad()
        scaler.scale((w * float("inf")).sum()).backward()
        scaler.unscale_(opt)
        scaler.step(opt)  # skipped: the gradient is not finite
        update_loss_scale(scaler)
        scales.append(scaler.get_scale())
    assert scales == [2 * MIN_LOSS_SCALE, MIN_LOSS_SCALE, MIN_LOSS_SCALE, MIN_LOSS_SCALE, MIN_LOSS_SCALE]
    assert torch.equal(w.detach(), torch.ones(3))  # no step taken
    opt.zero_grad()
    scaler.scale(w.sum()).backward()
    scaler.step(opt)
    update_loss_scale(scaler)
    assert scaler.get_scale() == MIN_LOSS_SCALE and not torch.equal(w.detach(), torch.ones(3))


def test_data_of_another_cube_size_is_refused(data):
    """Cases preprocessed at 32^3 and a model for 64^3: refused in one line before any step."""
    from networks import SparseVQVAE

    with pytest.raises(ValueError, match=r"preprocessed at 32\^3 but the model works on 64\^3; preprocess with --resolution 64"):
        _trainer(SparseVQVAE(**{**TINY, "resolution": 4}), data)


def test_batch_split_matches_full_batch(data):
    batch = sparse_collate([data[(0, 0)], data[(1, 1)]])
    grads = []
    for split in (1, 2):
        model = _model()
        tr = _trainer(model, data, batch_split=split)
        tr.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keep weights, read gradients
        tr.state.iteration = 1
        out = tr._iteration(tr, batch)
        assert not out["skipped"]
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], rtol=1e-3, atol=1e-6), n


def test_grid_training_matches_sparse_training(data):
    """``grid_training`` (the default) changes how the step runs, not what it computes."""
    from networks.grid import supports_grid

    batch = sparse_collate([data[(0, 0)], data[(1, 1)]])
    grads, losses = [], []
    for grid in (False, True):
        model = _model()
        assert supports_grid(model)
        tr = _trainer(model, data)
        tr.grid_training = grid
        tr.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        tr.state.iteration = 1
        out = tr._iteration(tr, batch)
        assert not out["skipped"]
        losses.append(float(out["loss"]))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], rtol=1e-3, atol=1e-6), n


def test_compile_grid_compiles_the_grid_path_only_when_asked(data, monkeypatch, caplog):
    """The trainer key ``compile_grid`` hands the model's conv levels to ``torch.compile`` (compiled
    on the first step; ``tests/test_grid.py`` checks the compiled step against the eager one)."""
    from networks import grid

    plain = (grid.encode_local, grid.decode_local)
    model = _model()
    SparseVQVAETrainer("cpu", 1, [], model, torch.optim.SGD(model.parameters(), lr=0.0))
    assert model.grid_convs == plain
    SparseVQVAETrainer("cpu", 1, [], model, torch.optim.SGD(model.parameters(), lr=0.0), compile_grid=True)
    assert all(f is not p and getattr(f, "__wrapped__", None) is p for f, p in zip(model.grid_convs, plain))
    model = _model()
    SparseVQVAETrainer("cpu", 1, [], model, torch.optim.SGD(model.parameters(), lr=0.0), grid_training=False, compile_grid=True)
    assert model.grid_convs == plain  # nothing to compile when the grid path is off
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    with caplog.at_level("WARNING", logger="ctvq.train"):
        SparseVQVAETrainer("cpu", 1, [], model, torch.optim.SGD(model.parameters(), lr=0.0), compile_grid=True)
    assert model.grid_convs == plain and "compile_grid: off with several processes" in caplog.text


def test_graph_training_says_why_it_is_off(caplog):
    """``graph_training`` where it cannot run (here: no CUDA device) trains eagerly and says why, in one warning."""
    model = _model()
    with caplog.at_level("WARNING", logger="ctvq.train"):
        trainer = SparseVQVAETrainer("cpu", 1, [], model, torch.optim.SGD(model.parameters(), lr=0.0), graph_training=True)
    assert trainer.graph_steps is None
    assert [r.getMessage() for r in caplog.records if "graph_training" in r.getMessage()] == [
        "graph_training: off with no CUDA device (it needs one CUDA process, batch_split 1 and no use_checkpoint); "
        "steps run eagerly"]


@pytest.fixture(scope="module")
def grid_data(data):
    """``data`` with ``grid_crops``: the same crops as dense grids."""
    return CTWindowSparseDataset(data.datasets, "lung", split="all", max_points=1500, min_points=10, grid_crops=True)


def _step(model, ds, batch, split=1):
    """Loss and gradients of one ``_iteration`` on ``batch`` (lr 0: the weights stay)."""
    tr = _trainer(model, ds, batch_split=split)
    tr.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    tr.state.iteration = 1
    out = tr._iteration(tr, batch)
    assert not out["skipped"]
    return out["loss"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grid_crops_train_as_sparse_crops(data, grid_data):
    """A step on grid crops (``grid_crops``, what the bundles load with grid_training) is the step on the
    sparse crops: the same GridBatch reaches the model, whole or in ``batch_split`` parts (the model's
    factor is 16, so the 8-aligned crops are placed into its grid as ``grid_from_sparse`` places them)."""
    draws = [(0, 0), (1, 1)]
    sparse, grid = (sparse_collate([ds[d] for d in draws]) for ds in (data, grid_data))
    assert "values" in grid and _model().factor == 16 and bool((grid["box"] % 16).any())
    for split in (1, 2):
        (loss_s, grads_s), (loss_g, grads_g) = (_step(_model(), grid_data, b, split) for b in (sparse, grid))
        assert loss_g == loss_s and grads_g.keys() == grads_s.keys()
        for n, g in grads_s.items():
            assert torch.equal(grads_g[n], g), (split, n)


def test_model_without_grid_path_trains_on_grid_crops(data, grid_data):
    """layout="direct3d" has no grid path: the trainer hands it the sparse tensor of the grid crops, the
    step is the one on sparse crops, and a run through the loader trains."""
    from networks import SparseVQVAE
    from networks.grid import supports_grid

    def model():
        torch.manual_seed(0)
        return SparseVQVAE(**{**TINY, "resolution": 4}, layout="direct3d")

    assert not supports_grid(model())
    draws = [(0, 0), (1, 1)]
    (loss_s, grads_s), (loss_g, grads_g) = (_step(model(), grid_data, sparse_collate([ds[d] for d in draws]))
                                            for ds in (data, grid_data))
    assert loss_g == loss_s
    for n, g in grads_s.items():
        assert torch.equal(grads_g[n], g), n
    net = model()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    tr = _trainer(net, grid_data, steps=2)
    assert not tr.grid_training
    tr.run()
    assert tr.state.iteration == 2 and not tr.state.output["skipped"]
    assert any(not torch.equal(before[n], p) for n, p in net.named_parameters())


def test_freezing_and_summary():
    model = _model()
    freeze_for_stage(model, 1)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(("Encoder.", "Decoder.")))
    assert model.vq.embeddings.weight.requires_grad
    text = model_summary(model)
    assert "vq.embeddings.weight" in text and "Trainable parameters:" in text
    banner = stage_banner(model, 1)
    assert "[Stage 1]" in banner and f"Trainable parameters: {model.vq.embeddings.weight.numel():,}" in banner
    enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("Encoder."))
    assert f"Trainable per part: Encoder 0 of {enc:,}, Decoder 0 of " in banner
    freeze_for_stage(model, 0)
    assert not model.vq.embeddings.weight.requires_grad
    freeze_for_stage(model, 2)
    assert all(p.requires_grad for p in model.parameters())
    assert "[Stage 2] Joint training: Encoder + Decoder + Codebook\n" in stage_banner(model, 2)
    freeze_for_stage(model, 2, frozen_parts=["Encoder"])  # stage 2 on the latents stage 1 fitted
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"Decoder", "vq"}
    assert "[Stage 2] Joint training: Decoder + Codebook (Encoder frozen)\n" in stage_banner(model, 2, ["Encoder"])
    ema = _model()
    ema.vq.embeddings.weight.requires_grad_(False)  # an EMA codebook: updated, not by the optimizer
    assert "[Stage 2] Joint training: Encoder + Decoder + Codebook\n" in stage_banner(ema, 2)
    with pytest.raises(ValueError, match=r"frozen_parts \['encoder'\]: not a part of the model; use some of"):
        freeze_for_stage(model, 2, frozen_parts=["encoder"])
    with pytest.raises(ValueError, match="needs a list of part names"):
        freeze_for_stage(model, 2, frozen_parts="Encoder")
    with pytest.raises(ValueError, match="leaves nothing to train in stage 1"):
        freeze_for_stage(model, 1, frozen_parts=["vq"])


def test_a_frozen_codebook_keeps_every_code():
    """frozen_parts ["vq"]: training still counts usage, but no restart, EMA step, k-means or projection
    fit moves a code (requires_grad alone would leave those running); a later stage without it unfreezes."""
    from networks.quantizer import FSQuantizer, ResidualQuantizer, VectorQuantizer

    def parts(vq):
        model = torch.nn.Module()
        model.Encoder, model.Decoder, model.vq = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), vq
        return model.train()

    torch.manual_seed(0)
    z = torch.randn(512, 4)
    models = {}
    for frozen in (["vq"], []):
        levels = [VectorQuantizer(32, 4, codebook_update=update, restart_every=2, dead_code_steps=1) for update in ("ema", "gradient")]
        levels.append(VectorQuantizer(32, 4, kmeans_init=True, kmeans_init_points=64))
        with torch.no_grad():
            for level in levels[:2]:
                level.embeddings.weight[16:] = 100.0  # never chosen: dead, restarted unless frozen
        residual, fsq = parts(ResidualQuantizer(levels, depth_dropout=False)), parts(FSQuantizer(4, (4, 4), fit_init=True))
        for model in (residual, fsq):
            freeze_for_stage(model, 2, frozen_parts=frozen)
        before = {n: t.clone() for n, t in [*residual.vq.state_dict().items(), *fsq.vq.state_dict().items()] if "usage" not in n}
        for _ in range(6):
            residual.vq(z)
            fsq.vq(z)
        after = {**residual.vq.state_dict(), **fsq.vq.state_dict()}
        books = ["levels.0.embeddings.weight", "levels.1.embeddings.weight", "levels.2.embeddings.weight", "in_proj.weight"]
        assert [torch.equal(before[n], after[n]) for n in books] == [bool(frozen)] * 4, frozen
        assert bool(levels[2].initialized) != bool(frozen)  # k-means ran only on the book that was not frozen
        assert residual.vq.levels[0].usage_counts.sum() == 6 * len(z) and fsq.vq.usage_counts.sum() == 6 * len(z)
        models[bool(frozen)] = residual
    freeze_for_stage(models[True], 2)  # the next stage, vq not frozen: its codebooks train again
    assert not any(level.book_frozen for level in models[True].vq.levels)


def test_stage2_refuses_a_frozen_codebook_that_never_got_its_kmeans(tmp_path):
    """A stage 1 that ended before k-means leaves a random book: stage 2 with vq frozen would train the
    decoder on it for good, so it is refused in one line with both ways out."""
    from networks import SparseVQVAE
    from pipeline.stages import prepare_network

    path = tmp_path / "ckpts" / "vqvae_step0000001.pt"
    path.parent.mkdir()
    torch.save(SparseVQVAE(**{**TINY, "vq_kmeans_init": True}).state_dict(), path)  # initialized: False
    with pytest.raises(ValueError, match=r"never got its k-means .*train stage 1 longer, or pass .*frozen_parts") as err:
        prepare_network(SparseVQVAE(**TINY), 2, pretrained_vae_path=str(path), frozen_parts=["Encoder", "vq"])
    assert "\n" not in str(err.value)
    net = prepare_network(SparseVQVAE(**TINY), 2, pretrained_vae_path=str(path), frozen_parts=["Encoder"])
    assert net.vq.embeddings.weight.requires_grad  # the book trains, and k-means runs on the first steps


def test_stage1_refuses_checkpoint_of_another_size(tmp_path):
    """Before any k-means or training: one line naming the checkpoint and the tensors that differ."""
    from networks import SparseVQVAE
    from pipeline.io_utils import CheckpointError
    from pipeline.stages import prepare_network

    path = tmp_path / "ckpts" / "vqvae_step0000001.pt"
    path.parent.mkdir()
    torch.save(SparseVQVAE(**{**TINY, "model_channels": 32}).state_dict(), path)
    with pytest.raises(CheckpointError, match="pretrained_vae_path .*another model .*tensors of another shape") as err:
        prepare_network(_model(), 1, pretrained_vae_path=str(path))
    assert "\n" not in str(err.value)
    # a checkpoint of the same model loads, and only the codebook trains
    torch.save(_model().state_dict(), path)
    net = prepare_network(_model(), 1, pretrained_vae_path=str(path))
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["vq.embeddings.weight"]


def test_codebook_stages_refuse_a_checkpoint_of_other_attention_windows(tmp_path):
    """A checkpoint whose run attended over other windows (or used other norms) fits every weight,
    so stages 1 and 2 would silently run another model than the one trained: refused in one line naming
    the key; stage 0 may start from it."""
    import json

    from pipeline.io_utils import CheckpointError
    from pipeline.runs import check_fit, load_partial

    path = tmp_path / "stage0" / "ckpts" / "vqvae_step0000001.pt"
    path.parent.mkdir(parents=True)
    torch.save(_model().state_dict(), path)
    (tmp_path / "stage0" / "config.json").write_text(json.dumps({"network_def": {**TINY, "window_size": 8}}))
    report = load_partial(_model(), path)
    for stage in (1, 2):
        with pytest.raises(CheckpointError, match=r"another model from the same weights \(network_def window_size 8 vs 4 here\)") as err:
            check_fit(report, path, stage, network_def=dict(TINY))
        assert "\n" not in str(err.value)
    check_fit(report, path, 0, network_def=dict(TINY))  # stage 0 starts anew from any weights that fit
    check_fit(report, path, 1, network_def={**TINY, "window_size": 8})  # the run's own windows
    # the norms have weights of one shape in every mode, so they are checked the same way
    with pytest.raises(CheckpointError, match=r"network_def norm \"layer\" vs \"group_voxel\" here"):
        check_fit(report, path, 1, network_def={**TINY, "window_size": 8, "norm": "group_voxel"})


@pytest.mark.parametrize("other", [{"vq_type": "simvq"}, {"vq_depth": 2}, {"vq_type": "fsq", "fsq_levels": [4, 4]}])
def test_stage2_refuses_a_checkpoint_of_another_quantizer(tmp_path, other):
    """Stage 2 needs the codebook it starts from: a checkpoint of another quantizer kind or depth is
    refused in one line naming the network_def keys (stage 1, which fits the quantizer anew, takes it)."""
    import json

    from networks import SparseVQVAE
    from pipeline.io_utils import CheckpointError
    from pipeline.runs import check_fit, load_partial
    from pipeline.stages import prepare_network

    path = tmp_path / "stage1" / "ckpts" / "vqvae_step0000001.pt"
    path.parent.mkdir(parents=True)
    torch.save(SparseVQVAE(**{**TINY, **other}).state_dict(), path)
    (tmp_path / "stage1" / "config.json").write_text(json.dumps({"network_def": {**TINY, **other}}))
    with pytest.raises(CheckpointError, match="another model .*tensors (missing|unexpected)") as err:
        prepare_network(_model(), 2, pretrained_vae_path=str(path))
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError) as err:  # with the configured network_def: the keys that differ, named
        check_fit(load_partial(_model(), path), path, 2, network_def=dict(TINY))
    key = next(iter(other))
    assert f"network_def {key} {json.dumps(other[key])} vs " in str(err.value)
    net = prepare_network(_model(), 1, pretrained_vae_path=str(path))  # stage 1: the quantizer starts anew
    assert net.vq.embeddings.weight.requires_grad


def test_kmeans_progress_is_logged(data, caplog):
    """Stage 1's k-means waits for a full reservoir: its filling and the k-means step are logged."""
    from networks import SparseVQVAE

    torch.manual_seed(0)
    model = SparseVQVAE(**{**TINY, "vq_kmeans_init": True, "vq_kmeans_init_points": 6, "vq_reservoir_size": 64})
    freeze_for_stage(model, 1)
    with caplog.at_level("INFO"):
        _trainer(model, data, steps=6).run()
    text = caplog.text
    assert "collecting encoder outputs for the k-means codebook" in text and "of 6 (about" in text
    assert "k-means initialisation of the codebook: 16 codes from 6 encoder outputs" in text
    assert "codebook initialised by k-means in" in text and "ended before k-means" not in text
    model = SparseVQVAE(**{**TINY, "vq_kmeans_init": True, "vq_kmeans_init_points": 4096, "vq_reservoir_size": 4096})
    freeze_for_stage(model, 1)
    caplog.clear()
    with caplog.at_level("INFO"):
        _trainer(model, data, steps=2).run()  # too short: the codebook stays as initialised at random
    warned = [r for r in caplog.records if "ended before k-means initialised the codebook" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING" and "raise max_steps by about" in warned[0].getMessage()
    one_level = int(re.search(r"raise max_steps by about (\d+)", warned[0].getMessage()).group(1))
    model = SparseVQVAE(**{**TINY, "vq_kmeans_init": True, "vq_kmeans_init_points": 4096, "vq_reservoir_size": 4096,
                           "vq_depth": 2})
    freeze_for_stage(model, 1)
    caplog.clear()
    with caplog.at_level("INFO"):
        _trainer(model, data, steps=2).run()
    message = next(r.getMessage() for r in caplog.records if "ended before k-means" in r.getMessage())
    # the second level fills its reservoir only after the first level's k-means: the steps to ask for add up
    assert "codebook level 1 of 2" in message
    assert int(re.search(r"raise max_steps by about (\d+)", message).group(1)) > 1.5 * one_level, (message, one_level)


def test_kmeans_steps_left_follow_the_mean_growth(caplog):
    """Crops differ in size: the steps still to go come from the mean growth of the reservoir, not
    its largest step (which promised a third of the steps a run needed)."""
    from types import SimpleNamespace

    from networks.quantizer import VectorQuantizer
    from pipeline.handlers import KMeansProgressHandler

    vq = VectorQuantizer(16, 2, kmeans_init=True, kmeans_init_points=1000, reservoir_size=4096).train()
    engine = SimpleNamespace(model=SimpleNamespace(vq=vq), state=SimpleNamespace(iteration=0))
    progress = KMeansProgressHandler(every_fraction=0.0)
    with caplog.at_level("INFO"):
        for grown in (100, 10, 10, 10):  # 130 of 1,000 in 4 steps: 32.5 a step
            engine.state.iteration += 1
            progress._started(engine)
            vq.reservoir = torch.zeros(vq.reservoir.shape[0] + grown, 2)
            progress._completed(engine)
        progress._finished(engine)
    assert "Step 4: collecting encoder outputs for the k-means codebook: 130 of 1,000 (about 27 more steps)" in caplog.text
    assert "raise max_steps by about 27 " in caplog.text
    vq.book_frozen = True  # frozen_parts ["vq"]: k-means never runs, so nothing is said of it
    caplog.clear()
    with caplog.at_level("INFO"):
        progress._completed(engine)
        progress._finished(engine)
    assert "k-means" not in caplog.text


def test_kmeans_progress_starts_afresh_for_each_level_and_says_when_nothing_comes(caplog):
    from types import SimpleNamespace

    from networks.quantizer import ResidualQuantizer, VectorQuantizer
    from pipeline.handlers import KMeansProgressHandler

    levels = [VectorQuantizer(16, 2, kmeans_init=True, kmeans_init_points=100, reservoir_size=4096).train() for _ in range(2)]
    engine = SimpleNamespace(model=SimpleNamespace(vq=ResidualQuantizer(levels)), state=SimpleNamespace(iteration=0))
    progress = KMeansProgressHandler(every_fraction=0.0)

    def step(level, grown, kmeans=False):
        engine.state.iteration += 1
        progress._started(engine)
        levels[level].reservoir = torch.zeros(levels[level].reservoir.shape[0] + grown, 2)
        levels[level]._py_initialized = kmeans
        progress._completed(engine)

    with caplog.at_level("INFO"):
        step(0, 60)
        step(0, 60, kmeans=True)  # level 1's k-means: level 2 collects from the next step
        step(1, 10)
        step(1, 10)
        progress._finished(engine)
    assert "Step 4: collecting encoder outputs for the k-means codebook: 20 of 100 (about 8 more steps)" in caplog.text
    assert "codebook level 2 of 2 (20 of 100 encoder outputs collected)" in caplog.text
    assert "raise max_steps by about 8 " in caplog.text
    lone = VectorQuantizer(16, 2, kmeans_init=True, kmeans_init_points=100).train()
    engine.model.vq, progress = lone, KMeansProgressHandler(every_fraction=0.0)
    caplog.clear()
    with caplog.at_level("INFO"):
        for _ in range(3):  # crops that leave every cell inside the margin: the reservoir never grows
            engine.state.iteration += 1
            progress._started(engine)
            progress._completed(engine)
        progress._finished(engine)
    assert "(no encoder output reached it in 1 step:" in caplog.text
    assert "untrained in this checkpoint; no encoder output reached it in 3 steps" in caplog.text
    assert "vq_crop_margin" in caplog.text and "more steps" not in caplog.text


def test_kmeans_with_fewer_outputs_than_codes_warns(caplog):
    from networks.quantizer import VectorQuantizer

    vq = VectorQuantizer(64, 4, kmeans_init=True, kmeans_init_points=16).train()
    with caplog.at_level("INFO"):
        vq(torch.randn(20, 4))
    assert vq._py_initialized
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "k-means had 20 encoder outputs for 64 codes" in warned[0].getMessage()
    assert "network_def#vq_kmeans_init_points to at least 256" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level("INFO"):
        VectorQuantizer(8, 4, kmeans_init=True, kmeans_init_points=16).train()(torch.randn(20, 4))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_sample_picture_says_where_the_crop_is(data, tmp_path, monkeypatch):
    import pipeline.visualize as vis
    from pipeline.handlers import SampleHandler

    titles = []
    monkeypatch.setattr(vis, "save_three_plane", lambda path, *a, title=None, **k: titles.append(title))
    tr = _trainer(_model(), data, steps=1)
    SampleHandler(tmp_path, interval=1).attach(tr)
    tr.run()
    box = [int(v) for v in tr.state.batch["box"][0]]
    assert titles == [f"step 1 {tr.state.batch['case_id'][0]}: crop i {box[0]}:{box[3]}, j {box[1]}:{box[4]}, "
                      f"k {box[2]}:{box[5]} of the 32x32x32 scan (RAS voxels)"]


def test_num_workers_default_to_the_cpus_there_are(monkeypatch):
    """On a 2-core machine the stage configs ask for 2 DataLoader workers, not 4 (which makes it warn)."""
    from monai.bundle import ConfigParser

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    root = Path(__file__).resolve().parents[1] / "bundles" / "ct_vqvae"
    for stage in ("stage0.json", "stage1.json", "stage2.json"):
        parser = ConfigParser()
        parser.read_config(str(root / stage))
        assert parser.get_parsed_content("num_workers") == 2, stage
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert distributed.default_num_workers() == 8  # an H200 host: 8 workers keep 2x ahead of the steps
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert distributed.default_num_workers() == 4  # the node's CPUs shared by its 4 ranks


def test_lock_files_do_not_stay(tmp_path):
    """A run folder's lock file is removed when the run ends (no zero-byte file left behind)."""
    from pipeline.io_utils import FolderLock

    lock = FolderLock(tmp_path, ".train.lock", "busy").acquire()
    assert (tmp_path / ".train.lock").is_file()
    lock.release()
    assert not (tmp_path / ".train.lock").exists()
    FolderLock(tmp_path, ".train.lock", "busy").acquire().release()  # and it can be taken again
    assert list(tmp_path.iterdir()) == []


def test_first_pass_over_the_scans_shows_progress(tmp_path, monkeypatch, caplog):
    """Counting the support of every case (the first use of a dataset) logs its progress."""
    import itertools

    import pipeline.dataset as dsmod
    from test_dataset import write_processed_dataset

    write_processed_dataset(tmp_path, "synth", num_cases=3, resolution=32, failed=0)
    clock = itertools.count(0, 6.0)  # every reading of the clock: 6 s later
    monkeypatch.setattr(dsmod.time, "perf_counter", lambda: next(clock))
    with caplog.at_level("INFO"):
        CTWindowSparseDataset(tmp_path, "lung", split="all", max_points=1500, min_points=10)
    assert "counting support voxels, 1 of 3 cases" in caplog.text and "once, then cached" in caplog.text


def test_step_rate_after_a_resume_counts_from_the_resumed_step(tmp_path, caplog):
    """A run resumed at step 200 logs the steps it ran per second, not 200 more."""
    import logging
    import re
    import time
    from types import SimpleNamespace

    from pipeline.handlers import StepLogHandler

    handler = StepLogHandler(tmp_path, interval=10)
    time.sleep(0.3)  # the handler is built (config parsing, data loader start) well before the first step
    from torch.utils.tensorboard import SummaryWriter

    engine = SimpleNamespace(state=SimpleNamespace(iteration=200, epoch_length=1000, output=None),
                             device=torch.device("cpu"), model=None, quantize=False,
                             tb_writer=SummaryWriter(log_dir=str(tmp_path / "tb_logs")))
    with caplog.at_level(logging.INFO, logger="ctvq.train"):
        for step in range(201, 211):
            engine.state.iteration = step
            handler._first_step(engine)
            time.sleep(0.01)
            engine.state.output = {"loss": 1.0, "recon": 1.0, "lr": 1e-4, "num_points": 8}
            handler(engine)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Step 210:"))
    rate = float(re.search(r"steps/s=([0-9.]+)", line).group(1))
    assert 10 < rate < 100, line  # 10 steps of >= 10 ms each


def test_resumed_run_hides_the_steps_an_interrupted_run_logged_past_its_checkpoint(tmp_path):
    """Killed after logging step 220, resumed from the step-200 checkpoint: TensorBoard shows 210 and
    220 once each, from the resumed run."""
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from pipeline.handlers import tb_writer

    killed = SummaryWriter(log_dir=str(tmp_path / "tb_logs"))
    for step in (100, 200, 210, 220):
        killed.add_scalar("train/loss", 1.0, step)
    killed.close()
    resumed = SimpleNamespace(resumed_step=200, add_event_handler=lambda *a: None)
    w = tb_writer(resumed, tmp_path)
    for step in (210, 220, 230):
        w.add_scalar("train/loss", 0.5, step)
    w.close()
    acc = EventAccumulator(str(tmp_path / "tb_logs"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(100, 1.0), (200, 1.0), (210, 0.5), (220, 0.5),
                                                                      (230, 0.5)]


def test_usage_loss_enters_the_step(data):
    """``vq_entropy_weight`` adds the quantizer's (weighted) usage term to the step's loss, and the
    step reports it beside the other terms."""
    from networks import SparseVQVAE

    torch.manual_seed(0)
    # batch scope: these samples hold one latent cell each, which by itself can spread over nothing
    model = SparseVQVAE(**TINY, vq_entropy_weight=0.5, vq_entropy_scope="batch")
    tr = _trainer(model, data, loss=SparseReconLoss("l1"))
    tr.state.iteration = 1
    out = tr._iteration(tr, sparse_collate([data[(0, 0)], data[(1, 0)]]))
    assert not out["skipped"] and out["entropy"] < 0
    expected = out["recon"] + tr.lambda_vq * out["vq"] + tr.lambda_commitment * out["commitment"] + out["entropy"]
    assert out["loss"] == pytest.approx(expected, rel=1e-6)
    plain = _trainer(_model(), data, loss=SparseReconLoss("l1"))
    plain.state.iteration = 1
    assert plain._iteration(plain, sparse_collate([data[(0, 0)]]))["entropy"] == 0.0  # weight 0: no term


def test_codebook_stages_refuse_a_checkpoint_of_another_window(tmp_path, monkeypatch):
    """Stages 1 and 2 start from a run of the window they train on, named in one line; stage 0 may
    start from any window's autoencoder."""
    import json

    from pipeline import stages
    from pipeline.io_utils import CheckpointError

    path = tmp_path / "ckpts" / "vqvae_step0000001.pt"
    path.parent.mkdir()
    torch.save(_model().state_dict(), path)
    (tmp_path / "config.json").write_text(json.dumps({"window_type": "lung", "network_def": TINY}))
    monkeypatch.setattr(stages, "resolved_config", lambda: {"window_type": "bone"})
    monkeypatch.setenv("CTVQ_COMMAND", "./run.sh train")  # the fix in the syntax of the command in use
    for stage in (1, 2):
        with pytest.raises(CheckpointError, match='window_type "lung", this stage on "bone"; set --override \'window_type="lung"\'') as err:
            stages.prepare_network(_model(), stage, pretrained_vae_path=str(path))
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    monkeypatch.delenv("CTVQ_COMMAND")  # python -m monai.bundle run
    with pytest.raises(CheckpointError, match=r'this stage on "bone"; set --window_type lung \(or start'):
        stages.prepare_network(_model(), 1, pretrained_vae_path=str(path))
    stages.prepare_network(_model(), 0, pretrained_vae_path=str(path))
    # --load_dir names a run folder; the message names the checkpoint found there as such
    from types import SimpleNamespace

    with pytest.raises(CheckpointError, match=f"^the --load_dir checkpoint {re.escape(str(path))}: its run trained on"):
        stages.prepare_network(_model(), 2, run=SimpleNamespace(resuming=False, init_ckpt=str(path)))
    monkeypatch.setattr(stages, "resolved_config", lambda: {"window_type": "lung"})
    stages.prepare_network(_model(), 2, pretrained_vae_path=str(path))


def test_true_false_settings_refuse_other_values(data, monkeypatch):
    """``grid_training`` / ``grid_crops`` take JSON true or false; the string "false" (which Python reads
    as true) is refused in one line with the override to write."""
    monkeypatch.setenv("CTVQ_COMMAND", "./run.sh train")
    with pytest.raises(ValueError, match=r"grid_training='false': needs true or false \(JSON\), e.g. --override grid_training=false"):
        SparseVQVAETrainer("cpu", 1, [], _model(), torch.optim.SGD(_model().parameters(), lr=0.0), grid_training="false")
    with pytest.raises(ValueError, match="grid_training=1: needs true or false .* --override grid_training=false"):
        CTWindowSparseDataset(data.datasets, "lung", split="all", grid_crops=1)
    monkeypatch.delenv("CTVQ_COMMAND")  # python -m monai.bundle run
    with pytest.raises(ValueError, match="e.g. --grid_training False$"):  # what Fire reads as a bool
        CTWindowSparseDataset(data.datasets, "lung", split="all", grid_crops="no")


def test_step_log_of_a_residual_quantizer_names_every_level(tmp_path, caplog):
    """The step line's perplexity is level 1's; ``levels_perplexity`` gives each level's, and TensorBoard
    has ``codebook/level1`` .. ``levelD``, counted from 1 as the log counts them."""
    import logging
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from networks.quantizer import build_quantizer
    from pipeline.handlers import StepLogHandler

    rq = build_quantizer("vq", depth=2, num_embeddings=16, embedding_dim=4).train()
    with torch.no_grad():
        rq.levels[0].embeddings.weight.copy_(torch.randn(16, 4) * 3)
    rq(torch.randn(512, 4) * 3)  # one step: every level quantises and counts its usage
    levels = rq.usage_stats()["levels"]
    writer = SummaryWriter(log_dir=str(tmp_path / "tb_logs"))
    engine = SimpleNamespace(state=SimpleNamespace(iteration=10, epoch_length=100, output=None), device=torch.device("cpu"),
                             model=SimpleNamespace(vq=rq), quantize=True, tb_writer=writer)
    handler = StepLogHandler(tmp_path, interval=10)
    handler._first_step(engine)
    engine.state.output = {"loss": 1.0, "recon": 1.0, "lr": 1e-4, "num_points": 8}
    with caplog.at_level(logging.INFO, logger="ctvq.train"):
        handler(engine)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Step 10:"))
    assert f"perplexity={levels[0]['perplexity']:.1f} " in line
    assert f"levels_perplexity={levels[0]['perplexity']:.0f}/{levels[1]['perplexity']:.0f} " in line
    writer.flush()
    tags = EventAccumulator(str(tmp_path / "tb_logs")).Reload().Tags()["scalars"]
    assert {"codebook/level1/perplexity", "codebook/level2/perplexity"} <= set(tags) and "codebook/level0/perplexity" not in tags


def test_a_failed_codebook_refit_keeps_the_trained_book_and_the_last_checkpoint(data, tmp_path, caplog):
    """The refit runs when training completes, before the last checkpoint: if it cannot read the
    training scans it says so in one error line and the run still ends with its checkpoint."""
    from pipeline.handlers import CheckpointHandler, CodebookRefitHandler

    model = _model()
    freeze_for_stage(model, 2)
    sampler = StepSampler(data, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler, collate_fn=sparse_collate)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    missing = tmp_path / "no_such_folder"
    handlers = [CodebookRefitHandler(missing, "lung"), CheckpointHandler(tmp_path / "run", interval=100)]
    trainer = SparseVQVAETrainer("cpu", 2, loader, model, opt, loss_function=SparseReconLoss("l1"), train_handlers=handlers)
    with caplog.at_level("INFO"):
        trainer.run()
    failed = [r for r in caplog.records if "codebook refit failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelname == "ERROR" and str(missing) in failed[0].getMessage()
    assert "set refit_codebook to false" in failed[0].getMessage() and "codebook refitted" not in caplog.text
    saved = torch.load(tmp_path / "run" / "ckpts" / "vqvae_step0000002.pt", weights_only=True)
    assert torch.equal(saved["vq.embeddings.weight"], model.vq.embeddings.weight.detach())
    with pytest.raises(ValueError, match="refit_codebook=false"):
        CodebookRefitHandler(missing, "lung", max_cases=0)


def test_a_refit_that_fails_half_way_restores_the_trained_book(monkeypatch, caplog):
    import types

    import networks.quantizer as Q
    from pipeline.handlers import CodebookRefitHandler

    model = _model()
    trained = {k: v.clone() for k, v in model.vq.state_dict().items()}
    handler = CodebookRefitHandler("unused", "lung")
    monkeypatch.setattr(handler, "_latents", lambda engine, device: (torch.randn(200, 8), 2))

    def fails_half_way(*args, **kwargs):
        model.vq.embeddings.weight.data.fill_(7.0)  # a partly written book
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(Q, "kmeans", fails_half_way)
    engine = types.SimpleNamespace(model=model, state=types.SimpleNamespace(iteration=5))
    with caplog.at_level("INFO"):
        handler(engine)
    assert "codebook refit failed (RuntimeError: CUDA out of memory)" in caplog.text
    assert all(torch.equal(v, trained[k]) for k, v in model.vq.state_dict().items())
    assert not getattr(engine.state, "codebook_refitted", False)
    monkeypatch.undo()
    monkeypatch.setattr(handler, "_latents", lambda engine, device: (torch.randn(200, 8), 2))
    caplog.clear()
    with caplog.at_level("INFO"):
        handler(engine)  # 200 latents: 4 or more per code of 16 -> refitted, with its usage before and after
    assert re.search(r"Step 5: codebook refitted by k-means to 200 latents of 2 whole training scans in [\d.]+ s: "
                     r"codes used on them \d+ -> \d+ of 16, perplexity \d+ -> \d+", caplog.text), caplog.text
    assert engine.state.codebook_refitted and not torch.equal(model.vq.embeddings.weight.detach(), trained["embeddings.weight"])

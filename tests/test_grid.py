"""The dense-box training path (``networks.grid``) gives the sparse forward pass's result on real CT."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import networks
from networks.grid import GridBatch, grid_from_sparse, grid_values_at, supports_grid
from networks.ops import sparse_lookup
from test_network_model import ct_sparse, small_model, wake_zero_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _two_crops(ct_data_dir):
    """Two samples of a real scan with different boxes: the whole 32^3 window and a corner of it
    that starts off the 8-voxel lattice, so the two grid origins and extents differ."""
    x = ct_sparse(ct_data_dir, grid=32, stride=4)
    keep = (x.indices[:, 1:] >= torch.tensor([9, 5, 0])).all(1) & (x.indices[:, 1:] < 27).all(1)
    second = x.indices[keep].clone()
    second[:, 0] = 1
    idx = torch.cat([x.indices, second])
    feats = torch.cat([x.features, x.features[keep]])
    boxes = torch.stack([torch.cat([idx[idx[:, 0] == b, 1:].amin(0), idx[idx[:, 0] == b, 1:].amax(0) + 1]) for b in (0, 1)])
    return networks.make_sparse(feats, idx, [32] * 3, 2), boxes


@pytest.fixture(scope="module")
def two_crops(ct_data_dir):
    return _two_crops(ct_data_dir)


def test_grid_holds_the_sparse_values(two_crops):
    x, boxes = two_crops
    g = grid_from_sparse(x, boxes, factor=8)
    assert g.values.shape[0] == 2 and g.values.shape[-1] == 1
    assert all(s % 8 == 0 for s in g.values.shape[1:4])
    assert g.origin.tolist() == [[0, 0, 0], [8, 0, 0]]  # box corners rounded down to the 8-voxel cells
    assert int(g.active.sum()) == x.features.shape[0]
    torch.testing.assert_close(grid_values_at(g, x.indices), x.features)
    assert float(g.values.sum()) == pytest.approx(float(x.features.sum()), rel=1e-5)


@pytest.mark.parametrize("quantize", [True, False])
def test_grid_forward_and_gradients_equal_the_sparse_pass(two_crops, quantize):
    x, boxes = two_crops
    model = small_model("patch").train()
    assert supports_grid(model)
    wake_zero_weights(model)
    out = {}
    for name, inp in (("sparse", x), ("grid", grid_from_sparse(x, boxes, model.factor))):
        model.zero_grad()
        recon, losses = model(inp, quantize=quantize)
        if isinstance(recon, GridBatch):
            # the grid's active voxels are exactly the sparse reconstruction's voxels
            assert int(recon.active.sum()) == out["sparse"][0].shape[0]
            pred = grid_values_at(recon, out["sparse"][2])
            loss = (recon.values - inp.values).abs().masked_fill(~recon.active[..., None], 0).sum() / recon.active.sum()
        else:
            pred = recon.features
            loss = (recon.features - sparse_lookup(x, recon.indices)).abs().mean()
        (loss + model.weighted_vq_loss(losses)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        codes = None if model.last_indices is None else model.last_indices.clone()
        out[name] = (pred.detach(), loss.detach(), None if isinstance(recon, GridBatch) else recon.indices, codes, grads)
    (p0, l0, _, c0, g0), (p1, l1, _, c1, g1) = out["sparse"], out["grid"]
    torch.testing.assert_close(p1, p0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-4)
    if quantize:
        assert torch.equal(c0, c1)  # the same latent cells in the same order, the same codes
    assert g0.keys() == g1.keys() and any(n.endswith("conv.weight") for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-4, rtol=1e-3, msg=n)


def test_models_without_the_grid_path_refuse_a_grid(two_crops):
    x, boxes = two_crops
    model = small_model("direct3d")
    assert not supports_grid(model)
    with pytest.raises(ValueError, match="GridBatch needs layout='patch'.*pass a SparseConvTensor"):
        model(grid_from_sparse(x, boxes, model.factor))


@pytest.mark.parametrize("quantize", [True, False])
def test_all_cells_forward_equals_the_grid_pass(two_crops, quantize):
    """Every latent cell a token (fixed shapes, what a CUDA graph replays): the cells outside the
    body are masked out of attention and losses, so reconstruction, losses, codes, gradients and
    the codebook's usage counts are those of the pass over the active cells only."""
    x, boxes = two_crops
    model = small_model("patch", vq_entropy_weight=0.5, vq_entropy_rows=100000).train()
    wake_zero_weights(model)
    g = grid_from_sparse(x, boxes, model.factor)
    out = {}
    for all_cells in (False, True):
        model.zero_grad()
        model.vq.reset_usage()
        recon, losses = model(g, quantize=quantize, all_cells=all_cells)
        if all_cells:
            assert model.vq.usage_counts.sum() == 0  # bookkeeping waits for finish_quantizer_step
            model.finish_quantizer_step()
        loss = (recon.values - g.values).abs().masked_fill(~recon.active[..., None], 0).sum() / recon.active.sum()
        (loss + model.weighted_vq_loss(losses)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        codes = model.last_indices
        out[all_cells] = (recon.values.masked_fill(~recon.active[..., None], 0).detach(), recon.active, losses,
                          grads, model.vq.usage_counts.clone(), codes)
    (v0, a0, l0, g0, u0, c0), (v1, a1, l1, g1, u1, _) = out[False], out[True]
    assert torch.equal(a0, a1)
    torch.testing.assert_close(v1, v0, atol=1e-4, rtol=1e-4)
    assert l0.keys() == l1.keys()
    for k in l0:
        torch.testing.assert_close(l1[k], l0[k], atol=1e-5, rtol=1e-4, msg=k)
    if quantize:
        assert "entropy" in l0 and float(l0["entropy"].detach()) < 0
        assert torch.equal(u0, u1) and u0.sum() == c0.numel()
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-4, rtol=1e-3, msg=n)


def test_compiled_grid_convs_give_the_eager_step(two_crops):
    """``compile_grid`` (``torch.compile`` of the conv levels, the trainer key of that name): the same
    reconstruction, losses and gradients as the eager grid pass, on two crops of real CT."""
    from torch._dynamo.utils import counters

    x, boxes = two_crops
    model = small_model("patch").train()
    wake_zero_weights(model)
    g = grid_from_sparse(x, boxes, model.factor)
    graphs_before = counters["stats"]["unique_graphs"]
    out = []
    for compiled in (False, True):
        if compiled:
            model.compile_grid()
        model.zero_grad()
        recon, losses = model(g)
        loss = (recon.values - g.values).abs().masked_fill(~recon.active[..., None], 0).sum() / recon.active.sum()
        (loss + model.weighted_vq_loss(losses)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out.append((recon.values.detach(), recon.active, loss.detach(), model.last_indices.clone(), grads))
    (v0, a0, l0, c0, g0), (v1, a1, l1, c1, g1) = out
    assert counters["stats"]["unique_graphs"] > graphs_before  # compiled code ran
    assert torch.equal(a0, a1) and torch.equal(c0, c1)
    torch.testing.assert_close(v1, v0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-4)
    assert g0.keys() == g1.keys() and any(n.endswith("conv.weight") for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-4, rtol=1e-3, msg=n)
    # compiled code does not pickle: a saved model runs the plain grid path
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False).grid_convs == (networks.grid.encode_local, networks.grid.decode_local)
    model.compile()  # and after nn.Module.compile() as well (it adds a compiled call of its own)
    buf = io.BytesIO()
    torch.save(model, buf)
    assert buf.tell() > 0


def _graphed_step_outputs(model, g, device, enabled, steps=2):
    """Loss, gradients and usage counts after ``steps`` calls of ``GraphedSteps`` on the same batch
    (no optimizer step in between, so every call computes the same step)."""
    from pipeline.graph_step import GraphedSteps

    def terms_of(x):  # fp32
        recon, losses = model(x, all_cells=True)
        rec = (recon.values - x.values).abs().masked_fill(~recon.active[..., None], 0).sum() / recon.active.sum()
        return {"loss": rec + model.weighted_vq_loss(losses)}

    params = [p for p in model.parameters() if p.requires_grad]
    steps_ = GraphedSteps(model, params, terms_of, torch.amp.GradScaler(device.type, enabled=False), enabled=enabled, bucket=24)
    model.vq.reset_usage()
    for _ in range(steps):
        terms = steps_(g)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(terms["loss"].detach()), grads, model.vq.usage_counts.clone(), steps_


def test_graphed_steps_pad_to_a_bucket_without_changing_the_step(two_crops):
    """Eagerly (CPU): a grid padded to the bucket (edges rounded up to 24 voxels) gives the unpadded step's
    loss and gradients, and the codebook's bookkeeping runs once per call."""
    x, boxes = two_crops
    model = small_model("patch", vq_entropy_weight=0.5, vq_entropy_rows=100000).train()
    wake_zero_weights(model)
    g = grid_from_sparse(x, boxes, model.factor)
    model.zero_grad()
    recon, losses = model(g, all_cells=True)
    model.finish_quantizer_step()
    ((recon.values - g.values).abs().masked_fill(~recon.active[..., None], 0).sum() / recon.active.sum()
     + model.weighted_vq_loss(losses)).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loss, grads, usage, steps = _graphed_step_outputs(model, g, torch.device("cpu"), enabled=False)
    (shape, calls), = steps.seen.items()
    assert steps.replays == 0 and calls == 2
    assert all(n % 24 == 0 for n in shape[1:]) and shape != tuple(g.active.shape)  # the grid was padded
    active_cells = int(networks.grid.encode_local(model.Encoder, g)[1].sum())
    assert 0 < active_cells < model.last_indices.numel() and usage.sum() == 2 * active_cells
    assert grads.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(grads[n], want[n], atol=1e-4, rtol=1e-3, msg=n)


def _replay_and_eager(ct_data_dir, out_path) -> None:
    """Two calls of ``GraphedSteps`` on the GPU, captured (the second replays) and eager, each on a
    fresh model of the same seed; their outputs saved to ``out_path``."""
    x, boxes = _two_crops(Path(ct_data_dir))
    dev = torch.device("cuda")
    out = {}
    for enabled in (True, False):
        model = small_model("patch", vq_entropy_weight=0.5, vq_entropy_rows=100000).to(dev).train()
        wake_zero_weights(model)
        g = grid_from_sparse(networks.make_sparse(x.features.to(dev), x.indices.to(dev), x.spatial_shape, x.batch_size),
                             boxes, model.factor)
        loss, grads, usage, steps = _graphed_step_outputs(model, g, dev, enabled)
        out[enabled] = {"loss": loss, "grads": {n: t.cpu() for n, t in grads.items()}, "usage": usage.cpu(),
                        "replays": steps.replays}
    torch.save(out, out_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replay_equals_the_eager_step(ct_data_dir, tmp_path):
    """On a GPU the second call captures the step as a CUDA graph and replays it: the same loss,
    gradients and usage counts as two eager calls. It runs in a child process: inside the pytest
    process the capture fails (cudaErrorStreamCaptureImplicit, cause not found), while a plain
    process, the benchmarks and the trainer capture the same step."""
    here = Path(__file__).resolve().parent
    code = (f"import sys; sys.path[:0] = [{str(here)!r}, {str(here.parent)!r}]; import test_grid; "
            f"test_grid._replay_and_eager({str(ct_data_dir)!r}, {str(tmp_path / 'out.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    graph, eager = out[True], out[False]
    assert graph["replays"] == 1 and eager["replays"] == 0
    assert graph["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    assert torch.equal(graph["usage"], eager["usage"])
    assert graph["grads"].keys() == eager["grads"].keys()
    for n in eager["grads"]:
        torch.testing.assert_close(graph["grads"][n], eager["grads"][n], atol=1e-4, rtol=1e-3, msg=n)


def test_residual_depth_dropout_keeps_the_step_eager():
    """A graph would keep the depth drawn at its capture, so a model with residual depth dropout is
    never captured (without dropout, or with one level, it can be)."""
    from pipeline.graph_step import GraphedSteps

    def ready(**kw):
        return GraphedSteps(small_model("patch", **kw), [], None, None, enabled=False)._ready()

    assert ready() and ready(vq_depth=2, vq_depth_dropout=False)
    assert not ready(vq_depth=2)


def test_crop_margin_leaves_cells_near_cut_crop_faces_out_of_the_codebook(two_crops):
    """With ``vq_crop_margin`` the codebook counts only the cells at least that far inside every crop
    face that cuts the scan (its support goes on past the face); the sparse, grid and all-cells
    passes count the same cells, and the reconstruction is the one without the margin."""
    import dataclasses

    from networks import grid
    from networks.grid import UNCUT, crop_faces, interior_weights

    x, boxes = two_crops
    support = boxes[:1].repeat(2, 1)  # the scan's support: sample 0 holds all of it, sample 1 a corner
    faces = crop_faces(boxes, support, 8)
    assert faces[0].tolist() == [-UNCUT] * 3 + [UNCUT] * 3
    g = dataclasses.replace(grid_from_sparse(x, boxes, 8), crop_faces=faces)
    counted = {}
    for margin in (0, 1):
        model = small_model("patch", vq_crop_margin=margin).train()
        wake_zero_weights(model)
        for path in ("sparse", "grid", "all_cells"):
            model.vq.reset_usage()
            if path == "sparse":
                recon, _ = model(x, quantize=True, crop_faces=faces)
                values = grid.grid_from_sparse(recon, boxes * 0 + torch.tensor([0, 0, 0, 32, 32, 32]), 8).values
            else:
                recon, _ = model(g, quantize=True, all_cells=path == "all_cells")
                values = recon.values
                if path == "all_cells":
                    model.finish_quantizer_step()
            counted[margin, path] = (model.vq.usage_counts.sum().item(), values.detach())
    active_cells = int(grid._pool_active(grid._pool_active(grid._pool_active(g.active))).sum())
    assert {counted[0, p][0] for p in ("sparse", "grid", "all_cells")} == {active_cells}
    assert len({counted[1, p][0] for p in ("sparse", "grid", "all_cells")}) == 1
    assert 0 < counted[1, "grid"][0] < active_cells
    for path in ("sparse", "grid"):
        torch.testing.assert_close(counted[1, path][1], counted[0, path][1])
    # one scan of 8^3 cells; sample 0 a crop of all of it, sample 1 of cells 1..3 on i and 0..3 on j and k
    box = torch.tensor([[0, 0, 0, 64, 64, 64], [8, 0, 0, 32, 32, 32]])
    faces = crop_faces(box, torch.tensor([[0, 0, 0, 64, 64, 64]] * 2), 8)
    assert faces[1].tolist() == [1, -UNCUT, -UNCUT, 4, 4, 4]
    coords = torch.tensor([[0, 0, 0, 0], [0, 7, 7, 7], [1, 1, 2, 2], [1, 2, 2, 2], [1, 2, 0, 0], [1, 2, 3, 3]])
    assert interior_weights(coords, faces, 1).tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    # margin 2: on i (cut on both sides, 3 cells) it shrinks to 1; on j and k (cut at 4 only) it stays 2
    assert interior_weights(coords, faces, 2).tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]

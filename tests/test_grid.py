"""The dense-box training path (``networks.grid``) gives the sparse forward pass's result on real CT."""

import pytest
import torch

import networks
from networks.grid import GridBatch, grid_from_sparse, grid_values_at, supports_grid
from networks.ops import sparse_lookup
from test_network_model import ct_sparse, small_model, wake_zero_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def two_crops(ct_data_dir):
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

"""Sparse backend and ops: conv vs dense conv3d, pooling/subdivide, lookup, windowed attention, guard."""

import pytest
import torch
import torch.nn.functional as F

from networks import backend
from networks.attention import window_partition, windowed_attention
from networks.blocks import SparseConv3d
from networks.dense import DenseGrid, dense_conv_policy, dense_min_occupancy, grid_for
from networks.ops import SparseNorm, downsample, linearize, sparse_lookup, subdivide

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py



def random_sparse(shape=(10, 10, 10), batch=2, channels=4, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand((batch, *shape), generator=g) < p
    idx = mask.nonzero().int()
    feats = torch.randn(idx.shape[0], channels, generator=g)
    return backend.make_sparse(feats, idx, shape, batch)


def to_dense(x):
    return x.dense()  # [B, C, X, Y, Z]


def test_backend_algo_and_env(monkeypatch):
    assert backend.conv_algo("cpu") == backend.ConvAlgo.Native
    assert backend.conv_algo("cuda") == backend.ConvAlgo.MaskImplicitGemm
    monkeypatch.setenv("SPCONV_ALGO", "native")
    assert backend.conv_algo("cuda") == backend.ConvAlgo.Native
    monkeypatch.setenv("SPCONV_ALGO", "bogus")
    with pytest.raises(ValueError, match="SPCONV_ALGO"):
        backend.conv_algo("cpu")


SPCONV_ONLY, DENSE_ALWAYS = float("inf"), 0.0


@pytest.mark.parametrize("policy", [SPCONV_ONLY, DENSE_ALWAYS], ids=["spconv", "dense"])
def test_submanifold_conv_matches_dense_conv3d(policy):
    torch.manual_seed(0)
    x = random_sparse(channels=4)
    conv = SparseConv3d(4, 5)
    with torch.no_grad():
        conv.conv.bias.normal_()
    with dense_conv_policy(policy):
        y = conv(x)
    assert (grid_for(x, 5) is None) == (policy == SPCONV_ONLY)  # the path the conv took
    assert torch.equal(y.indices, x.indices)  # submanifold: same sites
    w = conv.conv.weight.permute(0, 4, 1, 2, 3)  # KRSC -> [Cout, Cin, 3, 3, 3]
    ref = F.conv3d(to_dense(x), w, conv.conv.bias, padding=1)
    b, i, j, k = x.indices.long().unbind(1)
    ref_at = ref.permute(0, 2, 3, 4, 1)[b, i, j, k]
    torch.testing.assert_close(y.features, ref_at, atol=1e-5, rtol=1e-4)


def test_conv_backward_runs_on_cpu():
    x = random_sparse(channels=3)
    x = backend.make_sparse(x.features.requires_grad_(True), x.indices, x.spatial_shape, x.batch_size)
    conv = SparseConv3d(3, 2)
    conv(x).features.square().sum().backward()
    assert conv.conv.weight.grad is not None and x.features.grad is not None


def test_downsample_subdivide_roundtrip():
    x = random_sparse(shape=(8, 8, 8), channels=3)
    d = downsample(x)
    assert list(d.spatial_shape) == [4, 4, 4]
    # parents are exactly the unique coords // 2
    parents = torch.cat([x.indices[:, :1], x.indices[:, 1:] // 2], 1)
    assert torch.equal(torch.unique(linearize(parents, [4, 4, 4])), torch.sort(linearize(d.indices, [4, 4, 4])).values)
    # mean of children
    dense_sum = F.avg_pool3d(to_dense(x), 2) * 8
    cnt = F.avg_pool3d((to_dense(x).abs().sum(1, keepdim=True) > 0).float(), 2) * 8
    b, i, j, k = d.indices.long().unbind(1)
    ref = (dense_sum / cnt.clamp_min(1)).permute(0, 2, 3, 4, 1)[b, i, j, k]
    torch.testing.assert_close(d.features, ref, atol=1e-5, rtol=1e-5)
    # subdivide gives all 8 children of each parent, and pooling them back is the identity
    s = subdivide(d)
    assert s.indices.shape[0] == 8 * d.indices.shape[0]
    assert list(s.spatial_shape) == [8, 8, 8]
    assert torch.equal(torch.unique(torch.cat([s.indices[:, :1], s.indices[:, 1:] // 2], 1), dim=0), torch.unique(d.indices, dim=0))
    # every input voxel is among the children
    assert (sparse_lookup(backend.make_sparse(torch.ones(s.indices.shape[0], 1), s.indices, [8] * 3, 2), x.indices) == 1).all()
    back = downsample(s)
    order_d = torch.argsort(linearize(d.indices, [4] * 3))
    order_b = torch.argsort(linearize(back.indices, [4] * 3))
    torch.testing.assert_close(back.features[order_b], d.features[order_d])


def test_sparse_lookup():
    x = random_sparse(channels=2)
    perm = torch.randperm(x.indices.shape[0])
    torch.testing.assert_close(sparse_lookup(x, x.indices[perm]), x.features[perm])
    dense = to_dense(x)
    q = torch.cat([torch.randint(0, 2, (50, 1)), torch.randint(0, 10, (50, 3))], 1).int()
    b, i, j, k = q.long().unbind(1)
    torch.testing.assert_close(sparse_lookup(x, q), dense.permute(0, 2, 3, 4, 1)[b, i, j, k])
    outside = torch.tensor([[0, -1, 0, 0], [0, 10, 0, 0]], dtype=torch.int32)
    assert (sparse_lookup(x, outside) == 0).all()


@pytest.mark.parametrize("shift", [0, 2])
def test_windowed_attention_matches_dense_per_window(shift):
    torch.manual_seed(0)
    x = random_sparse(shape=(9, 9, 9), batch=2, channels=1, p=0.2)
    n, h, d, ws = x.indices.shape[0], 2, 4, 4
    qkv = torch.randn(n, 3, h, d)
    q, k, v = qkv.unbind(1)
    out = windowed_attention(qkv, x.indices, ws, shift)
    # reference: loop over windows (test only)
    idx = x.indices.long()
    wid = torch.cat([idx[:, :1], (idx[:, 1:] + shift) // ws], 1)
    ref = torch.empty_like(out)
    for w in torch.unique(wid, dim=0):
        m = (wid == w).all(1)
        o = F.scaled_dot_product_attention(q[m].transpose(0, 1), k[m].transpose(0, 1), v[m].transpose(0, 1))
        ref[m] = o.transpose(0, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # chunked variant (bounded padded tokens) gives the same
    torch.testing.assert_close(windowed_attention(qkv, x.indices, ws, shift, max_tokens=64), out, atol=1e-6, rtol=1e-5)
    part = window_partition(x.indices, ws, shift)
    assert int(part.counts.sum()) == n and int(part.counts.max()) <= ws**3 and part.length % 8 == 0
    assert int(part.valid.sum()) == n and sorted(part.order.tolist()) == list(range(n))
    # the grid's shape gives the same windows without reading the coordinates' extent
    same = window_partition(x.indices, ws, shift, x.spatial_shape)
    assert torch.equal(same.order, part.order) and torch.equal(same.counts, part.counts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuDNN's fused attention backward)")
def test_windowed_attention_gradients_stay_finite_at_a_masked_length_cudnn_gets_wrong():
    """448 tokens in one window pad to length 448 (448 % 128 == 64) under a key mask, with every
    logit near -120: the case in which cuDNN's fused backward returned NaN (pytorch#196678)."""
    torch.manual_seed(0)
    g = torch.stack(torch.meshgrid(*[torch.arange(8)] * 3, indexing="ij"), -1).reshape(-1, 3)[:448]
    indices = torch.cat([torch.zeros(448, 1, dtype=torch.long), g], 1).int().cuda()
    h, d = 1, 64
    qkv = torch.randn(448, 3, h, d, device="cuda", dtype=torch.float16) * 0.1
    qkv[:, 0, :, 0], qkv[:, 1, :, 0] = 1.0, -120 * d**0.5
    qkv.requires_grad_()
    out = windowed_attention(qkv, indices, 8)
    out.float().backward(torch.randn_like(out, dtype=torch.float32))
    assert torch.isfinite(qkv.grad).all()


def test_windows_use_absolute_coordinates():
    torch.manual_seed(0)
    x = random_sparse(shape=(16, 16, 16), batch=1, channels=1, p=0.2)
    n = x.indices.shape[0]
    qkv = torch.randn(n, 3, 1, 4)
    full = windowed_attention(qkv, x.indices, 4, 2)
    # a crop aligned to nothing in particular keeps the same windows for tokens far from its edges
    m = ((x.indices[:, 1:] >= 2) & (x.indices[:, 1:] < 14)).all(1)
    crop = windowed_attention(qkv[m], x.indices[m], 4, 2)
    torch.testing.assert_close(crop, full[m], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["layer", "group_voxel"])
def test_per_voxel_norm_independent_of_extent(mode):
    x = random_sparse(channels=8)
    norm = SparseNorm(8, mode, num_groups=4)
    full = norm(x).features
    m = x.indices[:, 1] < 5
    part = norm(backend.make_sparse(x.features[m], x.indices[m], x.spatial_shape, x.batch_size)).features
    torch.testing.assert_close(part, full[m])


def test_group_norm_per_sample_matches_torch():
    x = random_sparse(channels=8, batch=2)
    norm = SparseNorm(8, "group", num_groups=4)
    out = norm(x).features
    for b in range(2):  # reference per sample
        m = x.indices[:, 0] == b
        ref = F.group_norm(x.features[m].t()[None], 4, eps=norm.eps)[0].t()
        torch.testing.assert_close(out[m], ref, atol=1e-5, rtol=1e-4)


def test_int32_guard_names_layer_and_setting():
    x = random_sparse(channels=4)
    conv = SparseConv3d(4, 16)
    conv.name = "Decoder.upsample.2.out_layers.0"
    n = x.indices.shape[0]
    # the guard is spconv's: the dense path indexes with int64 (its own limit is tested below)
    with backend.int32_limit(n * 16 * 4), dense_conv_policy(SPCONV_ONLY):  # exactly the fp32 buffer: must refuse
        with pytest.raises(backend.SparseInt32LimitError, match=r"Decoder\.upsample\.2.*max_points.*tile"):
            conv(x)
    conv(x)  # default 2 GiB limit: fine
    with pytest.raises(backend.SparseInt32LimitError, match="1050000 voxels x 512 channels"):
        backend.check_int32_limit(1_050_000, 512, torch.float32, "Encoder.downsample.2")
    backend.check_int32_limit(1_000_000, 512, torch.float32, "ok")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the half-precision kernel path)"))])
def test_layer_norm_keeps_dtype_and_matches_fp32(device):
    """ops.layer_norm: output in the input's dtype (also under autocast), values as an fp32 LayerNorm."""
    from networks.ops import layer_norm

    torch.manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    x = (torch.randn(1000, 32, device=device) * 3 + 1).to(dtype)
    w, b = torch.rand(32, device=device) + 0.5, torch.randn(32, device=device)
    ref = F.layer_norm(x.double(), (32,), w.double(), b.double(), 1e-5)
    with torch.autocast(device, enabled=device == "cuda"):
        out = layer_norm(x, w, b)
    assert out.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out.double(), ref, atol=tol * 4, rtol=tol)
    # the norm's own 'layer' mode is this function
    norm = SparseNorm(32).to(device)
    with torch.no_grad():
        norm.weight.copy_(w)
        norm.bias.copy_(b)
    torch.testing.assert_close(norm.normalize(x), layer_norm(x, w, b))


def test_dense_and_spconv_paths_agree_forward_and_backward():
    """Same outputs and gradients (features, weight, bias) whichever path a conv takes."""
    torch.manual_seed(0)
    x = random_sparse(shape=(12, 9, 14), channels=6, p=0.5, seed=3)
    conv = SparseConv3d(6, 7)
    with torch.no_grad():
        conv.conv.bias.normal_()
    upstream = torch.randn(x.indices.shape[0], 7)
    results = []
    for policy in (SPCONV_ONLY, DENSE_ALWAYS):
        feats = x.features.clone().requires_grad_(True)
        conv.zero_grad()
        with dense_conv_policy(policy):
            y = conv(backend.make_sparse(feats, x.indices, x.spatial_shape, x.batch_size))
        (y.features * upstream).sum().backward()
        results.append((y.features.detach(), feats.grad, conv.conv.weight.grad.clone(), conv.conv.bias.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_dense_decision_by_occupancy_and_grid_size(monkeypatch):
    full = random_sparse(shape=(6, 6, 6), batch=1, p=1.1)  # every voxel: occupancy 1
    assert grid_for(backend.make_sparse(full.features, full.indices, (6, 6, 6), 1), 4) is None  # training: spconv
    with torch.no_grad():
        g = grid_for(full, 4)
    assert isinstance(g, DenseGrid) and g.shape == (1, 6, 6, 6)
    assert torch.equal(torch.sort(g.rows).values, torch.arange(216))
    assert grid_for(full, 4) is g  # decided once per level, cached beside the rulebooks
    # two voxels at opposite corners of a 40^3 box: far below the default occupancy
    far = backend.make_sparse(torch.ones(2, 4), torch.tensor([[0, 0, 0, 0], [0, 39, 39, 39]]), (40, 40, 40), 1)
    with torch.no_grad():
        assert grid_for(far, 4) is None
    # forced dense, a grid of 2^31 elements or more falls back to spconv (int32 sizes in cuDNN)
    huge = backend.make_sparse(torch.ones(2, 4), torch.tensor([[0, 0, 0, 0], [0, 1023, 1023, 1023]]), (1024,) * 3, 1)
    with dense_conv_policy(DENSE_ALWAYS):
        assert grid_for(huge, 4) is None
    # by default inference only; the environment sets one threshold for training and inference
    for env, want_inference, want_training in (("", 0.25, float("inf")), ("never", float("inf"), float("inf")),
                                               ("always", 0.0, 0.0), ("0.6", 0.6, 0.6)):
        monkeypatch.setenv("CTVQ_DENSE_CONV", env)
        assert (dense_min_occupancy(False), dense_min_occupancy(True)) == (want_inference, want_training)
    monkeypatch.setenv("CTVQ_DENSE_CONV", "sometimes")
    with pytest.raises(ValueError, match="CTVQ_DENSE_CONV='sometimes'.*always.*never"):
        dense_min_occupancy()


def test_occupied_tiles_are_the_distinct_tiles_in_order():
    """The occupancy grid gives the distinct tiles of the cells, in (i, j, k) order, as a row-unique would."""
    from networks.tiling import _occupied_tiles

    g = torch.Generator().manual_seed(0)
    cells = torch.cat([torch.randint(0, 64, (5000, 3), generator=g), torch.tensor([[63, 0, 17], [0, 63, 63]])])
    for tile in (16, 7):
        assert torch.equal(_occupied_tiles(cells, tile), torch.unique(cells // tile, dim=0) * tile)
    assert _occupied_tiles(cells[:0], 16).shape == (0, 3)

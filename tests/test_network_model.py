"""SparseVQVAE on real CT: shapes, gradients, Encode/Decode, tiled == untiled, parameter count, overfit."""

import time

import numpy as np
import pytest
import torch

import networks
from networks import backend
from networks.blocks import SparseConv3d
from networks.dense import dense_conv_policy
from networks.ops import linearize, sparse_lookup

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py



def ct_sparse(ct_data_dir, grid=32, stride=4, window=(400.0, 50.0), batch=1, start=(0, 0, 0)):
    """A window of the shared abdomen scan, subsampled by ``stride`` from ``start`` into a ``grid``^3 cube.

    Support = body (largest component above -500 HU, holes filled) and window > 0.
    """
    nib = pytest.importorskip("nibabel")
    from scipy import ndimage as ndi

    hu = np.asarray(nib.load(str(ct_data_dir / "abdomen_nifti" / "example_ct.nii.gz")).dataobj).astype(np.float32)
    a, b, c = start
    hu = hu[a::stride, b::stride, c::stride][:grid, :grid, :grid]
    body = hu > -500
    lab, _ = ndi.label(body)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = ndi.binary_fill_holes(lab == sizes.argmax())
    width, level = window
    win = np.clip((hu - (level - width / 2)) / width, 0, 1)
    support = body & (win > 0)
    coords = np.argwhere(support)
    feats = win[support][:, None]
    idx, fts = [], []
    for b in range(batch):
        idx.append(np.concatenate([np.full((len(coords), 1), b), coords], 1))
        fts.append(feats)
    idx = torch.from_numpy(np.concatenate(idx)).int()
    fts = torch.from_numpy(np.concatenate(fts)).float()
    return backend.make_sparse(fts, idx, [grid] * 3, batch)


LAYOUTS = ("patch", "direct3d")
#: three poolings (factor 8) in each layout
THREE_LEVELS = {"patch": (8, 16, 16), "direct3d": (8, 8, 16, 16)}


def small_model(layout="patch", channels=None, **kw):
    torch.manual_seed(0)
    channels = THREE_LEVELS[layout] if channels is None else channels
    args = dict(
        layout=layout,
        resolution=4,
        model_channels=16,
        latent_channels=8,
        num_embeddings=64,
        channels=channels,
        num_blocks=2,
        num_heads=2,
        window_size=2,
    )
    args.update(kw)
    return networks.SparseVQVAE(**args)


def first_weight(model):
    """Weight of the layer that reads the full-resolution input."""
    return model.Encoder.downsample[0].down.weight if model.layout == "patch" else model.Encoder.input_layer1.weight


def wake_zero_weights(model):
    """Zero-initialised parameters (identity residual blocks, child embeddings) get random values,
    so every layer shapes the output."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and not p.any():
                p.normal_(std=0.2)


def sort_sparse(x):
    order = torch.argsort(linearize(x.indices, x.spatial_shape))
    return x.indices[order], x.features[order]


@pytest.fixture(scope="module")
def ct32(ct_data_dir):
    return ct_sparse(ct_data_dir, grid=32, stride=4)


def test_default_size_and_api():
    model = networks.Direct3DS2_VQVAE(resolution=64, model_channels=512, latent_channels=32, num_embeddings=8192)
    assert model.layout == "patch" and model.channels == (32, 64, 128)
    n = networks.count_parameters(model)
    assert 27e6 < n < 31e6, n
    assert tuple(model.vq.embeddings.weight.shape) == (8192, 32)
    assert model.Encoder.halo == 4 and model.Decoder.halo == 4 and model.factor == 8
    assert isinstance(model, networks.SparseVQVAE)
    seed = networks.SparseVQVAE(layout="direct3d")
    assert 36e6 < networks.count_parameters(seed) < 40e6
    assert seed.Encoder.halo == 4 and seed.Decoder.halo == 3 and seed.factor == 8
    with pytest.raises(ValueError, match="layout"):
        networks.SparseVQVAE(layout="dense")


def test_patch_layout_touches_full_resolution_only_in_and_out():
    """No conv or norm runs at full resolution: every conv sits at 1/2 resolution or coarser."""
    model = small_model(resolution=4)
    convs = [m for m in model.modules() if isinstance(m, SparseConv3d)]
    x = networks.make_sparse(torch.rand(4096, 1), torch.cat([torch.zeros(4096, 1, dtype=torch.int32),
                             torch.stack(torch.meshgrid(*[torch.arange(16)] * 3, indexing="ij"), -1).view(-1, 3).int()], 1), [32] * 3, 1)
    grids = []
    hooks = [c.register_forward_hook(lambda m, i, o: grids.append(tuple(o.spatial_shape))) for c in convs]
    model(x)
    for h in hooks:
        h.remove()
    assert grids and max(g[0] for g in grids) == 16  # 1/2 of the 32^3 grid


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_backward_shapes_and_gradients(ct32, layout):
    model = small_model(layout)
    wake_zero_weights(model)  # a zero-initialised residual branch passes no gradient to its first conv
    x = networks.make_sparse(ct32.features.repeat(2, 1), torch.cat([ct32.indices, ct32.indices + torch.tensor([1, 0, 0, 0], dtype=torch.int32)]), [32] * 3, 2)
    recon, losses = model(x)
    cells = torch.unique(torch.cat([x.indices[:, :1], x.indices[:, 1:] // 8], 1), dim=0)
    assert recon.features.shape == (cells.shape[0] * 512, 1)
    assert list(recon.spatial_shape) == [32, 32, 32] and recon.batch_size == 2
    # recon covers exactly the 8^3 children of every active latent cell
    rc = torch.unique(torch.cat([recon.indices[:, :1], recon.indices[:, 1:] // 8], 1), dim=0)
    assert torch.equal(rc, cells)
    assert set(losses) >= {"vq", "commitment"} and losses["vq"].dim() == 0
    target = sparse_lookup(x, recon.indices)
    loss = (recon.features - target).abs().mean() + model.weighted_vq_loss(losses)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert no_grad == [], no_grad
    # stage 0: quantizer bypassed, zero losses, codebook untouched by the loss
    model.zero_grad()
    recon0, losses0 = model(x, quantize=False)
    assert float(losses0["vq"]) == 0 and float(losses0["commitment"]) == 0
    (recon0.features - sparse_lookup(x, recon0.indices)).abs().mean().backward()
    assert model.vq.embeddings.weight.grad is None
    assert first_weight(model).grad.abs().sum() > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_crop_gives_same_latent_inside(ct32, layout):
    """Per-voxel norms and absolute windows: a crop's interior tokens equal the whole volume's."""
    model = small_model(layout, channels={"patch": (8,), "direct3d": (8, 16)}[layout], window_size=4).eval()
    wake_zero_weights(model)
    full = model.encode_latent(ct32)
    keep = (ct32.indices[:, 1:] < 24).all(1)
    crop = networks.make_sparse(ct32.features[keep], ct32.indices[keep], [32] * 3, 1)
    part = model.encode_latent(crop)
    # latent cells (factor 2) at least the encoder halo plus one window away from the cut
    inner = (part.indices[:, 1:] < 12 - model.Encoder.halo - 4).all(1) & (part.indices[:, 1:] >= 0).all(1)
    q = part.indices[inner]
    torch.testing.assert_close(part.features[inner], sparse_lookup(full, q), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_encode_decode_roundtrip_api(ct32, layout):
    model = small_model(layout).eval()
    tokens = model.Encode(ct32)
    assert isinstance(tokens, networks.Tokens)
    assert tokens.coords.dtype == torch.int32 and tokens.indices.dtype == torch.int64
    assert tokens.latent_shape == (4, 4, 4) and tokens.batch_size == 1
    keys = linearize(tokens.coords, tokens.latent_shape)
    assert torch.all(keys[1:] > keys[:-1])  # sorted, unique
    recon = model.Decode(tokens)
    assert recon.features.shape == (len(tokens) * 512, 1)
    # Decode(Encode(x)) equals the quantised forward pass
    fwd, _ = model(ct32)
    a, b = sort_sparse(recon), sort_sparse(fwd)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-4)


def tube(grid=128, radius=3.0):
    """Voxels within ``radius`` of the main diagonal of a ``grid``^3 cube, values from a smooth field."""
    r = torch.arange(grid, dtype=torch.float32)
    c = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).view(-1, 3)
    d = c - (c.sum(1, keepdim=True) / 3)
    keep = d.norm(dim=1) <= radius
    idx = c[keep].int()
    feats = (torch.sin(c[keep] / 5.0).sum(1, keepdim=True) + 3) / 6
    return backend.make_sparse(feats, torch.cat([torch.zeros(len(idx), 1, dtype=torch.int32), idx], 1), [grid] * 3, 1)


def check_tiled(model, x, tile):
    wake_zero_weights(model)
    lat = model.encode_latent(x)
    lat_t = model.encode_latent(x, tile=tile)
    assert torch.equal(lat.indices, lat_t.indices)
    torch.testing.assert_close(lat_t.features, lat.features, atol=1e-4, rtol=1e-4)
    tok, tok_t = model.Encode(x), model.Encode(x, tile=tile)
    assert torch.equal(tok.coords, tok_t.coords) and torch.equal(tok.indices, tok_t.indices)
    r, r_t = sort_sparse(model.Decode(tok)), sort_sparse(model.Decode(tok, tile=tile))
    assert torch.equal(r[0], r_t[0])
    torch.testing.assert_close(r_t[1], r[1], atol=1e-4, rtol=1e-4)
    # the halos are needed: smaller ones change the result
    enc_halo, dec_halo = model.Encoder.halo, model.Decoder.halo
    model.Encoder.halo = 0
    assert not torch.allclose(model.encode_latent(x, tile=tile).features, lat.features, atol=1e-4, rtol=1e-4)
    model.Decoder.halo = 0
    assert not torch.allclose(sort_sparse(model.Decode(tok, tile=tile))[1], r[1], atol=1e-4, rtol=1e-4)
    model.Encoder.halo, model.Decoder.halo = enc_halo, dec_halo


@pytest.mark.parametrize("layout,channels,stride,tile,batch", [
    ("direct3d", (8, 16), 4, 4, 2), ("direct3d", (8, 8, 16), 2, 2, 1), ("patch", (8,), 4, 4, 2), ("patch", (8, 16), 2, 2, 1)])
def test_tiled_equals_untiled_real(ct_data_dir, layout, channels, stride, tile, batch):
    x = ct_sparse(ct_data_dir, grid=32, stride=stride, batch=batch)
    check_tiled(small_model(layout, channels=channels, window_size=4).eval(), x, tile)


@pytest.mark.parametrize("layout,halos", [("patch", (4, 4)), ("direct3d", (4, 3))])
def test_tiled_equals_untiled_three_levels(layout, halos):
    """Three poolings (factor 8) on a thin tube spanning a 16^3 latent grid."""
    model = small_model(layout, window_size=4).eval()
    assert (model.Encoder.halo, model.Decoder.halo) == halos
    check_tiled(model, tube(), tile=4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpointing_same_gradients(ct32, layout):
    m1 = small_model(layout)
    m2 = small_model(layout, use_checkpoint=True)
    m2.load_state_dict(m1.state_dict())
    wake_zero_weights(m1)
    m2.load_state_dict(m1.state_dict())
    grads = []
    for m in (m1, m2):
        recon, losses = m(ct32)
        (recon.features.square().mean() + losses["commitment"]).backward()
        grads.append(first_weight(m).grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout,first_conv", [("patch", r"Encoder\.downsample\.0\.res\.0\.layers\.2"),
                                               ("direct3d", r"Encoder\.downsample\.0\.out_layers\.0")])
def test_int32_guard_in_model(ct32, layout, first_conv):
    model = small_model(layout).eval()
    with backend.int32_limit(4096), dense_conv_policy(float("inf")):  # the guard guards spconv
        with pytest.raises(backend.SparseInt32LimitError, match=rf"^{first_conv}: .*max_points"):
            model.Encode(ct32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dense_convs_give_the_spconv_model_on_real_ct(ct32, layout):
    """A training forward and backward on a real crop: same reconstruction, losses and gradients
    whether the convs run dense (well-filled levels) or through spconv."""
    model = small_model(layout).train()
    wake_zero_weights(model)
    outs = []
    for policy in (float("inf"), 0.0):
        model.zero_grad()
        with dense_conv_policy(policy):
            recon, losses = model(ct32)
        (recon.features.square().mean() + losses["commitment"]).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outs.append((recon.features.detach(), losses["commitment"].detach(), grads))
    (r0, c0, g0), (r1, c1, g1) = outs
    torch.testing.assert_close(r0, r1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(c0, c1, atol=1e-5, rtol=1e-4)
    assert g0.keys() == g1.keys() and any(n.endswith("conv.weight") for n in g0)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_overfit_one_real_crop(ct_data_dir, layout):
    """200 steps on one real 32^3 crop (lung window, body edge) cut the L1 error at least 5x.

    100 steps with the quantizer bypassed (stage 0), k-means init of the codebook from the
    encoder outputs, then 100 quantised steps; the final error is measured quantised.
    """
    x = ct_sparse(ct_data_dir, grid=32, stride=1, window=(1500.0, -600.0), start=(26, 60, 40))
    torch.manual_seed(0)
    model = small_model(layout, model_channels=32, channels={"patch": (16, 16, 32), "direct3d": (8, 16, 16, 32)}[layout],
                        num_embeddings=128)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.time()
    first = None
    for step in range(200):
        if step == 100:
            with torch.no_grad():
                model.vq.collect(model.Encoder(x).features)
            model.vq.kmeans_init_from_reservoir()
        recon, losses = model(x, quantize=step >= 100)
        l1 = (recon.features - sparse_lookup(x, recon.indices)).abs().mean()
        opt.zero_grad()
        (l1 + model.weighted_vq_loss(losses)).backward()
        opt.step()
        if first is None:
            first = l1.item()
    model.eval()
    with torch.no_grad():
        recon, _ = model(x)
        final = (recon.features - sparse_lookup(x, recon.indices)).abs().mean().item()
    print(f"overfit: L1 {first:.4f} -> {final:.4f} in {time.time() - t0:.1f}s")
    assert final * 5 <= first


@pytest.mark.parametrize("vq_type", ["vq", "factorized", "simvq", "fsq"])
@pytest.mark.parametrize("depth", [1, 3])
def test_quantizer_variants_encode_decode(ct32, vq_type, depth):
    """Every quantizer kind and depth: Encode gives one code per level, Decode of all levels equals the
    quantised forward pass, and any prefix of the levels decodes."""
    model = small_model(vq_type=vq_type, vq_depth=depth, fsq_levels=(4, 4, 4)).eval()
    wake_zero_weights(model)
    tokens = model.Encode(ct32)
    assert tokens.indices.shape == ((len(tokens),) if depth == 1 else (len(tokens), depth))
    assert int(tokens.indices.max()) < model.num_embeddings == 64
    a, b = sort_sparse(model.Decode(tokens)), sort_sparse(model(ct32)[0])
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=1e-4)
    if depth > 1:
        coarse = sort_sparse(model.Decode(tokens, depth=1))
        assert torch.equal(coarse[0], a[0]) and not torch.allclose(coarse[1], a[1])
        with pytest.raises(ValueError, match="depth 4: these tokens hold 3"):
            model.Decode(tokens, depth=4)

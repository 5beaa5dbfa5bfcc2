"""VectorQuantizer: straight-through, losses, k-means init, dead-code restart, EMA, usage stats."""

import math

import pytest
import torch
from helpers import free_port, tiny_net

from networks.backend import make_sparse
from networks.quantizer import FSQuantizer, ResidualQuantizer, VectorQuantizer, build_quantizer, kmeans, nearest_code, perplexity_of


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def clustered(n_clusters=64, dim=8, per=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=g) * 3
    x = centres.repeat_interleave(per, 0) + 0.05 * torch.randn(n_clusters * per, dim, generator=g)
    return x[torch.randperm(x.shape[0], generator=g)], centres


def test_nearest_code_matches_cdist():
    z, _ = clustered()
    e = torch.randn(50, 8)
    assert torch.equal(nearest_code(z, e, chunk=100), torch.cdist(z, e).argmin(1))


def test_straight_through_and_losses():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4).train()
    enc = torch.nn.Linear(3, 4)
    z = enc(torch.randn(100, 3))
    z_q, idx, losses = vq(z)
    torch.testing.assert_close(z_q, vq.embeddings.weight[idx])  # forward = codes
    torch.testing.assert_close(losses["vq"], ((vq.embeddings.weight[idx] - z) ** 2).mean())
    torch.testing.assert_close(losses["commitment"], losses["vq"])
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward(retain_graph=True)
    # identity gradient to the encoder output, so the encoder gets d/dz = g
    gw = enc.weight.grad.clone()
    enc.weight.grad = None
    (z * g).sum().backward()
    torch.testing.assert_close(gw, enc.weight.grad)
    assert vq.embeddings.weight.grad is None  # codes get gradients only from the codebook loss
    losses["vq"].backward()
    assert vq.embeddings.weight.grad is not None and enc.weight.grad is not None


def test_kmeans_init_uses_many_codes():
    x, _ = clustered(64)
    vq = VectorQuantizer(64, 8, kmeans_init=True, kmeans_init_points=2000, reservoir_size=4096).train()
    assert not bool(vq.initialized)
    vq(x[:1000])
    assert not bool(vq.initialized)  # reservoir not yet full enough
    vq.reset_usage()
    vq(x[1000:2000])  # second batch triggers k-means automatically
    assert bool(vq.initialized)
    vq.reset_usage()
    vq(x)
    stats = vq.usage_stats()
    assert stats["codes_used"] >= 56, stats
    assert stats["perplexity"] > 45, stats
    # explicit trigger
    vq2 = VectorQuantizer(64, 8)
    vq2.collect(x)
    vq2.kmeans_init_from_reservoir()
    assert torch.unique(nearest_code(x, vq2.embeddings.weight)).numel() >= 56


def test_kmeans_function_recovers_centres():
    x, centres = clustered(8, per=100)
    c = kmeans(x, 8, iters=20, generator=torch.Generator().manual_seed(1))
    d = torch.cdist(centres, c).min(1).values
    assert (d < 0.5).sum() >= 6


def test_refit_fits_the_book_to_the_latents_given():
    """``refit`` replaces a trained book by k-means centres of the latents it is given (whole scans'
    after training) and starts its statistics afresh."""
    x, centres = clustered(64)
    vq = VectorQuantizer(64, 8, restart_every=5, dead_code_steps=3).train()
    vq(torch.randn(500, 8) * 0.01)  # a book trained on other latents: most of x lands on few codes
    before = perplexity_of(torch.bincount(vq.quantize_indices(x), minlength=64).double())["perplexity"]
    vq.refit(x, iters=20, generator=torch.Generator().manual_seed(0))
    after = perplexity_of(torch.bincount(vq.quantize_indices(x), minlength=64).double())["perplexity"]
    assert after > 40 > before
    assert (torch.cdist(centres, vq.codes()).min(1).values < 0.5).sum() >= 32
    assert bool(vq.initialized) and int(vq.last_used.min()) == int(vq.step) and float(vq.recent_usage.sum()) == 0.0
    assert torch.equal(vq.ema_embed_sum, vq.embeddings.weight.float())


@pytest.mark.parametrize("vq_type", ["factorized", "simvq"])
def test_refit_of_the_other_lookups(vq_type):
    x, _ = clustered(32, per=30)
    vq = build_quantizer(vq_type, 1, 32, 8)
    vq.refit(x, generator=torch.Generator().manual_seed(0))
    assert torch.unique(vq.quantize_indices(x)).numel() >= 24
    if vq_type == "simvq":
        assert torch.equal(vq.code_map.weight, torch.eye(8))


def test_refit_of_residual_levels_codes_what_the_earlier_ones_leave():
    x, _ = clustered(16, per=50)
    x = x + 0.3 * torch.randn_like(x)
    rq = build_quantizer("vq", 2, 16, 8)
    rq.refit(x, generator=torch.Generator().manual_seed(0))
    idx = rq.quantize_indices(x)
    err = [float((x - rq.lookup(idx[:, :d])).square().sum(1).mean()) for d in (1, 2)]
    assert err[1] < 0.8 * err[0]
    assert torch.unique(idx[:, 1]).numel() >= 12  # the second level spread over the residuals


def test_dead_codes_restarted():
    x, _ = clustered(16, dim=4)
    vq = VectorQuantizer(32, 4, restart_every=5, dead_code_steps=3, reservoir_size=1024).train()
    with torch.no_grad():
        vq.embeddings.weight[:16] = x[:16]
        vq.embeddings.weight[16:] = 1000.0  # far away: never chosen
    for _ in range(5):
        vq(x)
    far = (vq.embeddings.weight[16:].abs() > 100).any(1)
    assert not far.any(), "dead codes were not re-seeded"
    vq.reset_usage()
    for _ in range(5):
        vq(x)
    assert vq.usage_stats()["codes_used"] > 16


def test_rarely_used_codes_restarted_where_the_data_is():
    # 16 clusters with codes 0-15 on them; code 16 on one far outlier (1 of 641 rows a step): used
    # every step, so never dead, but rarely; codes 17-31 far from everything: dead either way
    x, centres = clustered(16, dim=4, per=40)
    outlier = centres[:1] + 40.0
    batch = torch.cat([x, outlier])

    def trained(share):
        vq = VectorQuantizer(32, 4, dead_code_steps=5, dead_code_share=share, reservoir_size=4096).train()
        with torch.no_grad():
            vq.embeddings.weight[:16] = centres
            vq.embeddings.weight[16] = outlier[0]
            vq.embeddings.weight[17:] = 1000.0
        for _ in range(10):
            vq(batch)
        vq.collect(x)  # the reservoir restarts draw from: the clusters only
        return vq

    kept = trained(0.0)
    assert not kept.rarely_used().any()
    assert kept.restart_dead_codes() == 15, "share 0: only the unused codes"
    assert torch.equal(kept.embeddings.weight[16], outlier[0])
    moved = trained(0.2)
    unused = (moved.step - moved.last_used) >= moved.dead_code_steps
    assert (moved.rarely_used() & ~unused).nonzero().flatten().tolist() == [16]
    assert moved.restart_dead_codes() == 16
    assert torch.equal(moved.embeddings.weight[:16], centres), "codes of ordinary usage stay"
    # the rare code now lies among the clusters the data fills, with a new window
    assert torch.cdist(moved.embeddings.weight[16:17], centres).min() < 1.0
    assert int(moved.born[16]) == 10 and float(moved.recent_usage[16]) == 0.0


def test_rarely_used_compares_codes_of_different_ages_fairly():
    # four codes, each used by 10 rows a step; code 0 gets a new window at step 14 (as a restart
    # does) and keeps its usage: at step 20 its short average must read the same, not 3/4 of it
    codes = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    vq = VectorQuantizer(4, 2, dead_code_steps=5, dead_code_share=0.9).train()
    with torch.no_grad():
        vq.embeddings.weight.copy_(codes)
    batch = codes.repeat_interleave(10, 0)
    for step in range(20):
        if step == 14:
            vq.recent_usage[0], vq.born[0] = 0.0, vq.step
        vq(batch)
    assert int(vq.step - vq.born[0]) == 6 and not vq.rarely_used().any()


def test_rarely_used_averages_over_settled_codes_only():
    # codes 0 and 1 take 10 rows a step, code 2 takes 6; codes 3-7, far away, were just restarted
    # (unsettled, no usage yet): they must not pull the average down and hide code 2
    codes = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    vq = VectorQuantizer(8, 2, dead_code_steps=5, dead_code_share=0.7).train()
    with torch.no_grad():
        vq.embeddings.weight[:3] = codes
        vq.embeddings.weight[3:] = 1000.0
    batch = torch.cat([codes[:2].repeat_interleave(10, 0), codes[2:].repeat(6, 1)])
    for step in range(20):
        if step == 18:
            vq.born[3:] = vq.step
        vq(batch)
    assert vq.rarely_used().nonzero().flatten().tolist() == [2]


def test_kmeans_init_starts_a_new_usage_window():
    vq = VectorQuantizer(8, 2, kmeans_init=True, kmeans_init_points=48, reservoir_size=48, dead_code_share=0.5).train()
    for _ in range(3):  # k-means in the third forward, at step 2
        vq(torch.randn(16, 2))
    assert bool(vq.initialized) and torch.equal(vq.born, torch.full((8,), 2))
    assert float(vq.recent_usage.sum()) == pytest.approx(16 / vq.dead_code_steps)  # one step since


def test_rarely_used_window_restarts_after_loading():
    vq = VectorQuantizer(8, 2, restart_every=4, dead_code_steps=4, dead_code_share=0.5).train()
    for _ in range(6):
        vq(torch.randn(64, 2))
    assert "recent_usage" not in vq.state_dict() and "born" not in vq.state_dict()
    loaded = VectorQuantizer(8, 2, restart_every=4, dead_code_steps=4, dead_code_share=0.5)
    loaded.load_state_dict(vq.state_dict())
    assert int(loaded.step) == 6 and torch.equal(loaded.born, torch.full((8,), 6))
    assert not loaded.rarely_used().any(), "a fresh window has no settled codes"


@pytest.mark.parametrize("share", [-0.1, 1.0])
def test_dead_code_share_out_of_range_is_refused(share):
    with pytest.raises(ValueError, match="vq_dead_code_share"):
        VectorQuantizer(8, 2, dead_code_share=share)


def test_ema_update_moves_codes_to_means():
    x, centres = clustered(4, dim=2, per=200)
    vq = VectorQuantizer(4, 2, codebook_update="ema", ema_decay=0.5).train()
    assert not vq.embeddings.weight.requires_grad
    with torch.no_grad():
        vq.embeddings.weight.copy_(centres + 0.5)
    for _ in range(20):
        _, _, losses = vq(x)
    assert float(losses["vq"]) == 0.0
    torch.testing.assert_close(vq.embeddings.weight, centres, atol=0.05, rtol=0)


def test_usage_stats_uniform_and_reset():
    vq = VectorQuantizer(8, 2).train()
    with torch.no_grad():
        vq.embeddings.weight.copy_(torch.arange(16, dtype=torch.float32).view(8, 2))
    vq(vq.embeddings.weight.detach().repeat(3, 1))
    s = vq.usage_stats()
    assert s["codes_used"] == 8 and s["usage"] == 1.0
    assert abs(s["perplexity"] - 8) < 1e-6
    vq.reset_usage()
    assert vq.usage_stats()["codes_used"] == 0


def test_low_precision_input_uses_fp32_distances():
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 8).eval()
    z = torch.randn(200, 8)
    ref = nearest_code(z, vq.embeddings.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, idx, losses = vq(z.bfloat16())
    assert z_q.dtype == torch.bfloat16 and losses["commitment"].dtype == torch.float32
    assert (idx == nearest_code(z.bfloat16().float(), vq.embeddings.weight)).all()
    assert (idx == ref).float().mean() > 0.9


def test_state_dict_restores_flags():
    x, _ = clustered(8, dim=4)
    vq = VectorQuantizer(8, 4, kmeans_init=True, kmeans_init_points=100).train()
    vq(x)
    assert bool(vq.initialized)
    fresh = VectorQuantizer(8, 4, kmeans_init=True, kmeans_init_points=100)
    fresh.load_state_dict(vq.state_dict())
    assert fresh._py_initialized and fresh._py_step == 1
    torch.testing.assert_close(fresh.embeddings.weight, vq.embeddings.weight)


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different data and random picks per rank
        x, _ = clustered(16, dim=4, seed=rank)
        vq = VectorQuantizer(32, 4, kmeans_init=True, kmeans_init_points=300 + 100 * rank, restart_every=3, dead_code_steps=2).train()
        for step in range(6):
            vq(x[: 200 + 50 * rank])  # ranks see different amounts: the init trigger must agree
        gathered = [torch.zeros_like(vq.embeddings.weight) for _ in range(world)]
        dist.all_gather(gathered, vq.embeddings.weight.detach())
        counts = [torch.zeros_like(vq.usage_counts) for _ in range(world)]
        dist.all_gather(counts, vq.usage_counts)
        if rank == 0:
            torch.save({"codebooks": gathered, "counts": counts, "init": bool(vq.initialized)}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_keep_one_codebook(tmp_path):
    """Two gloo ranks: k-means init, usage counts and restarts stay identical across ranks."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    port = free_port()
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, port, str(out)), nprocs=2, join=True)
    res = torch.load(out)
    assert res["init"]
    torch.testing.assert_close(res["codebooks"][0], res["codebooks"][1], atol=0, rtol=0)
    torch.testing.assert_close(res["counts"][0], res["counts"][1], atol=0, rtol=0)


# ---------------------------------------------------------------------------------- variants



def test_factorized_lookup_is_normalised_and_k_means_initialised():
    vq = build_quantizer("factorized", num_embeddings=64, embedding_dim=16, lookup_dim=4, kmeans_init=True,
                         kmeans_init_points=2048, reservoir_size=2048)
    assert tuple(vq.embeddings.weight.shape) == (64, 4) and vq.reservoir.shape[1] == 4
    z = clustered(n_clusters=32, dim=16, per=128)[0].requires_grad_(True)
    vq.train()
    zq, idx, losses = vq(z)  # fills the reservoir and runs k-means in the 4-d lookup space
    assert bool(vq.initialized) and vq.usage_stats()["codes_used"] > 16
    torch.testing.assert_close(vq.codes().norm(dim=1), torch.ones(64))
    (zq.square().sum() + losses["commitment"]).backward()
    assert z.grad is not None and vq.in_proj.weight.grad is not None and vq.out_proj.weight.grad is not None
    vq.eval()
    idx2 = vq.quantize_indices(z.detach())
    torch.testing.assert_close(vq.lookup(idx2), vq(z.detach())[0])


def test_factorized_dead_codes_restart_in_lookup_space():
    torch.manual_seed(0)
    vq = build_quantizer("factorized", num_embeddings=32, embedding_dim=8, lookup_dim=4, restart_every=1000,
                         dead_code_steps=2, reservoir_size=512)
    vq.train()
    z = clustered(n_clusters=4, dim=8, per=128)[0]
    for _ in range(3):
        vq(z)
    dead = (vq.step - vq.last_used) >= vq.dead_code_steps
    assert int(dead.sum()) > 0
    vq.collect(vq.to_lookup(z))
    assert vq.restart_dead_codes() == int(dead.sum())
    # the restarted codes sit on the data, in the normalised lookup space
    data = vq.to_lookup(z).detach()
    gap = torch.cdist(vq.codes()[dead].detach(), data).min(1).values
    assert float(gap.max()) < 0.1


def test_fsq_codes_round_trip_and_cover_the_grid():
    fsq = FSQuantizer(embedding_dim=6, levels=(8, 5, 4))
    assert fsq.num_embeddings == 160
    every = torch.arange(160)
    values = fsq.lookup(every)
    assert torch.unique(values, dim=0).shape[0] == 160  # every index is a distinct vector
    z = torch.randn(2048, 6) * 3
    fsq.train()
    zq, idx, losses = fsq(z.requires_grad_(True))
    assert float(losses["vq"]) == 0 and float(losses["commitment"]) == 0
    assert int(idx.min()) >= 0 and int(idx.max()) < 160 and fsq.usage_stats()["codes_used"] > 100
    torch.testing.assert_close(fsq.lookup(idx), zq.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fsq.quantize_indices(z.detach()), idx)
    zq.sum().backward()
    assert fsq.in_proj.weight.grad.abs().sum() > 0  # straight-through rounding passes gradients


def test_fsq_fitted_to_the_latents_uses_its_grid_where_a_random_projection_collapses():
    """Stage-0 latents of large scale in a few directions: random projections saturate the bound
    (few codes), projections fitted on the first training batch spread them over the levels."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 32))[0][:, :5]
    z = (torch.randn(20000, 5) * torch.tensor([40.0, 30, 20, 15, 10])) @ basis.T + 25.0
    usage, error = {}, {}
    for fit in (False, True):
        torch.manual_seed(1)
        fsq = build_quantizer("fsq", embedding_dim=32, kmeans_init=fit).train()
        assert fsq._py_initialized is (not fit)
        zq, idx, _ = fsq(z)
        usage[fit] = fsq.usage_stats()["codes_used"]
        error[fit] = float((zq.detach() - z).square().mean() / (z - z.mean(0)).square().mean())
        assert bool(fsq.initialized) and fsq._py_initialized
    assert usage[False] < 300 and usage[True] > 3000, usage
    assert error[True] < 0.4 < error[False], error  # quantised latents already close to the input
    fitted = build_quantizer("fsq", embedding_dim=32, kmeans_init=True)
    fitted.load_state_dict({k: v for k, v in fsq.state_dict().items() if k != "initialized"})  # an older checkpoint
    assert fitted._py_initialized  # trained weights are never fitted again


def test_residual_levels_refine_and_decode_any_prefix():
    torch.manual_seed(0)
    rq = build_quantizer("vq", depth=3, num_embeddings=32, embedding_dim=8)
    assert isinstance(rq, ResidualQuantizer) and rq.depth == 3
    z = torch.randn(4096, 8)
    with torch.no_grad():  # codebooks fitted level by level, as k-means would
        residual = z.clone()
        for q in rq.levels:
            q.embeddings.weight.copy_(kmeans(residual, 32, iters=5))
            residual = residual - q.lookup(q.quantize_indices(residual))
    rq.eval()
    idx = rq.quantize_indices(z)
    assert idx.shape == (4096, 3)
    with torch.no_grad():
        errors = [float((rq.lookup(idx[:, :d]) - z).square().mean()) for d in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2], errors
    zq, idx_fwd, _ = rq(z)
    assert torch.equal(idx_fwd, idx)
    torch.testing.assert_close(zq, rq.lookup(idx))
    rq.train()
    depths = set()
    for _ in range(30):
        zq, idx, losses = rq(z)
        assert idx.shape == (4096, 3)  # every level quantises and learns each step
        depths |= {d for d in (1, 2, 3) if torch.allclose(zq, rq.lookup(idx[:, :d]), atol=1e-6)}
        # the encoder commits to all levels together, whatever prefix the decoder gets
        torch.testing.assert_close(losses["commitment"], (z - rq.lookup(idx)).square().mean())
    assert depths == {1, 2, 3}  # depth dropout gives the decoder every prefix
    stats = rq.usage_stats()
    assert len(stats["levels"]) == 3 and stats["codes_used"] == stats["levels"][0]["codes_used"]


def test_unknown_quantizer_settings_are_refused():
    with pytest.raises(ValueError, match="vq_type"):
        build_quantizer("lfq")
    with pytest.raises(ValueError, match="vq_depth"):
        build_quantizer("vq", depth=0)
    with pytest.raises(ValueError, match="fsq_levels"):
        FSQuantizer(4, levels=(8, 1))


def test_residual_levels_wait_for_the_k_means_of_earlier_levels():
    rq = build_quantizer("vq", depth=2, num_embeddings=16, embedding_dim=8, kmeans_init=True, kmeans_init_points=256,
                         reservoir_size=256, depth_dropout=False)
    rq.train()
    z = clustered(n_clusters=16, dim=8, per=8)[0]  # 128 vectors a step
    _, idx, _ = rq(z)
    assert idx.shape[1] == 1 and rq.levels[1].reservoir.shape[0] == 0  # level 1 sees no residuals yet
    rq(z)  # level 0's reservoir is full: k-means
    assert bool(rq.levels[0].initialized) and rq.levels[1].reservoir.shape[0] == 0
    rq(z)  # now level 1 collects the residuals of the initialised level 0
    assert rq.levels[1].reservoir.shape[0] > 0 and not bool(rq.levels[1].initialized)
    rq(z)
    assert bool(rq.levels[1].initialized) and rq(z)[1].shape[1] == 2


def test_simvq_moves_every_code_through_one_map():
    """The shared-map lookup: only ``code_map`` is learned, so one codebook-loss step moves all codes,
    used or not; k-means sets the basis (map reset to identity); restarts land on the data."""
    torch.manual_seed(0)
    vq = build_quantizer("simvq", num_embeddings=64, embedding_dim=8, kmeans_init=True, kmeans_init_points=1024,
                         reservoir_size=1024, restart_every=1000, dead_code_steps=2)
    assert not vq.embeddings.weight.requires_grad and vq.code_map.weight.requires_grad
    z = clustered(n_clusters=16, dim=8, per=128)[0]
    vq.train()
    vq(z)  # k-means on the first batch
    assert bool(vq.initialized)
    torch.testing.assert_close(vq.code_map.weight, torch.eye(8))
    torch.testing.assert_close(vq.codes(), vq.embeddings.weight.float())
    before = vq.codes().detach().clone()
    opt = torch.optim.SGD([p for p in vq.parameters() if p.requires_grad], lr=0.5)
    zq, idx, losses = vq(z + 0.3)
    losses["vq"].backward()
    opt.step()
    moved = (vq.codes().detach() - before).norm(dim=1) > 1e-6
    used = torch.zeros(64, dtype=torch.bool)
    used[idx.unique()] = True
    assert bool(moved[~used].all()), "unused codes must move with the shared map"
    for _ in range(3):
        vq(z)
    dead = (vq.step - vq.last_used) >= vq.dead_code_steps
    assert int(dead.sum()) > 0
    vq.collect(z)
    assert vq.restart_dead_codes() == int(dead.sum())
    gap = torch.cdist(vq.codes()[dead].detach(), vq.reservoir).min(1).values  # on recent outputs, up to the jitter
    assert float(gap.max()) < 0.2


def test_simvq_basis_stays_frozen_in_every_stage():
    from networks import SparseVQVAE
    from pipeline.stages import freeze_for_stage

    model = SparseVQVAE(resolution=32, model_channels=32, latent_channels=8, num_embeddings=16, channels=[8, 16, 16],
                        num_blocks=1, num_heads=2, window_size=4, vq_type="simvq")
    for stage in (1, 2):
        freeze_for_stage(model, stage)
        assert not model.vq.embeddings.weight.requires_grad and model.vq.code_map.weight.requires_grad


def test_fsq_refuses_levels_that_do_not_give_the_codebook_size():
    with pytest.raises(ValueError, match=r"fsq_levels \[8, 8, 8, 4, 4\] give 8192 codes but num_embeddings is 128"):
        build_quantizer("fsq", num_embeddings=128, embedding_dim=8)
    assert build_quantizer("fsq", num_embeddings=128, embedding_dim=8, fsq_levels=(8, 4, 4)).num_embeddings == 128


def _usage_after_training(seed: int, weight: float) -> dict:
    """Codes used by a crowded batch of free latents (88 % in a small ball among 64 random codes) after
    150 steps on the codebook and commitment losses plus the usage loss of ``weight``; the same data
    and starting codebook for every weight."""
    g = torch.Generator().manual_seed(seed)
    crowded = torch.cat([torch.randn(900, 8, generator=g) * 0.3, torch.randn(124, 8, generator=g)])
    book = torch.randn(64, 8, generator=g)
    torch.manual_seed(seed)
    vq = VectorQuantizer(64, 8, entropy_weight=weight, entropy_rows=512).train()
    with torch.no_grad():
        vq.embeddings.weight.copy_(book)
    z = torch.nn.Parameter(crowded)
    opt = torch.optim.Adam([z, vq.embeddings.weight], lr=0.05)
    for _ in range(150):
        _, _, losses = vq(z)
        assert ("entropy" in losses) == (weight > 0)
        opt.zero_grad()
        (losses["vq"] + 0.25 * losses["commitment"] + losses.get("entropy", 0.0)).backward()
        opt.step()
    vq.reset_usage()
    with torch.no_grad():
        vq(z)
    return vq.usage_stats()


def test_usage_loss_spreads_a_skewed_batch_over_the_book():
    """The entropy term moves latents crowded onto a few codes out to unused ones: on every seed more
    codes are used and the perplexity is higher than without it (weight 0)."""
    gained = []
    for seed in range(4):
        without, with_loss = _usage_after_training(seed, 0.0), _usage_after_training(seed, 1.0)
        assert with_loss["codes_used"] > without["codes_used"] and with_loss["perplexity"] > without["perplexity"], \
            (seed, without, with_loss)
        gained.append(with_loss["codes_used"] - without["codes_used"])
    assert sum(gained) / len(gained) >= 4, gained


def test_usage_loss_is_bounded_and_lowest_for_sharp_spread_assignments():
    vq = VectorQuantizer(16, 4, entropy_weight=1.0)
    codes = torch.eye(4).repeat(4, 1) * torch.arange(1, 5).repeat_interleave(4)[:, None] * 10
    spread = vq.usage_entropy(codes.clone(), codes)  # one vector on each code
    crowded = vq.usage_entropy(codes[:1].repeat(16, 1), codes)  # all on one code
    assert -1.0 <= float(spread) < -0.9 and -0.05 < float(crowded), (spread, crowded)
    g = torch.Generator().manual_seed(0)
    near = vq.usage_entropy(codes + 6 * torch.randn(16, 4, generator=g), codes)  # off the codes: softer
    assert float(spread) < float(near) < float(crowded), (spread, near, crowded)
    with pytest.raises(ValueError, match=r"network_def#vq_entropy_weight=-0.1: the usage loss's weight must be >= 0 \(0 turns it off"):
        VectorQuantizer(16, 4, entropy_weight=-0.1)
    fsq = build_quantizer("fsq", embedding_dim=8, entropy_weight=0.1).train()  # no codebook: no usage loss
    assert set(fsq(torch.randn(64, 8))[2]) == {"vq", "commitment"}


def test_usage_loss_per_sample_scope_asks_each_sample_to_spread_by_itself():
    """Two samples that split the book between them score as spread over the whole book with
    ``entropy_scope="batch"``, but only half with ``"sample"``; samples that each cover the book
    score the same either way; a model passes its batch index through."""
    codes = torch.eye(4).repeat(4, 1) * torch.arange(1, 5).repeat_interleave(4)[:, None] * 10
    halves = torch.arange(16) // 8  # sample 0 on codes 0-7, sample 1 on codes 8-15
    batch = VectorQuantizer(16, 4, entropy_weight=1.0, entropy_scope="batch")
    sample = VectorQuantizer(16, 4, entropy_weight=1.0, entropy_scope="sample")
    split_batch = float(batch.usage_entropy(codes.clone(), codes, halves, 2))
    split_sample = float(sample.usage_entropy(codes.clone(), codes, halves, 2))
    assert split_batch < -0.95 and abs(split_sample - (-math.log(8) / math.log(16))) < 0.03, (split_batch, split_sample)
    both = torch.cat([codes, codes])
    each_covers = float(sample.usage_entropy(both, codes, torch.arange(32) // 16, 2))
    assert abs(each_covers - float(batch.usage_entropy(both, codes))) < 1e-5
    assert abs(float(sample.usage_entropy(codes.clone(), codes)) - split_batch) < 1e-6  # no groups: the batch
    with pytest.raises(ValueError, match=r"network_def#vq_entropy_scope='crop' is not one of \['batch', 'sample'\]"):
        VectorQuantizer(16, 4, entropy_scope="crop")
    with pytest.raises(ValueError, match=r"network_def#vq_entropy_temperature=0.0 must be > 0"):
        tiny_net(vq_entropy_weight=0.1, vq_entropy_temperature=0.0)
    settable = tiny_net(vq_entropy_rows=128, vq_entropy_temperature=0.05, vq_entropy_scope="batch").vq
    assert (settable.entropy_rows, settable.entropy_temperature, settable.entropy_scope) == (128, 0.05, "batch")
    model = tiny_net(vq_entropy_weight=1.0, vq_entropy_scope="sample").train()
    seen = []
    original = model.vq.usage_entropy
    model.vq.usage_entropy = lambda zl, c, groups=None, num_groups=1, weights=None: seen.append((groups, num_groups)) or original(zl, c, groups, num_groups, weights)
    cells = torch.stack(torch.meshgrid(*[torch.arange(16)] * 3, indexing="ij"), -1).reshape(-1, 3)
    idx = torch.cat([torch.cat([torch.full((len(cells), 1), b), cells], 1) for b in (0, 1)])
    _, losses = model(make_sparse(torch.rand(len(idx), 1), idx, [32] * 3, 2))
    assert seen and seen[0][1] == 2 and set(seen[0][0].tolist()) == {0, 1} and float(losses["entropy"].detach()) < 0


def test_usage_loss_per_sample_matches_a_loop_over_the_samples():
    """Unequal samples (one empty, ``num_groups`` above those present), a row subset smaller than the
    batch: the loss is the row-weighted mean over the samples present of what each alone scores, and
    its gradient reaches the latents."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(32, 4, generator=g)
    z = torch.randn(300, 4, generator=g, requires_grad=True)
    groups = torch.cat([torch.zeros(200, dtype=torch.long), torch.full((100,), 2)])  # sample 1 empty
    vq = VectorQuantizer(32, 4, entropy_weight=1.0, entropy_rows=120)
    torch.manual_seed(1)
    loss = vq.usage_entropy(z, codes, groups, 4)
    torch.manual_seed(1)  # the same row subset
    keep = torch.randperm(300)[:120]
    zk, gk = z[keep], groups[keep]
    whole = VectorQuantizer(32, 4, entropy_weight=1.0, entropy_rows=10**6, entropy_scope="batch")
    d = torch.cdist(zk, codes) ** 2
    scale = 0.1 * d.min(1).values.mean()
    logp = torch.log_softmax(-d / scale, 1)
    p = logp.exp()
    per_vector = -(p * logp).sum(1).mean()

    def entropy(m):
        return -(m * m.clamp_min(1e-12).log()).sum()

    of_mean = sum((gk == s).sum() / len(gk) * entropy(p[gk == s].mean(0)) for s in (0, 2))
    assert float(loss.detach()) == pytest.approx(float(((per_vector - of_mean) / math.log(32)).detach()), abs=1e-5)
    assert float(loss.detach()) > float(whole.usage_entropy(zk, codes).detach()) - 1e-6  # each sample by itself: never more spread
    loss.backward()
    assert z.grad is not None and float(z.grad[keep].abs().sum()) > 0

"""CTWindowSparseDataset, crops, split, collate and batch_split on a tiny synthetic processed dataset."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.dataset import (
    CTWindowSparseDataset,
    StepSampler,
    batch_crop_faces,
    batch_split,
    block_counts,
    find_datasets,
    sparse_collate,
    to_grid_batch,
    to_sparse_tensor,
)

from networks.grid import UNCUT

LUNG = "windows/lung_w1500_l-600.npy"


def write_processed_dataset(root: Path, name: str = "synth", num_cases: int = 3, resolution: int = 32,
                            failed: int = 1, body_mask: bool = True, seed: int = 0, empty: int = 0) -> Path:
    """Writes a processed dataset in the older guide's layout, without .complete markers (tiny ellipsoid 'bodies')."""
    rng = np.random.default_rng(seed)
    ds = Path(root) / name
    rows = []
    r = resolution
    grid = np.stack(np.meshgrid(*[np.arange(r)] * 3, indexing="ij"), 0).astype(np.float32)
    for n in range(num_cases + failed + empty):
        cid = f"case_{n:03d}"
        if n >= num_cases + empty:
            rows.append({"case_id": cid, "source_path": f"raw/{cid}", "label_path": "", "status": "failed",
                         "error": "CTLoadError: not a CT", "body_voxels": 0})
            continue
        cdir = ds / "processed" / cid
        (cdir / "windows").mkdir(parents=True, exist_ok=True)
        c = r / 2 + rng.uniform(-2, 2, 3)
        radii = np.array([r * 0.4, r * 0.3, r * 0.45])
        body = (((grid - c[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1.0
        if n >= num_cases:  # nearly empty case (below min_points)
            body[:] = False
            body[:2, :2, :2] = True
        hu = np.where(body, 40.0 + 200 * rng.standard_normal((r, r, r)), -1000.0).astype(np.float32)
        lungs = body & ((((grid - c[:, None, None, None]) / (radii[:, None, None, None] * 0.5)) ** 2).sum(0) <= 1.0)
        hu[lungs] = -850.0
        lung = np.clip((hu - (-600 - 750)) / 1500, 0, 1).astype(np.float16)
        ctn = ((np.clip(hu, -1024, 3071) + 1024) / 4095).astype(np.float16)
        np.save(cdir / LUNG, lung)
        np.save(cdir / "ct_normalized_512.npy", ctn)
        if body_mask:
            np.save(cdir / "body_mask_512.npy", body)
        (cdir / "case.json").write_text(json.dumps({"case_id": cid, "affine_512": np.eye(4).tolist()}))
        rows.append({"case_id": cid, "source_path": f"raw/{cid}", "label_path": "", "status": "ok", "error": "",
                     "body_voxels": int(body.sum())})
    with open(ds / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", "source_path", "label_path", "status", "error", "body_voxels"])
        w.writeheader()
        w.writerows(rows)
    cfg = {"resolution": r, "hu_min": -1024, "hu_max": 3071,
           "windows": {"lung": {"width": 1500, "level": -600, "file": LUNG}}, "organ_mapping": None}
    (ds / "dataset_config.json").write_text(json.dumps(cfg))
    return ds


@pytest.fixture()
def synth(tmp_path):
    root = tmp_path / "processed_dataset"
    write_processed_dataset(root, "a", num_cases=3, failed=1, empty=1)
    write_processed_dataset(root / "nested", "b", num_cases=2, failed=0, body_mask=False, seed=1)
    return root


def test_find_and_skip(synth):
    assert [p.name for p in find_datasets(synth)] == ["a", "b"]
    assert len(find_datasets(f"{synth / 'a'},{synth / 'nested'}")) == 2
    ds = CTWindowSparseDataset(synth, "lung", split="all", min_points=100, max_points=10**9)
    assert len(ds.failed) == 1 and len(ds.skipped) == 1
    assert len(ds) == 5
    with pytest.raises(KeyError, match="window_type"):
        CTWindowSparseDataset(synth, "nonexistent")
    with pytest.raises(FileNotFoundError, match="preprocess"):
        CTWindowSparseDataset(synth / "a" / "processed", "lung")


def test_sample_support_and_crop(synth):
    full = CTWindowSparseDataset(synth, "lung", split="all", max_points=10**9, cache="memory")
    s = full[0]
    win = np.load(Path(full.cases[0]["window_file"])).astype(np.float32)
    mask = np.load(Path(full.cases[0]["dir"]) / "body_mask_512.npy")
    assert s["coords"].dtype == torch.int32 and s["feats"].shape == (len(s["coords"]), 1)
    assert len(s["coords"]) == int((mask & (win > 0)).sum())
    # a case within the budget is cropped to the 8-voxel blocks that hold its support, not the cube
    box = s["box"].numpy()
    lo, hi = s["coords"].numpy().min(0), s["coords"].numpy().max(0) + 1
    assert (box % 8 == 0).all() and (box[:3] == lo // 8 * 8).all() and (box[3:] == np.minimum(-(-hi // 8) * 8, win.shape)).all()
    # such a crop cuts nothing: its box is the case's support box, so no face of it is a cut
    assert torch.equal(s["support"], s["box"])
    assert (batch_crop_faces(sparse_collate([s]), 8).abs() == UNCUT).all()
    # body mask computed from ct_normalized when the file is absent (dataset "b")
    assert all(c["num_points"] > 100 for c in full.cases if c["key"].startswith("b/"))
    crop = CTWindowSparseDataset(synth, "lung", split="all", max_points=2000)
    for i in range(len(crop)):
        for draw in range(3):
            t = crop[(i, draw)]
            box = t["box"].numpy()
            assert len(t["coords"]) <= 2000 and len(t["coords"]) > 0
            assert (box % 8 == 0).all()
            c = t["coords"].numpy()
            assert (c >= box[:3]).all() and (c < box[3:]).all()
            support = t["support"].numpy()  # the whole case's support: a face inside it cuts the scan
            faces = batch_crop_faces(sparse_collate([t]), 8)[0].numpy()
            assert ((faces[:3] == box[:3] // 8) == (box[:3] > support[:3])).all()
            assert ((faces[3:] == box[3:] // 8) == (box[3:] < support[3:])).all()
            # whole neighbourhoods: every support voxel inside the box is present (no dropping)
            sl = tuple(slice(box[k], box[k + 3]) for k in range(3))
            m = np.load(Path(crop.cases[i]["dir"]) / "body_mask_512.npy")[sl] if (Path(crop.cases[i]["dir"]) / "body_mask_512.npy").exists() else None
            if m is not None:
                w = np.load(crop.cases[i]["window_file"])[sl]
                assert len(c) == int((m & (w > 0)).sum())
    # deterministic per draw id, different across draws
    a, b = crop[(0, 5)], crop[(0, 5)]
    assert torch.equal(a["coords"], b["coords"])


def test_block_counts_and_box():
    rng = np.random.default_rng(0)
    win = rng.random((32, 32, 32)).astype(np.float16)
    win[win < 0.5] = 0
    counts = block_counts(win, None, 8, slab=8)
    assert counts.sum() == int((win > 0).sum())
    assert counts.dtype == np.uint16 and counts.shape == (4, 4, 4)


def test_split_deterministic(synth):
    tr = CTWindowSparseDataset(synth, "lung", split="train", seed=3, num_val=1)
    va = CTWindowSparseDataset(synth, "lung", split="val", seed=3, num_val=1)
    tr2 = CTWindowSparseDataset(synth, "lung", split="train", seed=3, num_val=1)
    keys_tr = {c["key"] for c in tr.cases}
    keys_va = {c["key"] for c in va.cases}
    assert keys_tr == {c["key"] for c in tr2.cases}
    assert not keys_tr & keys_va and len(keys_va) == 1


def test_num_val_zero_trains_on_every_case(synth):
    """A small collection gives all its cases to training (quality runs, two-scan datasets)."""
    every = {c["key"] for c in CTWindowSparseDataset(synth, "lung", split="all").cases}
    assert len(every) >= 2
    assert {c["key"] for c in CTWindowSparseDataset(synth, "lung", split="train", num_val=0).cases} == every
    held_out = {c["key"] for c in CTWindowSparseDataset(synth, "lung", split="val", num_val=0).cases}
    assert held_out == every  # nothing held out: validation runs on the training cases


def test_collate_and_split(synth):
    ds = CTWindowSparseDataset(synth, "lung", split="all", max_points=3000)
    batch = sparse_collate([ds[(0, 0)], ds[(1, 0)], ds[(2, 0)]])
    assert batch["indices"].shape[1] == 4 and batch["indices"].dtype == torch.int16  # widened on the device
    assert batch["batch_size"] == 3 and batch["indices"][:, 0].max() == 2
    parts = batch_split(batch, 2)
    assert [p["batch_size"] for p in parts] == [2, 1]
    assert torch.equal(parts[1]["support"], batch["support"][2:]) and batch["support"].shape == (3, 6)
    assert sum(len(p["indices"]) for p in parts) == len(batch["indices"])
    assert parts[1]["indices"][:, 0].max() == 0
    assert torch.equal(parts[1]["features"], batch["features"][batch["indices"][:, 0] == 2])


def test_step_sampler_resume():
    ds = list(range(5))
    s = StepSampler(ds, batch_size=2, seed=1, num_replicas=1, rank=0)
    it = iter(s)
    seq = [next(it) for _ in range(14)]
    s2 = StepSampler(ds, batch_size=2, seed=1, start_step=3, num_replicas=1, rank=0)
    it2 = iter(s2)
    assert [next(it2) for _ in range(8)] == seq[6:14]
    # ranks draw disjoint global ids
    r0 = iter(StepSampler(ds, batch_size=1, seed=1, num_replicas=2, rank=0))
    r1 = iter(StepSampler(ds, batch_size=1, seed=1, num_replicas=2, rank=1))
    g0 = {next(r0)[1] for _ in range(5)}
    g1 = {next(r1)[1] for _ in range(5)}
    assert not g0 & g1


def test_check_data_report(synth, capsys):
    from pipeline.check_data import main

    assert main([str(synth), "--window", "lung", "--max_points", "2000"]) == 0
    out = capsys.readouterr().out
    assert "Datasets found" in out and "failed   a/case_004" in out and "skipped  a/case_003" in out
    assert "Sample " in out and "loaded in" in out
    assert main([str(synth), "--window", "brain"]) == 1  # no brain window files: nothing usable
    capsys.readouterr()
    main([str(synth), "--window", "lung"])  # the crop budget training ships, unless told otherwise
    assert "crops above max_points=2000000" in capsys.readouterr().out
    main([str(synth), "--max-points", "3000", "--min-points", "50"])  # the dashed spelling as the other commands
    assert "crops above max_points=3000" in capsys.readouterr().out



def test_compact_and_guide_layouts_give_the_same_crops(tmp_path):
    """Training samples from the compact layout and from --layout guide of the same scans: same
    cases, crop boxes and support voxels; window values equal up to the guide's float16; the
    same model step gives the same loss."""
    from helpers import tiny_net
    from pipeline import preprocess
    from pipeline.dataset import to_sparse_tensor
    from pipeline.phantom import write_phantom_dataset
    from pipeline.trainer import SparseReconLoss

    write_phantom_dataset(tmp_path / "raw", seeds=[0, 1], shape=(40, 40, 30), spacing=8.0)
    sets = {}
    for layout in ("compact", "guide"):
        s = preprocess.run(tmp_path / "raw", tmp_path / layout, None, 0, 32, ["lung"], progress=False,
                           log=lambda *a, **k: None, layout=layout)
        assert s["ok"] == 2
        sets[layout] = CTWindowSparseDataset(tmp_path / layout, "lung", split="all", max_points=3000, cache="memory")
    a, b = sets["compact"], sets["guide"]
    assert [c["key"] for c in a.cases] == [c["key"] for c in b.cases] and len(a) == 2
    assert [c["num_points"] for c in a.cases] == [c["num_points"] for c in b.cases]
    assert all(c["num_points"] > 3000 for c in a.cases)  # every sample is a crop
    net, recon_loss = tiny_net(0), SparseReconLoss("l1")
    for draw in range(6):
        sa, sb = a[(draw % 2, draw)], b[(draw % 2, draw)]
        assert torch.equal(sa["box"], sb["box"]) and torch.equal(sa["coords"], sb["coords"])
        assert torch.allclose(sa["feats"], sb["feats"], atol=2.0**-11)
        losses = []
        for s in (sa, sb):
            x = to_sparse_tensor(sparse_collate([s]))
            with torch.no_grad():
                recon, terms = net(x)
            losses.append([float(recon_loss(recon, x)), float(terms["vq"]), float(terms["commitment"])])
        assert losses[0] == pytest.approx(losses[1], rel=1e-2, abs=1e-4)


def test_empty_training_set_names_the_window():
    class Empty:
        window_type = "lung"

        def __len__(self):
            return 0

    with pytest.raises(ValueError, match=r"empty for window 'lung'; run ./run.sh check-data DATA_DIR --window lung"):
        StepSampler(Empty())


def _reference_sample(ds, index, draw):
    """A crop as the dataset made it before its crop tables, int32 unravel and preallocated
    collate: RandSparseCrop on the raw counts, np.divmod coordinates, offset added afterwards."""
    from transforms import RandSparseCrop
    from transforms.geometry import in_memory_order, memory_order
    from transforms.sparse import _spatial, _t, support_mask

    c = ds.cases[index]
    counts = ds._block_counts(c)
    shape = [s * ds.block for s in counts.shape]
    crop = RandSparseCrop(ds.max_points, block=ds.block)
    crop.set_random_state(seed=int(np.random.SeedSequence([ds.seed, draw, index]).generate_state(1)[0]))
    crop.randomize(torch.from_numpy(counts.astype(np.int64)), shape)
    box = np.array([*crop.box[0], *crop.box[1]], dtype=np.int64)
    win, mask = ds.load_region(index, box)
    x = _spatial(_t(win))
    perm = memory_order(x)
    sm = in_memory_order(support_mask(x, mask), perm).contiguous()
    flat = np.flatnonzero(sm.reshape(-1).numpy())
    coords = np.empty((flat.size, 3), dtype=np.int32)
    q, coords[:, perm[2]] = np.divmod(flat.astype(np.int32), sm.shape[2])
    coords[:, perm[0]], coords[:, perm[1]] = np.divmod(q, sm.shape[1])
    coords = torch.from_numpy(coords) + torch.as_tensor(box[:3], dtype=torch.int32)
    feats = in_memory_order(x, perm).reshape(-1)[torch.from_numpy(flat)].float().reshape(-1, 1)
    return {"coords": coords, "feats": feats, "box": torch.as_tensor(box)}


@pytest.fixture(scope="module")
def real_compact(ct_data_dir, tmp_path_factory):
    """The shared example scan preprocessed at 64^3 (compact layout, lung window)."""
    from pipeline.preprocess import run as preprocess

    tmp = tmp_path_factory.mktemp("real")
    raw = tmp / "raw" / "abdomen"
    raw.mkdir(parents=True)
    (raw / "example_ct_sm.nii.gz").symlink_to(ct_data_dir / "abdomen_nifti" / "example_ct_sm.nii.gz")
    res = preprocess(raw.parent, tmp / "out", num_workers=0, resolution=64, windows=["lung"], progress=False,
                     log=lambda *a, **k: None, layout="compact")
    assert res["ok"] == 1
    return tmp / "out"


def test_real_crops_and_collate_match_the_reference(real_compact):
    """On a real scan (compact layout): crops, their boxes and the collated batch are exactly what
    the straightforward computation gives, for many draws (cached crop tables reused)."""
    ds = CTWindowSparseDataset(real_compact, "lung", split="all", max_points=6000, random_crop=True,
                               cache="memory")
    assert len(ds) == 1 and ds.cases[0]["num_points"] > 6000
    samples, refs = [], []
    for draw in range(6):
        s, r = ds[(0, draw)], _reference_sample(ds, 0, draw)
        for k in ("coords", "feats", "box"):
            assert s[k].dtype == r[k].dtype and torch.equal(s[k], r[k]), (draw, k)
        samples.append(s)
        refs.append(r)
    assert len({tuple(s["box"].tolist()) for s in samples}) > 1
    batch = sparse_collate(samples[:3])
    expect = torch.cat([torch.cat([torch.full((len(r["coords"]), 1), b, dtype=torch.int32), r["coords"]], 1)
                        for b, r in enumerate(refs[:3])])
    assert batch["indices"].dtype == torch.int16 and torch.equal(batch["indices"].int(), expect)
    assert to_sparse_tensor(batch).indices.dtype == torch.int32
    assert torch.equal(batch["features"], torch.cat([r["feats"] for r in refs[:3]]))
    assert batch["num_points"] == [len(r["coords"]) for r in refs[:3]]
    assert torch.equal(batch["box"], torch.stack([r["box"] for r in refs[:3]]))


def test_grid_crops_give_the_sparse_batch(real_compact):
    """``grid_crops`` on a real scan: the same 8-aligned crops as the sparse samples, collated into one
    grid padded to the larger box (also in a DataLoader worker, in shared memory); ``to_sparse_tensor``
    of it (and of its ``batch_split`` parts) is exactly the sparse batch's, and ``to_grid_batch`` is
    ``grid_from_sparse`` of the sparse batch, for the model factor the crops are aligned to and a larger one."""
    from networks.grid import grid_from_sparse

    kw = dict(split="all", max_points=6000, random_crop=True, cache="memory")
    sparse = CTWindowSparseDataset(real_compact, "lung", **kw)
    grid = CTWindowSparseDataset(real_compact, "lung", grid_crops=True, **kw)
    extent = {d: tuple((sparse.crop_box(0, d)[3:] - sparse.crop_box(0, d)[:3]).tolist()) for d in range(6)}
    draws = [(0, 0), (0, next(d for d in range(6) if extent[d] != extent[0]))]
    sb, gb = sparse_collate([sparse[d] for d in draws]), sparse_collate([grid[d] for d in draws])
    assert "indices" not in gb and gb["values"].dtype == torch.float32 and gb["active"].dtype == torch.bool
    assert (gb["box"] % 8 == 0).all()
    assert gb["memory_order"] == [[2, 1, 0]] * 2  # compact windows are F-ordered: points listed i fastest
    assert gb["values"].permute(0, 3, 2, 1, 4).is_contiguous()  # and so is the batch (copied without a transpose)
    assert gb["values"].shape == (2, *map(max, zip(*(extent[d] for _, d in draws))), 1)
    for k in ("box", "num_points", "case_id", "window", "spatial_shape", "batch_size"):
        assert (torch.equal(gb[k], sb[k]) if k == "box" else gb[k] == sb[k]), k
    loader = torch.utils.data.DataLoader(grid, batch_size=2, sampler=draws, collate_fn=sparse_collate, num_workers=1)
    wb = next(iter(loader))
    assert torch.equal(wb["values"], gb["values"]) and torch.equal(wb["active"], gb["active"])
    for g, s in [(gb, sb), *zip(batch_split(gb, 2), batch_split(sb, 2))]:
        xg, xs = to_sparse_tensor(g), to_sparse_tensor(s)
        assert torch.equal(xg.indices, xs.indices) and torch.equal(xg.features, xs.features)
        assert (xg.batch_size, xg.spatial_shape) == (xs.batch_size, xs.spatial_shape)
        for factor in (8, 16):
            want = grid_from_sparse(xs, s["box"], factor)
            for got in (to_grid_batch(g, "cpu", factor), to_grid_batch(s, "cpu", factor)):
                assert torch.equal(got.values, want.values) and torch.equal(got.active, want.active)
                assert torch.equal(got.origin, want.origin) and got.spatial_shape == want.spatial_shape

"""load_pretrained: our checkpoints and the Direct3D-S2 VAE layout (torchsparse kernels)."""

import pytest
import torch

import networks
from networks import backend
from networks.blocks import SparseConv3d
from networks.ops import sparse_lookup
from networks.pretrained import load_pretrained, spconv_weight_to_torchsparse, torchsparse_kernel_to_spconv


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def torchsparse_offsets():
    """torchsparse's order for an odd 3^3 kernel: first coordinate fastest."""
    r = (-1, 0, 1)
    return [(x, y, z) for z in r for y in r for x in r]


def reference_torchsparse_conv(x, kernel, bias):
    """out[p] = sum_k in[p + offset_k] @ kernel[k] + bias, offsets in torchsparse order."""
    out = bias.expand(x.indices.shape[0], -1).clone()
    for k, off in enumerate(torchsparse_offsets()):
        q = x.indices.clone()
        q[:, 1:] += torch.tensor(off, dtype=torch.int32)
        out = out + sparse_lookup(x, q) @ kernel[k]
    return out


def random_sparse(shape=(9, 9, 9), channels=3, p=0.35, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = (torch.rand((2, *shape), generator=g) < p).nonzero().int()
    return backend.make_sparse(torch.randn(idx.shape[0], channels, generator=g), idx, shape, 2)


def test_kernel_layout_matches_torchsparse_order():
    torch.manual_seed(0)
    x = random_sparse()
    kernel, bias = torch.randn(27, 3, 5), torch.randn(5)
    conv = SparseConv3d(3, 5)
    with torch.no_grad():
        conv.conv.weight.copy_(torchsparse_kernel_to_spconv(kernel))
        conv.conv.bias.copy_(bias)
    torch.testing.assert_close(conv(x).features, reference_torchsparse_conv(x, kernel, bias), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(spconv_weight_to_torchsparse(conv.conv.weight), kernel)
    # an asymmetric kernel: a wrong offset order would not pass
    with torch.no_grad():
        conv.conv.weight.copy_(torchsparse_kernel_to_spconv(kernel.flip(0)))
    assert not torch.allclose(conv(x).features, reference_torchsparse_conv(x, kernel, bias), atol=1e-3)


def small(latent=16, **kw):
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(resolution=4, model_channels=32, latent_channels=latent, num_embeddings=32, channels=(8, 8, 16, 32), num_blocks=2,
                num_heads=2, window_size=2, layout="direct3d")
    args.update(kw)
    return networks.SparseVQVAE(**args)


def to_direct3d_s2(model, latent):
    """Write ``model``'s weights in the Direct3D-S2 / torchsparse layout (the inverse mapping)."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("vq.") or "child_embedding" in k:
            continue
        name = k.replace("Encoder.", "encoder.", 1).replace("Decoder.", "decoder.", 1)
        if name.endswith(".conv.weight"):
            name, v = name[: -len(".weight")] + ".kernel", spconv_weight_to_torchsparse(v)
        elif ".skip_connection." in name:
            name = name.replace(".skip_connection.", ".skip_connection.conv.")
            if name.endswith(".weight"):
                name, v = name[: -len(".weight")] + ".kernel", v.t().contiguous()
        if name == "encoder.out_layer.weight":
            v = torch.cat([v, torch.randn_like(v)])  # mean, logvar
        if name == "encoder.out_layer.bias":
            v = torch.cat([v, torch.randn_like(v)])
        sd[name] = v.clone()
    return sd


def test_direct3d_s2_checkpoint_roundtrip(tmp_path):
    src = small(16)
    with torch.no_grad():  # non-zero biases everywhere
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "sparse_vae_512.pt"
    torch.save({"vae": to_direct3d_s2(src, 16)}, path)
    assert any(k.endswith("conv.kernel") and v.shape[0] == 27 for k, v in torch.load(path)["vae"].items())
    dst = small(16, seed=1)
    report = load_pretrained(dst, path)
    assert report["format"] == "direct3d_s2"
    assert report["skipped"] == [] and report["reinitialized"] == []
    assert all(k.startswith("vq.") for k in report["missing"]), report["missing"]
    assert report["zero_init"] and all(k.endswith("child_embedding") for k in report["zero_init"])
    for k, v in src.state_dict().items():
        if not k.startswith("vq.") and "child_embedding" not in k:
            torch.testing.assert_close(dst.state_dict()[k], v, msg=k)


def test_direct3d_s2_latent_mismatch_reinitialises(tmp_path, caplog):
    src = small(16)
    dst = small(32, seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with caplog.at_level("WARNING"):
        report = load_pretrained(dst, {"vae": to_direct3d_s2(src, 16)})
    assert set(report["reinitialized"]) == {
        "Encoder.out_layer.weight",
        "Encoder.out_layer.bias",
        "Decoder.input_layer.weight",
        "Decoder.input_layer.bias",
    }
    assert "newly initialised" in caplog.text
    torch.testing.assert_close(dst.state_dict()["Encoder.out_layer.weight"], before["Encoder.out_layer.weight"])
    torch.testing.assert_close(dst.state_dict()["Encoder.blocks.0.attn.to_qkv.weight"], src.state_dict()["Encoder.blocks.0.attn.to_qkv.weight"])


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "ddp"])
def test_our_checkpoints(tmp_path, wrap):
    src = small(8)
    sd = src.state_dict()
    if wrap == "ddp":
        obj = {"module." + k: v for k, v in sd.items()}
    elif wrap == "plain":
        obj = sd
    else:
        obj = {wrap: sd, "step": 3}
    path = tmp_path / "vqvae_step0000003.pt"
    torch.save(obj, path)
    dst = small(8, seed=2)
    report = load_pretrained(dst, path, strict=True)
    assert report["format"] == "ctvq" and report["missing"] == [] and report["loaded"] == len(sd)
    for k, v in sd.items():
        torch.testing.assert_close(dst.state_dict()[k], v)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_vae_path"):
        load_pretrained(small(8), tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_pretrained(small(8), small(16).state_dict(), strict=True)


def test_direct3d_s2_weights_refused_by_the_patch_layout(tmp_path):
    """Direct3D-S2 weights fit only its layout: the default layout stops with the setting to change."""
    src = small()
    path = tmp_path / "sparse_vae_512.pt"
    torch.save({"vae": to_direct3d_s2(src, 16)}, path)
    patch = networks.SparseVQVAE(resolution=4, model_channels=32, latent_channels=16, num_embeddings=32, channels=(8, 16, 32),
                                 num_blocks=2, num_heads=2, window_size=2)
    with pytest.raises(ValueError, match=r'sparse_vae_512\.pt holds Direct3D-S2 weights.*network_def#layout to "direct3d"'):
        load_pretrained(patch, path)

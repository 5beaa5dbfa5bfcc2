"""Small helpers shared by the test files (imported as ``from helpers import ...``)."""
import socket

import torch

#: A tiny SparseVQVAE network_def (4^3 latent grid) for fast CPU tests.
TINY = {
    "_target_": "networks.SparseVQVAE",
    "resolution": 4,
    "model_channels": 32,
    "latent_channels": 8,
    "num_embeddings": 64,
    "channels": [8, 16, 32],
    "num_blocks": 1,
    "num_heads": 2,
    "window_size": 4,
}


def tiny_net(seed=0, **over):
    """The TINY network seeded with ``seed`` (``over`` overrides its arguments), with a non-zero output layer."""
    from networks import SparseVQVAE

    torch.manual_seed(seed)
    kw = {k: v for k, v in TINY.items() if k != "_target_"}
    kw.update(over)
    net = SparseVQVAE(**kw)
    with torch.no_grad():  # give the output layer something to decode: a visibly non-constant volume
        last = net.Decoder.upsample[-1].up if net.layout == "patch" else net.Decoder.out_layer
        torch.nn.init.normal_(last.weight, std=0.5)
        last.bias.fill_(0.5)
    return net


def free_port() -> int:
    """A local port no process listens on now, for a process group's rendezvous (a fixed one may be
    held by another test run on the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

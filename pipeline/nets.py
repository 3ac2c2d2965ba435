"""COLT's networks as flat block lists, and loaders for COLT's released weights.

Block indices are COLT's: block 0 is the normalisation, and a latent layer ``l`` is the output of
block ``l`` (e.g. 2 and 4 are the ReLU outputs after conv1 and conv2 of ConvMed).

    net = build_net("convmed_2_2_100", input_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,))
    load_colt_state_dict(net, "mnist_0.1_convmed_flat_2_2_100.pt")

Names: ``fc_<h1>_<h2>...``, ``convmed_<w1>_<w2>_<lin>`` and ``convmedbig_<w1>_<w2>_<w3>_<lin>``
(COLT's ``_flat`` token is accepted and ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.layers import Conv2d, Flatten, Linear, Normalize, ReLU


class NetError(ValueError):
    """A network name, file or shape that cannot be used."""


@dataclass
class Propagation:
    """An abstract element pushed through blocks, with what was used at each ReLU."""

    element: Any
    pre_bounds: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    relaxations: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


class Net(nn.Module):
    """A feed-forward ReLU network as a flat list of blocks (COLT's ``net.blocks``)."""

    def __init__(self, blocks: list[nn.Module], input_shape: tuple[int, ...],
                 name: str = "custom") -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.input_shape = tuple(input_shape)
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)

    def __len__(self) -> int:
        return len(self.blocks)

    def forward_until(self, layer: int, x: Tensor) -> Tensor:
        """Output of block ``layer`` (-1: the input itself)."""
        for block in self.blocks[: layer + 1]:
            x = block(x)
        return x

    def forward_from(self, layer: int, z: Tensor) -> Tensor:
        """Run blocks ``layer+1 ..`` on the output ``z`` of block ``layer``."""
        for block in self.blocks[layer + 1:]:
            z = block(z)
        return z

    @property
    def relu_indices(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if getattr(b, "is_relu", False)]

    def shapes(self) -> list[tuple[int, ...]]:
        """Output shape (without batch) of every block."""
        out, x = [], torch.zeros(1, *self.input_shape,
                                 device=next(iter(self.buffers()), torch.zeros(0)).device)
        with torch.no_grad():
            for block in self.blocks:
                x = block(x)
                out.append(tuple(x.shape[1:]))
        return out

    def propagate(self, element: Any, start: int = -1, end: int | None = None,
                  slopes: dict[int, Tensor] | None = None,
                  bounds: dict[int, tuple[Tensor, Tensor]] | None = None,
                  **relu_kwargs: Any) -> Propagation:
        """Push ``element`` (the output of block ``start``) through blocks start+1 .. end.

        ``slopes`` and ``bounds`` are keyed by the ReLU block index; ``relu_kwargs`` go to the
        domain's relu (e.g. the random generator of the Cauchy estimate).
        """
        end = len(self.blocks) - 1 if end is None else end
        result = Propagation(element)
        for i in range(start + 1, end + 1):
            block = self.blocks[i]
            if block.is_relu:
                element, pre, relax = element.relu((slopes or {}).get(i), (bounds or {}).get(i),
                                                   **relu_kwargs)
                result.pre_bounds[i] = pre
                result.relaxations[i] = relax
            else:
                element, _, _ = block.abstract(element)
        result.element = element
        return result


def _parse(name: str) -> tuple[str, list[int]]:
    parts = [p for p in name.lower().split("_") if p != "flat"]
    kind, numbers = parts[0], parts[1:]
    try:
        widths = [int(p) for p in numbers]
    except ValueError:
        raise NetError(f"network {name!r}: expected fc_<h>..., convmed_<w1>_<w2>_<lin> or "
                       "convmedbig_<w1>_<w2>_<w3>_<lin>") from None
    expected = {"fc": None, "convmed": 3, "convmedbig": 4}
    if kind not in expected or (expected[kind] and len(widths) != expected[kind]) or not widths:
        raise NetError(f"network {name!r}: expected fc_<h>..., convmed_<w1>_<w2>_<lin> or "
                       "convmedbig_<w1>_<w2>_<w3>_<lin>")
    return kind, widths


def build_net(name: str, input_shape: tuple[int, int, int], mean: tuple[float, ...],
              std: tuple[float, ...], num_classes: int = 10) -> Net:
    """COLT's architectures (reference §2), block by block."""
    kind, w = _parse(name)
    c, h, width = input_shape
    blocks: list[nn.Module] = [Normalize(mean, std)]
    if kind == "fc":
        blocks.append(Flatten())
        n = c * h * width
        for hidden in w:
            blocks += [Linear(n, hidden), ReLU()]
            n = hidden
        blocks.append(Linear(n, num_classes))
    elif kind == "convmed":
        w1, w2, lin = w
        blocks += [Conv2d(c, 16 * w1, 5, stride=2, padding=2), ReLU(),
                   Conv2d(16 * w1, 32 * w2, 4, stride=2, padding=1), ReLU(), Flatten(),
                   Linear(32 * w2 * (h // 4) * (width // 4), lin), ReLU(), Linear(lin, num_classes)]
    else:
        w1, w2, w3, lin = w
        blocks += [Conv2d(c, 16 * w1, 3, stride=1, padding=1), ReLU(),
                   Conv2d(16 * w1, 16 * w2, 4, stride=2, padding=1), ReLU(),
                   Conv2d(16 * w2, 32 * w3, 4, stride=2, padding=1), ReLU(), Flatten(),
                   Linear(32 * w3 * (h // 4) * (width // 4), lin), ReLU(), Linear(lin, num_classes)]
    return Net(blocks, input_shape, name)


def num_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def load_colt_state_dict(net: Net, path: str | Path) -> Net:
    """Load COLT's released state dict (legacy torch format, keys ``blocks.layers.{i}.{conv|linear}.*``).

    ``deepz_lambda`` entries (all 1.0, used only by COLT's certifier) are dropped.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NetError(f"{path}: no such file") from None
    except Exception as err:  # truncated, corrupt or not a torch file
        raise NetError(f"{path}: not a loadable PyTorch state dict ({type(err).__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else ''})") from None
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[-1] == "deepz_lambda":
            continue
        if len(parts) != 5 or parts[:2] != ["blocks", "layers"]:
            raise NetError(f"{path}: unexpected key {key!r} (not a COLT state dict)")
        mapped[f"blocks.{parts[2]}.{parts[4]}"] = value
    # Check keys and shapes before loading anything, so a failed load leaves the net untouched.
    own = {k: v for k, v in net.state_dict().items() if not k.endswith((".mean", ".std"))}
    missing, unexpected = sorted(set(own) - set(mapped)), sorted(set(mapped) - set(own))
    wrong = [k for k in own if k in mapped and tuple(mapped[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise NetError(f"{path}: does not fit {net.name}: missing {missing}, unexpected "
                       f"{unexpected}, wrong shapes {wrong}")
    net.load_state_dict(mapped, strict=False)
    return net

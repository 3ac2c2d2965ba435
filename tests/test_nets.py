"""Tests of pipeline.nets: COLT's architectures (reference §2), the released MNIST-0.1 weights,
loader errors, and the prefix/suffix forward passes used by the latent attack."""

from __future__ import annotations

import gzip
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.layers import Conv2d, Flatten, Linear, Normalize, ReLU
from pipeline.nets import Net, NetError, build_net, load_colt_state_dict, num_parameters

COLT_PT = Path("/work/shared/benchmarks/colt/mnist_0.1_convmed_flat_2_2_100.pt")
MNIST_DIR = Path("/work/shared/benchmarks/mnist")
MNIST = ((0.1307,), (0.3081,))
CIFAR = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster

needs_colt = pytest.mark.skipif(not COLT_PT.exists(), reason="COLT's released weights not present")
needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="MNIST test files not present")


def _build(name: str, shape: tuple[int, int, int], seed: int = 0) -> Net:
    norm = MNIST if shape[0] == 1 else CIFAR
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_net(name, shape, *norm)


# ---------------------------------------------------------------------------------------------
# Architectures


@pytest.mark.parametrize("name,shape,count", [
    ("convmed_2_2_100", (1, 28, 28), 348_374),
    ("convmed_flat_2_2_100", (1, 28, 28), 348_374),
    ("convmedbig_2_2_4_250", (3, 32, 32), 2_133_736),
    ("convmedbig_flat_2_2_4_250", (3, 32, 32), 2_133_736),
    ("convmed_2_4_250", (3, 32, 32), 2_118_856),
    ("convmed_2_4_250", (1, 28, 28), 1_637_256),
])
def test_parameter_counts(name, shape, count) -> None:
    net = _build(name, shape)
    assert num_parameters(net) == count
    # Normalisation constants are buffers, not parameters.
    assert all(not isinstance(m, Normalize) or not list(m.parameters()) for m in net.blocks)


def test_parameter_counts_per_layer_reference_table() -> None:
    net = _build("convmedbig_2_2_4_250", (3, 32, 32))
    per_layer = [sum(p.numel() for p in b.parameters()) for b in net.blocks]
    assert [n for n in per_layer if n] == [896, 16_416, 65_664, 2_048_250, 2_510]
    net = _build("convmed_2_4_250", (3, 32, 32))
    per_layer = [sum(p.numel() for p in b.parameters()) for b in net.blocks]
    assert [n for n in per_layer if n] == [2_432, 65_664, 2_048_250, 2_510]
    net = _build("convmed_2_2_100", (1, 28, 28))
    per_layer = [sum(p.numel() for p in b.parameters()) for b in net.blocks]
    assert [n for n in per_layer if n] == [832, 32_832, 313_700, 1_010]


def _conv_spec(block):
    return (block.in_channels, block.out_channels, block.kernel_size[0], block.stride[0],
            block.padding[0])


def test_convmed_blocks_match_reference() -> None:
    net = _build("convmed_2_2_100", (1, 28, 28))
    types = [type(b) for b in net.blocks]
    assert types == [Normalize, Conv2d, ReLU, Conv2d, ReLU, Flatten, Linear, ReLU, Linear]
    assert net.relu_indices == [2, 4, 7]
    assert _conv_spec(net.blocks[1]) == (1, 32, 5, 2, 2)
    assert _conv_spec(net.blocks[3]) == (32, 64, 4, 2, 1)
    assert (net.blocks[6].in_features, net.blocks[6].out_features) == (3136, 100)
    assert (net.blocks[8].in_features, net.blocks[8].out_features) == (100, 10)
    assert net.shapes() == [(1, 28, 28), (32, 14, 14), (32, 14, 14), (64, 7, 7), (64, 7, 7),
                            (3136,), (100,), (100,), (10,)]
    assert len(net) == 9 and net.input_shape == (1, 28, 28)
    # ReLU neuron counts of the reference table: 6272 / 3136 / 100.
    shapes = net.shapes()
    assert [int(np.prod(shapes[i])) for i in net.relu_indices] == [6272, 3136, 100]


def test_convmedbig_blocks_match_reference() -> None:
    net = _build("convmedbig_2_2_4_250", (3, 32, 32))
    types = [type(b) for b in net.blocks]
    assert types == [Normalize, Conv2d, ReLU, Conv2d, ReLU, Conv2d, ReLU, Flatten, Linear, ReLU,
                     Linear]
    assert net.relu_indices == [2, 4, 6, 9]
    assert _conv_spec(net.blocks[1]) == (3, 32, 3, 1, 1)
    assert _conv_spec(net.blocks[3]) == (32, 32, 4, 2, 1)
    assert _conv_spec(net.blocks[5]) == (32, 128, 4, 2, 1)
    assert (net.blocks[8].in_features, net.blocks[8].out_features) == (8192, 250)
    assert (net.blocks[10].in_features, net.blocks[10].out_features) == (250, 10)
    shapes = net.shapes()
    assert [int(np.prod(shapes[i])) for i in net.relu_indices] == [32768, 8192, 8192, 250]
    assert torch.allclose(net.blocks[0].mean.flatten(), torch.tensor(CIFAR[0]))
    assert torch.allclose(net.blocks[0].std.flatten(), torch.tensor(CIFAR[1]))


def test_convmed_cifar_shapes() -> None:
    net = _build("convmed_2_4_250", (3, 32, 32))
    assert net.relu_indices == [2, 4, 7]
    assert net.shapes()[1] == (32, 16, 16) and net.shapes()[3] == (128, 8, 8)
    assert net.shapes()[5] == (8192,)


def test_fc_blocks() -> None:
    net = _build("fc_10_20", (1, 4, 4))
    assert [type(b) for b in net.blocks] == [Normalize, Flatten, Linear, ReLU, Linear, ReLU,
                                             Linear]
    assert net.relu_indices == [3, 5]
    assert net.shapes()[-1] == (10,) and net.shapes()[2] == (10,)
    assert _build("fc_7", (1, 4, 4)).shapes() == [(1, 4, 4), (16,), (7,), (7,), (10,)]
    assert build_net("fc_5", (1, 2, 2), (0.5,), (0.5,), num_classes=3).shapes()[-1] == (3,)


@pytest.mark.parametrize("name", ["convmed_2_2", "convmed_1_1_1_1", "convmedbig_1_1_1", "foo_1",
                                  "fc", "fc_a", "convmed_x_1_1", "resnet_1_2_3", ""])
def test_bad_names_raise_net_error(name: str) -> None:
    with pytest.raises(NetError):
        build_net(name, (1, 28, 28), *MNIST)


def test_forward_until_and_from_compose_to_forward() -> None:
    for name, shape in [("convmedbig_1_1_1_8", (3, 8, 8)), ("convmed_1_1_8", (1, 8, 8)),
                        ("fc_10_10", (1, 4, 4))]:
        net = _build(name, shape, seed=1).eval()
        x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            y = net(x)
            assert torch.equal(net.forward_until(-1, x), x)
            assert torch.equal(net.forward_from(len(net) - 1, y), y)
            for layer in range(-1, len(net)):
                z = net.forward_until(layer, x)
                expected_shape = shape if layer < 0 else net.shapes()[layer]
                assert z.shape == (3, *expected_shape)
                assert torch.allclose(net.forward_from(layer, z), y, atol=1e-6)
                # Prefix twice split: until(a) then blocks a+1..b equals until(b).
                if layer + 2 < len(net):
                    mid = z
                    for block in net.blocks[layer + 1: layer + 3]:
                        mid = block(mid)
                    assert torch.allclose(mid, net.forward_until(layer + 2, x), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# COLT's released weights


def _mnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    with gzip.open(MNIST_DIR / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(MNIST_DIR / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    assert int.from_bytes(raw[4:8], "big") == 10_000 == len(labels) == len(images)
    return (torch.from_numpy(images.astype(np.float32) / 255.0),
            torch.from_numpy(labels.astype(np.int64)))


@needs_colt
def test_released_state_dict_loads_and_matches_file() -> None:
    net = _build("convmed_flat_2_2_100", (1, 28, 28), seed=5)
    assert load_colt_state_dict(net, COLT_PT) is net
    raw = torch.load(COLT_PT, map_location="cpu", weights_only=True)
    assert isinstance(raw, OrderedDict)
    assert sum(k.endswith("deepz_lambda") for k in raw) == 3
    for key, value in raw.items():
        parts = key.split(".")
        if parts[-1] == "deepz_lambda":
            assert torch.all(value == 1.0)
            continue
        block = net.blocks[int(parts[2])]
        assert torch.equal(getattr(block, parts[4]).detach(), value)
    # Normalisation is left as built (not in the file).
    assert torch.allclose(net.blocks[0].mean.flatten(), torch.tensor(MNIST[0]))


@needs_colt
@needs_mnist
def test_released_net_accuracy_on_mnist_test_set() -> None:
    net = load_colt_state_dict(_build("convmed_2_2_100", (1, 28, 28)), COLT_PT).eval()
    x, y = _mnist_test()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), 2500):
            correct += int((net(x[start:start + 2500]).argmax(1) == y[start:start + 2500]).sum())
    assert correct == 9916


@needs_colt
def test_truncated_file_raises_net_error(tmp_path: Path) -> None:
    data = COLT_PT.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        bad = tmp_path / f"truncated_{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(NetError):
            load_colt_state_dict(_build("convmed_2_2_100", (1, 28, 28)), bad)


def test_garbage_and_missing_files_raise_net_error(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(NetError):
        load_colt_state_dict(_build("convmed_2_2_100", (1, 28, 28)), bad)
    with pytest.raises(NetError):
        load_colt_state_dict(_build("convmed_2_2_100", (1, 28, 28)), tmp_path / "missing.pt")


def test_non_colt_keys_raise_net_error(tmp_path: Path) -> None:
    net = _build("convmed_1_1_8", (1, 8, 8))
    path = tmp_path / "plain.pt"
    torch.save(net.state_dict(), path)  # our own key names, not COLT's
    with pytest.raises(NetError):
        load_colt_state_dict(_build("convmed_1_1_8", (1, 8, 8)), path)


def test_colt_keys_round_trip(tmp_path: Path) -> None:
    """A state dict written in COLT's key layout (conv/linear, deepz_lambda) loads back exactly."""
    src = _build("convmedbig_1_1_1_8", (3, 8, 8), seed=3)
    state = OrderedDict()
    for i, block in enumerate(src.blocks):
        kind = ("conv" if isinstance(block, Conv2d)
                else "linear" if isinstance(block, Linear) else None)
        if kind:
            state[f"blocks.layers.{i}.{kind}.weight"] = block.weight.detach().clone()
            state[f"blocks.layers.{i}.{kind}.bias"] = block.bias.detach().clone()
        elif isinstance(block, ReLU):
            state[f"blocks.layers.{i}.deepz_lambda"] = torch.ones(src.shapes()[i])
    path = tmp_path / "colt.pt"
    torch.save(state, path)
    dst = load_colt_state_dict(_build("convmedbig_1_1_1_8", (3, 8, 8), seed=4), path)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


@needs_colt
@pytest.mark.parametrize("name,shape", [
    ("fc_100", (1, 28, 28)),  # other key set
    ("convmedbig_2_2_4_250", (1, 28, 28)),  # other key set (extra conv)
    ("convmed_2_4_250", (1, 28, 28)),  # same keys, other widths
    ("convmed_2_2_100", (3, 32, 32)),  # same keys, other input channels / size
    ("convmed_2_2_50", (1, 28, 28)),  # same keys, other FC width
])
def test_wrong_architecture_raises_net_error(name, shape) -> None:
    with pytest.raises(NetError):
        load_colt_state_dict(_build(name, shape), COLT_PT)


def test_failed_load_leaves_net_unchanged(tmp_path: Path) -> None:
    src = _build("convmed_1_1_8", (1, 8, 8), seed=6)
    state = OrderedDict()
    for i in (1, 3):  # the conv layers only: the FC layers are missing
        state[f"blocks.layers.{i}.conv.weight"] = torch.zeros_like(src.blocks[i].weight)
        state[f"blocks.layers.{i}.conv.bias"] = torch.zeros_like(src.blocks[i].bias)
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    net = _build("convmed_1_1_8", (1, 8, 8), seed=7)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(NetError):
        load_colt_state_dict(net, path)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())

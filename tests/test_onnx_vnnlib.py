"""ONNX -> Net (pipeline.certify.onnx_import) and VNN-LIB -> VnnlibProperty
(pipeline.certify.vnnlib)."""

from __future__ import annotations

import gzip
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline.certify.onnx_import import ModelFormatError, load_onnx
from pipeline.certify.vnnlib import Disjunct, PropertyFormatError, VnnlibProperty, load_vnnlib
from pipeline.layers import Conv2d, Flatten, Linear, Normalize, ReLU
from pipeline.nets import Net, build_net, load_colt_state_dict

BENCH = Path("/work/shared/benchmarks")
COLT_ONNX = BENCH / "colt" / "mnist_0.1.onnx"
COLT_PT = BENCH / "colt" / "mnist_0.1_convmed_flat_2_2_100.pt"
MNIST_CSV = BENCH / "eran" / "mnist_test.csv"
CIFAR_CSV = BENCH / "eran" / "cifar10_test.csv"
VNNLIB_DIR = BENCH / "vnncomp2022_cifar2020" / "vnnlib"
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465]).reshape(3, 1, 1)
CIFAR_STD = np.array([0.2023, 0.1994, 0.2010]).reshape(3, 1, 1)

needs = pytest.mark.skipif(not COLT_ONNX.exists(), reason="shared benchmarks not available")


def block_types(net: Net) -> list[type]:
    return [type(b) for b in net.blocks]


# ------------------------------------------------------------------------------------------
# ONNX: COLT's released network
# ------------------------------------------------------------------------------------------


@needs
def test_colt_mnist_onnx_matches_state_dict_and_classifies():
    net = load_onnx(COLT_ONNX, mean=(0.1307,), std=(0.3081,))
    assert block_types(net) == [Normalize, Conv2d, ReLU, Conv2d, ReLU, Flatten, Linear, ReLU,
                                Linear]
    assert net.input_shape == (1, 28, 28)
    assert net.name == "mnist_0.1"
    ref = build_net("convmed_2_2_100", (1, 28, 28), (0.1307,), (0.3081,))
    load_colt_state_dict(ref, COLT_PT)
    data = np.loadtxt(MNIST_CSV, delimiter=",", dtype=np.int64)
    labels = data[:, 0]
    x = torch.tensor(data[:, 1:] / 255.0, dtype=torch.float32).view(-1, 1, 28, 28)
    with torch.no_grad():
        out, expected = net(x), ref(x)
    assert torch.allclose(out, expected, atol=1e-5)
    assert len(x) == 100
    assert int((out.argmax(1).numpy() == labels).sum()) == 100


@needs
def test_colt_onnx_without_mean_std_has_identity_normalize():
    net = load_onnx(COLT_ONNX)
    assert isinstance(net.blocks[0], Normalize)
    assert float(net.blocks[0].mean.flatten()[0]) == 0.0
    assert float(net.blocks[0].std.flatten()[0]) == 1.0
    assert len(net) == 9


# ------------------------------------------------------------------------------------------
# ONNX: round trips through torch.onnx.export
# ------------------------------------------------------------------------------------------


def export(model: torch.nn.Module, shape: tuple[int, ...], path: Path, **kwargs) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.zeros(1, *shape), str(path), dynamo=False,
                          input_names=["x"], output_names=["y"], **kwargs)
    return path


def random_fc(shape, normalize: bool) -> Net:
    torch.manual_seed(0)
    c = shape[0]
    net = build_net("fc_20_12", shape, tuple(np.linspace(0.2, 0.5, c)),
                    tuple(np.linspace(0.2, 0.3, c)))
    return net if normalize else Net(list(net.blocks)[1:], shape, "fc")


def random_convmed(shape, normalize: bool) -> Net:
    torch.manual_seed(1)
    c = shape[0]
    net = build_net("convmed_1_1_16", shape, tuple(np.linspace(0.3, 0.6, c)),
                    tuple(np.linspace(0.25, 0.2, c)))
    return net if normalize else Net(list(net.blocks)[1:], shape, "convmed")


EXPORTS = {
    "default": {},
    "opset9-legacy": dict(opset_version=9, keep_initializers_as_inputs=True,
                          do_constant_folding=False, dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}),
}


@pytest.mark.parametrize("export_kind", sorted(EXPORTS))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("maker,shape", [(random_fc, (1, 8, 8)), (random_fc, (3, 8, 8)),
                                         (random_convmed, (1, 8, 8)),
                                         (random_convmed, (3, 8, 8))])
def test_round_trip_torch_export(tmp_path, maker, shape, normalize, export_kind):
    net = maker(shape, normalize)
    path = export(net, shape, tmp_path / "net.onnx", **EXPORTS[export_kind])
    loaded = load_onnx(path)
    expected_types = block_types(net) if normalize else [Normalize, *block_types(net)]
    assert block_types(loaded) == expected_types
    assert loaded.input_shape == shape
    assert loaded.name == "net"
    if normalize:
        assert torch.allclose(loaded.blocks[0].mean.flatten(), net.blocks[0].mean.flatten())
        assert torch.allclose(loaded.blocks[0].std.flatten(), net.blocks[0].std.flatten())
    x = torch.rand(7, *shape)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)
    # The converted net runs through the rest of the pipeline's block machinery.
    assert loaded.shapes()[-1] == (10,)


def test_round_trip_with_mean_std_arguments(tmp_path):
    shape = (3, 8, 8)
    net = random_convmed(shape, normalize=True)
    bare = Net(list(net.blocks)[1:], shape, "bare")
    path = export(bare, shape, tmp_path / "bare.onnx")
    mean = tuple(float(v) for v in net.blocks[0].mean.flatten())
    std = tuple(float(v) for v in net.blocks[0].std.flatten())
    loaded = load_onnx(path, mean=mean, std=std)
    assert block_types(loaded) == block_types(net)
    x = torch.rand(5, *shape)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)
    # A single value is broadcast to all channels; the other one defaults to 0 / 1.
    scalar = load_onnx(path, std=(0.5,))
    assert scalar.blocks[0].std.flatten().tolist() == [0.5, 0.5, 0.5]
    assert scalar.blocks[0].mean.flatten().tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ModelFormatError, match="mean has 2 values"):
        load_onnx(path, mean=(0.1, 0.2))


def test_graph_normalisation_and_arguments_conflict(tmp_path):
    shape = (1, 8, 8)
    path = export(random_fc(shape, normalize=True), shape, tmp_path / "n.onnx")
    with pytest.raises(ModelFormatError, match="already normalises"):
        load_onnx(path, mean=(0.1,), std=(0.3,))


def test_torch_flatten_module_export(tmp_path):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, stride=1, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    path = export(model, (2, 6, 6), tmp_path / "seq.onnx")
    loaded = load_onnx(path)
    assert block_types(loaded) == [Normalize, Conv2d, ReLU, Flatten, Linear]
    x = torch.rand(3, 2, 6, 6)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


# ------------------------------------------------------------------------------------------
# ONNX: hand-built graphs
# ------------------------------------------------------------------------------------------


def const_node(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def save(nodes, inputs, outputs, initializers, path: Path, opset: int = 13) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(model, str(path))
    return path


def test_hand_built_matmul_add_with_constant_nodes_and_scalar_normalisation(tmp_path):
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(6, 5)).astype(np.float32)
    b1 = rng.normal(size=(5,)).astype(np.float32)
    w2 = rng.normal(size=(4, 5)).astype(np.float32)  # Gemm B, used with transB=0 -> (5, 4)^T
    c2 = rng.normal(size=(1, 4)).astype(np.float32)
    nodes = [
        const_node("m", np.array(0.25, np.float32)),
        const_node("s", np.array(0.5, np.float32)),
        helper.make_node("Sub", ["x", "m"], ["xs"]),
        helper.make_node("Div", ["xs", "s"], ["xn"]),
        const_node("w1", w1),
        helper.make_node("MatMul", ["xn", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Identity", ["h1"], ["h1i"]),
        helper.make_node("Relu", ["h1i"], ["h2"]),
        helper.make_node("Transpose", ["w2"], ["w2t"], perm=[1, 0]),
        helper.make_node("Gemm", ["h2", "w2t", "c2"], ["y"], alpha=2.0, beta=0.5),
    ]
    path = save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                [numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2"),
                 numpy_helper.from_array(c2, "c2")], tmp_path / "fc.onnx")
    net = load_onnx(path)
    assert net.input_shape == (6,)
    assert block_types(net) == [Normalize, Linear, ReLU, Linear]
    x = rng.uniform(size=(9, 6)).astype(np.float32)
    h = np.maximum(((x - 0.25) / 0.5) @ w1 + b1, 0)
    y = 2.0 * h @ w2.T + 0.5 * c2
    with torch.no_grad():
        out = net(torch.tensor(x)).numpy()
    np.testing.assert_allclose(out, y, atol=1e-4)
    assert net.blocks[0].mean.flatten().tolist() == [0.25] * 6


def _conv_graph(tmp_path, op_after_conv: str | None = None, conv_attrs: dict | None = None,
                extra_nodes=None, gemm_attrs: dict | None = None) -> Path:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(2, 1, 3, 3)).astype(np.float32)
    fc = rng.normal(size=(3, 2 * 4 * 4)).astype(np.float32)
    attrs = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    attrs.update(conv_attrs or {})
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv0", **attrs)]
    last = "c"
    if op_after_conv:
        nodes.append(helper.make_node(op_after_conv, [last], ["a"], name="the_bad_one"))
        last = "a"
    nodes += list(extra_nodes or [])
    if extra_nodes:
        last = extra_nodes[-1].output[0]
    nodes += [helper.make_node("Flatten", [last], ["f"], axis=1),
              helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1, **(gemm_attrs or {}))]
    return save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc")],
                tmp_path / "conv.onnx")


def test_hand_built_conv_without_bias(tmp_path):
    net = load_onnx(_conv_graph(tmp_path, "Relu"))
    assert block_types(net) == [Normalize, Conv2d, ReLU, Flatten, Linear]
    assert net(torch.rand(2, 1, 4, 4)).shape == (2, 3)


@pytest.mark.parametrize("op", ["MaxPool", "Sigmoid"])
def test_unsupported_operator(tmp_path, op):
    path = _conv_graph(tmp_path, op)
    with pytest.raises(ModelFormatError) as info:
        load_onnx(path)
    message = str(info.value)
    assert "\n" not in message
    assert op in message and "the_bad_one" in message and str(path) in message
    assert "supported:" in message


@pytest.mark.parametrize("kwargs,match", [
    (dict(conv_attrs=dict(pads=[1, 1, 0, 0])), "pads"),
    (dict(conv_attrs=dict(group=2)), "group"),
    (dict(conv_attrs=dict(dilations=[2, 2])), "dilations"),
    (dict(gemm_attrs=dict(transA=1)), "transA"),
])
def test_unsupported_attributes(tmp_path, kwargs, match):
    with pytest.raises(ModelFormatError, match=match) as info:
        load_onnx(_conv_graph(tmp_path, **kwargs))
    assert "\n" not in str(info.value)


def test_non_chain_graph(tmp_path):
    extra = [helper.make_node("Relu", ["c"], ["r1"]), helper.make_node("Relu", ["c"], ["r2"]),
             helper.make_node("Add", ["r1", "r2"], ["sum"])]
    with pytest.raises(ModelFormatError, match="non-chain") as info:
        load_onnx(_conv_graph(tmp_path, extra_nodes=extra))
    assert "\n" not in str(info.value)


def test_two_real_inputs(tmp_path):
    nodes = [helper.make_node("Add", ["x", "z"], ["y"])]
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3]) for n in ("x", "z")]
    path = save(nodes, info, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                [], tmp_path / "two.onnx")
    with pytest.raises(ModelFormatError, match="2 real inputs"):
        load_onnx(path)


@needs
def test_truncated_and_non_onnx_files(tmp_path):
    data = COLT_ONNX.read_bytes()
    truncated = tmp_path / "trunc.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError) as info:
        load_onnx(truncated)
    assert "trunc.onnx" in str(info.value) and "\n" not in str(info.value)
    text = tmp_path / "text.onnx"
    text.write_text("this is not an onnx model\n" * 5)
    with pytest.raises(ModelFormatError, match="text.onnx"):
        load_onnx(text)
    with pytest.raises(ModelFormatError, match="no such file"):
        load_onnx(tmp_path / "missing.onnx")


# ------------------------------------------------------------------------------------------
# VNN-LIB: the VNN-COMP cifar2020 specs
# ------------------------------------------------------------------------------------------

SPEC_NAME = re.compile(r"cifar10_spec_idx_(\d+)_eps_([\d.]+)(_n1)?\.vnnlib\.gz$")
SPECS = ["cifar10_spec_idx_0_eps_0.00784_n1.vnnlib.gz",
         "cifar10_spec_idx_10_eps_0.00784_n1.vnnlib.gz",
         "cifar10_spec_idx_11_eps_0.03137_n1.vnnlib.gz",
         "cifar10_spec_idx_13_eps_0.00784.vnnlib.gz",
         "cifar10_spec_idx_10_eps_0.00784.vnnlib.gz"]


@pytest.fixture(scope="module")
def cifar():
    return np.loadtxt(CIFAR_CSV, delimiter=",", dtype=np.int64)


@needs
@pytest.mark.parametrize("name", SPECS)
def test_cifar2020_specs(cifar, name):
    path = VNNLIB_DIR / name
    assert path.exists(), path
    idx, eps, normalized = SPEC_NAME.search(name).groups()
    idx, eps = int(idx), float(eps)
    prop = load_vnnlib(path, (3, 32, 32))
    assert isinstance(prop, VnnlibProperty)
    assert prop.lower.shape == prop.upper.shape == (3, 32, 32)
    assert np.all(prop.lower <= prop.upper)
    assert len(prop.disjuncts) == 9 and prop.n_outputs == 10
    assert all(isinstance(d, Disjunct) and d.A.shape == (1, 10) and d.b.shape == (1,)
               for d in prop.disjuncts)
    label = int(cifar[idx, 0])
    assert prop.is_robustness_of() == label
    x = cifar[idx, 1:].reshape(32, 32, 3).transpose(2, 0, 1) / 255.0  # HWC -> CHW
    lo, up = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
    if normalized:
        lo, up = (lo - CIFAR_MEAN) / CIFAR_STD, (up - CIFAR_MEAN) / CIFAR_STD
    np.testing.assert_allclose(prop.lower, lo, atol=1e-4)
    np.testing.assert_allclose(prop.upper, up, atol=1e-4)
    # y_j >= y_label is the violation: an output with the label on top satisfies no disjunct.
    y = np.zeros(10)
    y[label] = 1.0
    assert not prop.is_violated_by(y)
    y[(label + 1) % 10] = 2.0
    assert prop.is_violated_by(y)


@needs
def test_plain_and_gzipped_give_the_same(tmp_path):
    gz = VNNLIB_DIR / SPECS[0]
    plain = tmp_path / "spec.vnnlib"
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    a, b = load_vnnlib(gz, (3, 32, 32)), load_vnnlib(plain, (3, 32, 32))
    assert np.array_equal(a.lower, b.lower) and np.array_equal(a.upper, b.upper)
    assert [d.A.tolist() for d in a.disjuncts] == [d.A.tolist() for d in b.disjuncts]
    with pytest.raises(PropertyFormatError, match="3072 input variables"):
        load_vnnlib(plain, (1, 28, 28))


# ------------------------------------------------------------------------------------------
# VNN-LIB: small hand-written properties
# ------------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "p.vnnlib") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


HEADER = """; two inputs, three outputs
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)
(assert (>= X_0 -0.5))
(assert (<= X_0 0.5))
(assert (and (>= X_1 0) (<= X_1 1e-1)))
"""


def test_robustness_disjunction_and_is_robustness_of(tmp_path):
    prop = load_vnnlib(write(tmp_path, HEADER + "(assert (or (and (>= Y_0 Y_2)) "
                                                "(and (>= Y_1 Y_2))))"), (2,))
    assert prop.lower.tolist() == [-0.5, 0.0] and prop.upper.tolist() == [0.5, 0.1]
    assert len(prop.disjuncts) == 2
    assert prop.disjuncts[0].A.tolist() == [[-1.0, 0.0, 1.0]]
    assert prop.disjuncts[0].b.tolist() == [0.0]
    assert prop.is_robustness_of() == 2
    with pytest.raises(ValueError):
        prop.disjuncts[0].A[0, 0] = 5.0  # read-only


@pytest.mark.parametrize("formula,rows,robust", [
    ("(assert (<= Y_0 Y_1))", [([[1, -1, 0]], [0])], None),
    ("(assert (>= Y_2 3.5))", [([[0, 0, -1]], [-3.5])], None),
    ("(assert (and (>= Y_0 Y_1) (<= Y_2 -1)))", [([[-1, 1, 0], [0, 0, 1]], [0, -1])], None),
    ("(assert (>= Y_0 Y_1))\n(assert (>= Y_2 Y_1))", [([[-1, 1, 0], [0, 1, -1]], [0, 0])],
     None),
    ("(assert (or (>= Y_0 Y_1) (>= Y_2 Y_1)))", [([[-1, 1, 0]], [0]), ([[0, 1, -1]], [0])], 1),
    ("(assert (<= (+ Y_0 (* 2 Y_1)) (- 3)))", [([[1, 2, 0]], [-3])], None),
    ("(assert (or (and (>= Y_0 Y_1) (>= Y_0 Y_2)) (and (<= Y_2 0))))",
     [([[-1, 1, 0], [-1, 0, 1]], [0, 0]), ([[0, 0, 1]], [0])], None),
])
def test_simple_output_forms(tmp_path, formula, rows, robust):
    prop = load_vnnlib(write(tmp_path, HEADER + formula), (2,))
    assert [(d.A.tolist(), d.b.tolist()) for d in prop.disjuncts] == \
        [([[float(v) for v in r] for r in a], [float(v) for v in b]) for a, b in rows]
    assert prop.is_robustness_of() == robust


def test_input_index_order_is_chw(tmp_path):
    decls = "".join(f"(declare-const X_{i} Real)\n" for i in range(12))
    bounds = "".join(f"(assert (>= X_{i} {i}))\n(assert (<= X_{i} {i + 0.5}))\n"
                     for i in range(12))
    text = decls + "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n" + bounds + \
        "(assert (>= Y_1 Y_0))\n"
    prop = load_vnnlib(write(tmp_path, text), (3, 2, 2))
    assert prop.lower.shape == (3, 2, 2)
    assert prop.lower[1, 0, 1] == 5.0 and prop.upper[2, 1, 1] == 11.5
    assert prop.is_robustness_of() == 0


@pytest.mark.parametrize("text,match", [
    (HEADER + "(assert (or (and (>= Y_0 Y_2))\n", r"p\.vnnlib:\d+: unbalanced '\('"),
    (HEADER + "(assert (>= Y_0 Y_2)))\n", r"p\.vnnlib:10: unbalanced '\)'"),
    (HEADER + "(assert (>= Y_0 Y_7))\n", r":10: undeclared variable Y_7"),
    (HEADER + "(assert (<= X_5 1))\n(assert (>= Y_0 Y_1))", r":10: undeclared variable X_5"),
    (HEADER.replace("(assert (<= X_0 0.5))\n", "") + "(assert (>= Y_0 Y_1))",
     "missing upper bound for X_0"),
    (HEADER, "no assertion over the outputs"),
    (HEADER + "(assert (>= Y_0 (* Y_1 Y_2)))", "non-linear"),
    (HEADER + "(assert (or (>= X_0 0) (>= Y_0 Y_1)))", "inputs must be a box"),
    (HEADER + "(assert (xor (>= Y_0 Y_1) (>= Y_0 Y_2)))", "unsupported formula operator"),
    (HEADER + "(assert (>= Y_0 Y_1)) stray", "outside parentheses"),
    (HEADER + "(frobnicate)", "unsupported command"),
    (HEADER.replace("Y_2 Real", "Z_2 Real") + "(assert (>= Y_0 Y_1))", "only X_<i>"),
])
def test_malformed_vnnlib(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(PropertyFormatError, match=match) as info:
        load_vnnlib(path, (2,))
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_wrong_input_count_and_bad_gzip(tmp_path):
    path = write(tmp_path, HEADER + "(assert (>= Y_0 Y_1))")
    with pytest.raises(PropertyFormatError, match=r"needs X_0\.\.X_2"):
        load_vnnlib(path, (3,))
    bad = tmp_path / "bad.vnnlib.gz"
    bad.write_bytes(gzip.compress(HEADER.encode())[:20])
    with pytest.raises(PropertyFormatError, match="bad.vnnlib.gz"):
        load_vnnlib(bad, (2,))
    with pytest.raises(PropertyFormatError, match="no such file"):
        load_vnnlib(tmp_path / "missing.vnnlib", (2,))

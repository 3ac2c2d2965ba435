"""Soundness for the network as it runs (issue 13): float64 models, floating-point error bounds,
strict properties and ties, and VNN-COMP result files. Every model is built here by hand with
onnx.helper (or as a Net) so that each hole has its own small regression case."""

from __future__ import annotations

import copy
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline.certify import fp_error
from pipeline.certify.cascade import Certifier
from pipeline.certify.cli import certify_vnnlib, main
from pipeline.certify.milp import run_zonotope
from pipeline.certify.onnx_import import ModelFormatError, load_onnx
from pipeline.certify.spec import Spec
from pipeline.certify.vnnlib import load_vnnlib
from pipeline.config import CertifyConfig
from pipeline.domains.zonotope import input_box
from pipeline.evaluate import zonotope_certified
from pipeline.layers import Flatten, Linear, Normalize, ReLU
from pipeline.nets import Net


def quick_cfg(**kw) -> CertifyConfig:
    base = dict(pgd_restarts=4, pgd_steps=20, slope_iters=20, timeout_per_input_s=30.0,
                max_binary_per_layer=50, max_binary_total=50, milp_from_input=True)
    base.update(kw)
    return CertifyConfig(**base)


def gemm_model(path: Path, layers: list[tuple[np.ndarray, np.ndarray]],
               elem: int = TensorProto.FLOAT, relu_between: bool = True) -> Path:
    """A chain of Gemm (+ Relu) over a (N, n_in) input of element type ``elem``."""
    np_type = np.float64 if elem == TensorProto.DOUBLE else np.float32
    nodes, inits, cur = [], [], "x"
    for k, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(np.asarray(w, np_type), f"W{k}"),
                  numpy_helper.from_array(np.asarray(b, np_type), f"B{k}")]
        out = f"h{k}"
        nodes.append(helper.make_node("Gemm", [cur, f"W{k}", f"B{k}"], [out], transB=1))
        cur = out
        if relu_between and k < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"r{k}"]))
            cur = f"r{k}"
    n_in, n_out = np.shape(layers[0][0])[1], np.shape(layers[-1][0])[0]
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, [1, n_in])],
                              [helper.make_tensor_value_info("y", elem, [1, n_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return path


def vnnlib(path: Path, box: list[tuple[float, float]], n_out: int, assertion: str) -> Path:
    lines = [f"(declare-const X_{i} Real)" for i in range(len(box))]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_out)]
    for i, (lo, up) in enumerate(box):
        lines += [f"(assert (>= X_{i} {lo!r}))", f"(assert (<= X_{i} {up!r}))"]
    lines.append(f"(assert {assertion})")
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------
# 1. A DOUBLE model is certified in float64, never rounded to float32
# ------------------------------------------------------------------------------------------


def test_double_model_keeps_float64_and_its_violation_is_found(tmp_path):
    # y0 = (1 + 2^-40) x, y1 = x: in float64 y0 > y1 for x > 0; rounded to float32 the two
    # weights are equal and the strict property below could never be violated.
    w = np.array([[1.0 + 2.0 ** -40], [1.0]])
    path = gemm_model(tmp_path / "double.onnx", [(w, np.zeros(2))], TensorProto.DOUBLE)
    net = load_onnx(path)
    assert net.precision == torch.float64
    assert net.blocks[1].weight.dtype == torch.float64
    assert float(net.blocks[1].weight.detach()[0, 0]) == 1.0 + 2.0 ** -40  # not rounded
    assert net.blocks[0].mean.dtype == torch.float64
    prop = load_vnnlib(vnnlib(tmp_path / "p.vnnlib", [(1.0, 2.0)], 2, "(> Y_0 Y_1)"), (1,))
    answer, result = certify_vnnlib(net, prop, quick_cfg())
    assert answer == "sat"
    x = np.array(result.counterexample)
    assert 1.0 <= x[0] <= 2.0
    y0, y1 = w[0, 0] * x[0], w[1, 0] * x[0]  # the float64 run, independently
    assert y0 > y1
    assert result.outputs == [y0, y1]
    # The certifier's own copy runs in float64 and says so.
    assert Certifier(net, quick_cfg()).precision == torch.float64


def test_double_model_safe_in_float64_is_certified_at_float64_error_only(tmp_path):
    # y0 - y1 = 2^-30 x > 0 on [1, 2]: far above float64's rounding, below float32's.
    w = np.array([[1.0 + 2.0 ** -30], [1.0]])
    path = gemm_model(tmp_path / "d.onnx", [(w, np.zeros(2))], TensorProto.DOUBLE)
    prop = load_vnnlib(vnnlib(tmp_path / "p.vnnlib", [(1.0, 2.0)], 2, "(<= Y_0 Y_1)"), (1,))
    answer, _ = certify_vnnlib(load_onnx(path), prop, quick_cfg())
    assert answer == "unsat"
    # The same margin for a float32 model of these (float64) numbers does not clear float32's
    # error bound: no certificate from the float64 arithmetic alone.
    net32 = load_onnx(path)
    net32.precision = torch.float32
    answer32, _ = certify_vnnlib(net32, prop, quick_cfg())
    assert answer32 != "unsat"


def test_mixed_or_unsupported_precision_is_refused_in_one_line(tmp_path):
    w = np.array([[1.0], [2.0]])
    path = gemm_model(tmp_path / "m.onnx", [(w, np.zeros(2))], TensorProto.DOUBLE)
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT  # weights stay double
    onnx.save(model, str(tmp_path / "mixed.onnx"))
    with pytest.raises(ModelFormatError) as err:
        load_onnx(tmp_path / "mixed.onnx")
    assert "one precision" in str(err.value) and "\n" not in str(err.value)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(model, str(tmp_path / "half.onnx"))
    with pytest.raises(ModelFormatError, match="FLOAT16.*supported: FLOAT"):
        load_onnx(tmp_path / "half.onnx")


# ------------------------------------------------------------------------------------------
# 2. Floating-point error: huge biases
# ------------------------------------------------------------------------------------------


def huge_bias_net() -> Net:
    """y0 = relu(x + C) - C (= x exactly), y1 = relu(x) - 0.25, C = 1e12, in float32, x in
    [0, 1]: label 0 is robust everywhere in real arithmetic (margin 0.25); in float32 x is lost
    in C (ulp 65536), y0 = 0 and label 0 loses wherever x >= 0.25."""
    first, last = Linear(1, 2), Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0], [1.0]]))
        first.bias.copy_(torch.tensor([1e12, 0.0]))
        last.weight.copy_(torch.eye(2))
        last.bias.copy_(torch.tensor([-1e12, -0.25]))
    return Net([Normalize((0.0,), (1.0,)), Flatten(), first, ReLU(), last], (1, 1, 1))


def test_huge_bias_example_is_not_certified_and_its_float32_violation_is_found():
    net = huge_bias_net()
    x = torch.full((1, 1, 1), 0.1)
    pts = torch.tensor([0.1, 0.3, 0.5]).view(3, 1, 1, 1)
    with torch.no_grad():
        y32 = net(pts)
        y64 = copy.deepcopy(net).double()(pts.double())
    # Real arithmetic: y0 - y1 = 0.25 exactly; float64 comes close (ulp(1e12) = 2^-13 there).
    assert bool(((y64[:, 0] - y64[:, 1]) - 0.25).abs().max() < 1e-3)
    assert float(y32[0, 0]) > float(y32[0, 1])  # float32: the clean point is fine ...
    assert float(y32[1, 0]) < float(y32[1, 1])  # ... x = 0.3 is not
    # Without attacks the verdict rests on the bounds alone: a fixed tolerance certified it.
    no_attack = Certifier(net, quick_cfg(pgd_restarts=0, pgd_quick_restarts=0))
    res = no_attack.certify(x, 0, eps=0.4)
    assert res.status != "certified", res
    lo, up = input_box(x.double().view(1, 1, 1, 1), 0.4)
    run = run_zonotope(no_attack.net64, lo, up)
    assert float(run.element.margin_lower(torch.tensor([0]))[0, 1]) > 0.2  # exact bound holds
    err = fp_error.output_error(no_attack.net64, lo, up, run.pre_bounds, torch.float32)
    assert float(fp_error.robustness_threshold(err, torch.tensor([0]))[0, 1]) > 1e4
    assert not bool(zonotope_certified(net, x.view(1, 1, 1, 1), torch.tensor([0]), 0.4)[0])
    # With the attack, the float32 run's violation is found and confirmed in float32.
    res = Certifier(net, quick_cfg()).certify(x, 0, eps=0.4)
    assert res.status == "falsified"
    cex = torch.tensor(res.counterexample, dtype=torch.float32).view(1, 1, 1, 1)
    with torch.no_grad():
        y = net(cex)[0]
    assert float(y[1]) >= float(y[0]) and abs(float(cex) - 0.1) <= 0.4


def test_huge_bias_vnnlib_is_not_unsat(tmp_path):
    w1, b1 = np.array([[1.0]]), np.array([1e12])
    w2, b2 = np.array([[1.0], [0.0]]), np.array([-1e12, 0.0])
    path = gemm_model(tmp_path / "big.onnx", [(w1, b1), (w2, b2)])
    prop = load_vnnlib(vnnlib(tmp_path / "p.vnnlib", [(0.5, 0.5)], 2, "(<= Y_0 Y_1)"), (1,))
    answer, result = certify_vnnlib(load_onnx(path), prop, quick_cfg())
    assert answer == "sat"
    assert result.outputs[0] <= result.outputs[1]


def random_huge_net(seed: int, bias_scale: float) -> Net:
    """A random ReLU net with a shift by huge biases in the middle that cancels exactly in real
    arithmetic (+C, then -C) but costs float32 digits: ulp(1e12) = 65536 in float32."""
    gen = torch.Generator().manual_seed(seed)

    def linear(n_in: int, n_out: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> Linear:
        lin = Linear(n_in, n_out)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n_out, n_in, generator=gen) if weight is None
                             else weight)
            lin.bias.copy_(torch.randn(n_out, generator=gen) if bias is None else bias)
        return lin

    shift = bias_scale * (1 + torch.rand(6, generator=gen))
    middle = linear(6, 6)
    with torch.no_grad():
        middle.bias.add_(shift)
    blocks = [Normalize((0.0,), (1.0,)), Flatten(), linear(3, 6), ReLU(), middle,
              linear(6, 6, torch.eye(6), -shift), ReLU(), linear(6, 3)]
    return Net(blocks, (1, 1, 3)).eval().requires_grad_(False)


@pytest.mark.parametrize("zonotope_dtype", ["float64", "float32"])
@pytest.mark.parametrize("bias_scale", [1.0, 1e4, 1e8, 1e12])
def test_certified_means_robust_for_the_float32_run_on_sampled_points(bias_scale,
                                                                      zonotope_dtype):
    """Random nets, some with huge biases: whatever is certified holds for the float32
    forward pass at every sampled point of the box (strictly: the label's logit is above every
    other), and counterexamples are float32 points that break it; with the first zonotope in
    float64 or in float32."""
    certified = 0
    for seed in range(6):
        net = random_huge_net(seed, bias_scale)
        # No attacks: the verdict rests on the bounds (the clean point is still checked).
        cert = Certifier(net, quick_cfg(pgd_restarts=0, pgd_quick_restarts=0, slope_iters=10,
                                        zonotope_dtype=zonotope_dtype))
        gen = torch.Generator().manual_seed(100 + seed)
        for j in range(4):
            x = torch.rand(1, 1, 3, generator=gen)
            label = int(net(x.view(1, 1, 1, 3)).argmax(1))
            eps = (0.0, 1e-3, 0.01, 0.05)[j]
            res = cert.certify(x, label, eps)
            lo, up = input_box(x.double().view(1, 1, 1, 3), eps)
            if res.status == "certified":
                certified += 1
                pts = lo + (up - lo) * torch.rand(2000, 1, 1, 3, generator=gen,
                                                  dtype=torch.float64)
                pts = torch.cat([pts, lo, up, x.double().view(1, 1, 1, 3)])
                with torch.no_grad():
                    y = net(pts.float())
                others = torch.cat([y[:, :label], y[:, label + 1:]], 1)
                assert bool((y[:, label] > others.max(1).values).all()), (seed, j)
            elif res.status in ("falsified", "misclassified"):
                cex = torch.tensor(res.counterexample, dtype=torch.float64).view(1, 1, 1, 3)
                assert bool(((cex >= lo) & (cex <= up)).all())
                assert torch.equal(cex.float().double(), cex)  # a float32 point
                with torch.no_grad():
                    y = net(cex.float())[0]
                assert float(torch.cat([y[:label], y[label + 1:]]).max()) >= float(y[label])
    if bias_scale == 1.0:
        assert certified > 0  # the check above can fail: there are certificates to test


# ------------------------------------------------------------------------------------------
# 3. Strict properties and exact ties
# ------------------------------------------------------------------------------------------


def tie_model(path: Path) -> Path:
    """y0 = relu(x) >= 0 = y1 everywhere (exact ties on x <= 0)."""
    return gemm_model(path, [(np.array([[1.0]]), np.zeros(1)),
                             (np.array([[1.0], [0.0]]), np.zeros(2))])


def test_strict_property_is_not_sat_at_a_tie(tmp_path):
    net = load_onnx(tie_model(tmp_path / "tie.onnx"))
    prop = load_vnnlib(vnnlib(tmp_path / "p.vnnlib", [(-1.0, 1.0)], 2, "(< Y_0 Y_1)"), (1,))
    assert prop.disjuncts[0].strict.tolist() == [True]
    answer, result = certify_vnnlib(net, prop, quick_cfg())
    assert answer != "sat", result.counterexample
    # The same property non-strict (y0 <= y1) holds at every x <= 0: a true sat.
    prop = load_vnnlib(vnnlib(tmp_path / "q.vnnlib", [(-1.0, 1.0)], 2, "(<= Y_0 Y_1)"), (1,))
    answer, result = certify_vnnlib(net, prop, quick_cfg())
    assert answer == "sat"
    assert result.outputs[0] <= result.outputs[1] and result.counterexample[0] <= 0


def test_robustness_ties_follow_one_rule(tmp_path):
    """A tie is not robust: never certified, and a counterexample (non-strict VNN-LIB
    robustness and data set robustness alike); with a strict VNN-LIB atom it is none."""
    net = load_onnx(tie_model(tmp_path / "tie.onnx"))
    box = [(-1.0, -0.5)]  # y0 = y1 = 0 on the whole box
    nonstrict = load_vnnlib(vnnlib(tmp_path / "r.vnnlib", box, 2, "(>= Y_1 Y_0)"), (1,))
    assert nonstrict.is_robustness_of() == 0
    answer, result = certify_vnnlib(net, nonstrict, quick_cfg())
    assert answer == "sat" and result.outputs[0] == result.outputs[1] == 0.0
    strict = load_vnnlib(vnnlib(tmp_path / "s.vnnlib", box, 2, "(> Y_1 Y_0)"), (1,))
    assert strict.is_robustness_of() is None
    answer, _ = certify_vnnlib(net, strict, quick_cfg())
    assert answer != "sat"
    res = Certifier(net, quick_cfg()).certify_box(None, np.array([-1.0]), np.array([-0.5]), 0)
    assert res.status in ("falsified", "misclassified") and res.status != "certified"
    lone = Spec.robustness(torch.tensor([0]), 2)
    assert lone.violated_exactly([0.0, 0.0]) and not lone.violated_exactly([1e-45, 0.0])


def test_exact_check_distinguishes_what_float_arithmetic_rounds_away():
    # y0 - y1 with y0 = 1 + 2^-23 and y1 = 1 in float32 is exactly 2^-23 > 0; a row with a
    # coefficient that float32 would round shows the check is rational, not float.
    spec = Spec.disjunctive([(np.array([[1.0, -1.0]]), np.array([0.0]))])
    assert not spec.violated_exactly([1 + 2.0 ** -23, 1.0])
    assert spec.violated_exactly([1.0, 1.0])
    spec = Spec.disjunctive([(np.array([[1.0, -(1.0 + 2.0 ** -52)]]), np.array([0.0]))])
    assert spec.violated_exactly([2.0 ** 60, 2.0 ** 60])  # 2^60 (1 - (1 + 2^-52)) < 0


# ------------------------------------------------------------------------------------------
# 5. VNN-COMP result files
# ------------------------------------------------------------------------------------------


def parse_assignment(text: str) -> dict[str, float]:
    body = text.split("\n", 1)[1].strip()
    assert body.startswith("((") and body.endswith("))")
    pairs = body[1:-1].replace(")", ") ").split()
    out = {}
    for name, value in zip(pairs[0::2], pairs[1::2]):
        out[name.lstrip("(")] = float(value.rstrip(")"))
    return out


def test_results_file_sat_and_unsat(tmp_path, capsys):
    model = tie_model(tmp_path / "tie.onnx")
    sat = vnnlib(tmp_path / "sat.vnnlib", [(-1.0, 1.0)], 2, "(<= Y_0 Y_1)")
    out = tmp_path / "res" / "sat.txt"
    assert main(["--model", str(model), "--vnnlib", str(sat), "--results", str(out),
                 "--no-progress", "--timeout-per-input", "30"]) == 0
    text = out.read_text()
    assert text.startswith("sat\n")
    values = parse_assignment(text)
    assert set(values) == {"X_0", "Y_0", "Y_1"}
    assert -1.0 <= values["X_0"] <= 1.0
    x = np.float32(values["X_0"])
    assert values["Y_0"] == max(float(x), 0.0) and values["Y_1"] == 0.0
    assert values["Y_0"] <= values["Y_1"]
    assert [p.name for p in out.parent.iterdir()] == ["sat.txt"]  # no temporary left behind

    unsat = vnnlib(tmp_path / "unsat.vnnlib", [(0.5, 1.0)], 2, "(<= Y_0 Y_1)")
    out2 = tmp_path / "unsat.txt"
    assert main(["--model", str(model), "--vnnlib", str(unsat), "--results", str(out2),
                 "--no-progress"]) == 0
    assert out2.read_text() == "unsat\n"
    assert capsys.readouterr().out.split()[-1] == "unsat"


def test_results_without_vnnlib_is_bad_input(tmp_path, capsys):
    model = tie_model(tmp_path / "tie.onnx")
    code = main(["--model", str(model), "--dataset", "digits", "--eps", "0.1",
                 "--results", str(tmp_path / "r.txt")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--results" in err
    assert not (tmp_path / "r.txt").exists()


# ------------------------------------------------------------------------------------------
# The error bound itself: a sampling check of the per-layer rules
# ------------------------------------------------------------------------------------------


def test_output_error_bounds_the_float32_run_on_sampled_points():
    """|float32 run - float64 run| <= the bound at random points of the box (float64 is the
    reference up to its own, far smaller, error), on nets with large biases and weights."""
    for seed in range(4):
        net = random_huge_net(seed, 1e3 * (seed + 1))
        net64 = copy.deepcopy(net).double()
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(1, 1, 1, 3, generator=gen, dtype=torch.float64)
        lo, up = input_box(x, 0.05)
        run = run_zonotope(net64, lo, up)
        err = fp_error.output_error(net64, lo, up, run.pre_bounds, torch.float32)
        pts = (lo + (up - lo) * torch.rand(500, 1, 1, 3, generator=gen, dtype=torch.float64))
        pts = pts.float().double()  # float32 inputs
        with torch.no_grad():
            diff = (net(pts.float()).double() - net64(pts)).abs()
        assert bool((diff <= err.run).all()), (seed, float((diff - err.run).max()))
        assert math.isfinite(float(err.run.max()))


def test_vnnlib_numbers_are_read_exactly(tmp_path):
    """Constants are rationals as written: the float64 box contains the written one (outward),
    while a counterexample must lie in the written box and satisfy the written rows."""
    v = float(np.float32(0.3))  # 0.300000011920928955078125, a float32 input value
    text = "\n".join(["(declare-const X_0 Real)", "(declare-const Y_0 Real)",
                      "(declare-const Y_1 Real)",
                      "(assert (>= X_0 0.30000001192092897))",  # just above v
                      "(assert (< X_0 1/3))",
                      "(assert (<= Y_0 0.1))"])
    path = tmp_path / "p.vnnlib"
    path.write_text(text + "\n")
    prop = load_vnnlib(path, (1,))
    assert prop.lower[0] <= v  # outward: the float64 box holds every written point ...
    assert not prop.contains(np.array([v]))  # ... but v itself is not one of them
    assert prop.upper[0] >= 1 / 3 and not prop.contains(np.array([prop.upper[0]]))
    assert prop.contains(np.array([0.31]))
    d = prop.disjuncts[0]
    # float64's 0.1 is above the written 1/10: not a counterexample; the float just below is.
    assert Fraction(0.1) > Fraction(1, 10)
    assert not d.holds(np.array([0.1, 0.0]))
    assert d.holds(np.array([np.nextafter(0.1, 0.0), 0.0]))


# ------------------------------------------------------------------------------------------
# 5. A float32 first zonotope (zonotope_dtype = "float32"): its rounding is bounded
# ------------------------------------------------------------------------------------------


def small_conv_net(seed: int, shift: float) -> Net:
    """A ConvMed-like net on (1, 8, 8) (the generator compression and the fused decompression
    apply) with a +shift / -shift pair of biases that costs float32 digits."""
    from pipeline.layers import Conv2d

    gen = torch.Generator().manual_seed(seed)
    conv1, conv2 = Conv2d(1, 4, 3, stride=2, padding=1), Conv2d(4, 4, 3, stride=2, padding=1)
    fc1, fc2, fc3 = Linear(16, 12), Linear(12, 12), Linear(12, 4)
    with torch.no_grad():
        for m in (conv1, conv2, fc1, fc2, fc3):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / 2)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) / 4)
        fc1.bias.add_(shift)
        fc2.weight.copy_(torch.eye(12))
        fc2.bias.copy_(torch.full((12,), -shift))
    blocks = [Normalize((0.3,), (0.5,)), conv1, ReLU(), conv2, ReLU(), Flatten(), fc1, fc2,
              ReLU(), fc3]
    return Net(blocks, (1, 8, 8)).eval().requires_grad_(False)


def _pre_activations(net64: Net, pts: torch.Tensor) -> dict[int, torch.Tensor]:
    out, h = {}, pts
    with torch.no_grad():
        for i, block in enumerate(net64.blocks):
            if block.is_relu:
                out[i] = h.reshape(h.shape[0], -1)
            h = block(h)
    out[-1] = h
    return out


@pytest.mark.parametrize("shift", [0.0, 1e3, 1e6])
@pytest.mark.parametrize("make", [small_conv_net, lambda seed, shift: random_huge_net(seed,
                                                                                      shift)])
def test_float32_zonotope_rounding_bound_holds_at_sampled_points(make, shift):
    """At points of the box (float64 forward passes: the exact network up to 1e-9 here), every
    margin is at least the float32 zonotope's lower bound minus its rounding bound, and every
    ReLU input lies in the widened float32 bounds. Without the rounding bound the large shifts
    make float32 bounds wrong by many ulps: the check can fail."""
    missed_without = 0
    for seed in range(4):
        net = make(seed, shift)
        cert = Certifier(net, CertifyConfig(zonotope_dtype="float32"))
        assert cert.zonotope_dtype == torch.float32
        gen = torch.Generator().manual_seed(seed)
        shape = tuple(net.input_shape)
        x = torch.rand(1, *shape, generator=gen, dtype=torch.float64)
        label = int(cert.net64(x).argmax(1))
        # A point box first: its zonotope bound is the exact margin, up to the rounding.
        lo, up = input_box(x, (0.0, 0.0, 0.01, 0.03)[seed])
        run, rounding = cert.deepz(lo, up)
        spec = Spec.robustness(torch.tensor([label]), cert.n_outputs)
        lower = spec.lower(run.element)[0]
        slack = (spec.A.abs()[0] @ rounding.radius.reshape(-1))  # |a| r per row
        pts = lo + (up - lo) * torch.rand(400, *shape, generator=gen, dtype=torch.float64)
        pts = torch.cat([pts, lo, up, x])
        pre = _pre_activations(cert.net64, pts)
        margins = (pre[-1] @ spec.A[0].T) - spec.b[0]  # rows a·y - b: y_label - y_j
        tol = 1e-9 * (1 + shift)
        assert bool((margins >= lower - slack - tol).all()), (seed, float((lower - slack
                                                                            - margins).max()))
        missed_without += int(bool((margins < lower - tol).any()))
        for i, (blo, bup) in run.pre_bounds.items():
            assert bool((pre[i] >= blo.reshape(1, -1) - tol).all()), (seed, i)
            assert bool((pre[i] <= bup.reshape(1, -1) + tol).all()), (seed, i)
        assert bool(torch.isfinite(slack).all())
    if shift == 1e6:
        # The radius is what keeps it sound here: the raw float32 bounds miss a margin.
        assert missed_without > 0


def test_float32_zonotope_is_used_only_where_it_is_sound(tmp_path):
    """float32 DeepZ for a float32 model on the CPU; a DOUBLE model keeps float64."""
    cfg = CertifyConfig(zonotope_dtype="float32")
    assert Certifier(small_conv_net(0, 0.0), cfg).zonotope_dtype == torch.float32
    w, b = np.array([[1.0, 2.0]]), np.array([0.5])
    path = gemm_model(tmp_path / "d.onnx", [(w, b)], elem=TensorProto.DOUBLE)
    assert Certifier(load_onnx(path), cfg).zonotope_dtype == torch.float64
    with pytest.raises(ValueError, match="zonotope_dtype"):
        CertifyConfig(zonotope_dtype="float16")


def test_float32_zonotope_keeps_deepz_verdicts_on_a_trained_like_net():
    """On a conv net without large shifts the float32 DeepZ certifies what float64 DeepZ does
    (its thresholds are larger but far below typical margins), and never more."""
    net = small_conv_net(3, 0.0)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(24, 1, 8, 8, generator=gen)
    with torch.no_grad():
        y = net(x).argmax(1)
    out = {}
    for dt in ("float64", "float32"):
        c = Certifier(net, CertifyConfig(zonotope_dtype=dt, slope_iters=0, pgd_restarts=0,
                                         pgd_quick_restarts=0, milp=False))
        out[dt] = [r.status for r in c.certify_batch(x, y, 0.01)]
    assert out["float64"].count("certified") > 0
    agree = sum(a == b for a, b in zip(out["float64"], out["float32"]))
    assert agree >= len(y) - 1, out
    assert out["float32"].count("certified") <= out["float64"].count("certified")

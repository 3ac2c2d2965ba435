"""Networks from ONNX files and properties from VNN-LIB files (as in VNN-COMP).

    net = load_onnx("mnist_0.1.onnx", mean=(0.1307,), std=(0.3081,))
    prop = load_vnnlib("cifar10_spec_idx_0_eps_0.00784_n1.vnnlib.gz", input_shape=(3, 32, 32))
    prop.lower, prop.upper          # the input box, shaped like the input (C, H, W order)
    prop.disjuncts                  # unsafe iff some disjunct's  A y <= b  holds for some x
    prop.is_robustness_of()         # the label k if the property is "y_k is the argmax"

ONNX: only the ``onnx`` package is used (no onnxruntime). The graph must be one chain from its
single real input to its single output, made of Conv, Gemm, MatMul(+Add), Relu, Flatten,
Reshape-to-(batch, -1) (including PyTorch's Shape/Gather/Unsqueeze/Concat pattern for
``x.view(x.size(0), -1)``, which is constant-folded), Identity/Dropout (skipped) and a leading
normalisation by constants (Sub/Div, also Add/Mul) that becomes a :class:`Normalize` block. Block 0
of the result is always a Normalize (identity if the graph and the arguments give none), so the
block indices are COLT's.

Precision: a FLOAT model becomes a float32 Net, a DOUBLE model a float64 one (weights, biases and
normalisation constants kept in float64, never rounded); ``net.precision`` records it, and the
certifier checks counterexamples and bounds the rounding error in that precision. Other input
types, or weights of another precision than the input, are refused.

VNN-LIB: declarations ``(declare-const X_i Real)`` / ``(declare-const Y_j Real)``, box bounds on
each X_i, and assertions over Y that are any and/or nesting of linear atoms (<=, >=, <, >, = over
+, -, * by a constant), turned into a disjunction of conjunctions ``A y <= b`` (``< b`` for the
strict atoms). Numbers are read exactly (rationals): the float64 box is rounded outwards (it
contains the written one: certificates cover it) and A, b to nearest, while
:meth:`VnnlibProperty.contains` and :meth:`Disjunct.holds` decide a counterexample exactly as
written, strict where strict.
"""

from __future__ import annotations

import gzip
import math
import re
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.layers import Conv2d, Flatten, Linear, Normalize, ReLU
from pipeline.nets import Net

__all__ = [
    "ModelFormatError",
    "PropertyFormatError",
    "Disjunct",
    "VnnlibProperty",
    "load_onnx",
    "load_vnnlib",
]


class ModelFormatError(ValueError):
    """An ONNX file that cannot be turned into a Net (one line: file, node, what is supported)."""


class PropertyFormatError(ValueError):
    """A VNN-LIB file that cannot be parsed (one line: file, line, problem)."""


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------

_SUPPORTED = ("supported: Conv (group 1, dilation 1, symmetric pads), Gemm (no transA), "
              "MatMul[+Add], Relu, Flatten (axis 1), Reshape to (batch, -1), "
              "leading Sub/Div/Add/Mul by constants (normalisation), Identity, Dropout, "
              "and constant/shape arithmetic (Constant, Shape, Gather, Unsqueeze, Squeeze, "
              "Concat, Cast, Reshape, Transpose, Slice, Add, Sub, Mul, Div, Neg, "
              "ConstantOfShape)")

_FOLDABLE = {"Constant", "Identity", "Cast", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat",
             "Reshape", "Transpose", "Slice", "Add", "Sub", "Mul", "Div", "Neg", "Flatten",
             "ConstantOfShape", "Dropout"}


class _Node:
    """A node being converted, for error messages."""

    def __init__(self, path: Path, index: int, node: Any) -> None:
        self.path, self.index, self.node = path, index, node

    def error(self, problem: str) -> ModelFormatError:
        n = self.node
        label = f"node #{self.index} {n.name!r} ({n.op_type}"
        if not n.name and len(n.output):
            label += f", output {n.output[0]!r}"
        label += ")"
        return ModelFormatError(_one_line(f"{self.path}: {label}: {problem}; {_SUPPORTED}"))

    def attrs(self, allowed: set[str]) -> dict[str, Any]:
        import onnx

        out = {}
        for a in self.node.attribute:
            if a.name == "consumed_inputs":  # legacy (opset < 6), meaningless here
                continue
            if a.name not in allowed:
                raise self.error(f"unsupported attribute {a.name!r}")
            out[a.name] = onnx.helper.get_attribute_value(a)
        return out


def _np_dtype(onnx_type: int) -> np.dtype:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))


def _constant_value(node: _Node) -> np.ndarray:
    import onnx.numpy_helper as nh

    attrs = node.attrs({"value", "value_float", "value_floats", "value_int", "value_ints"})
    if "value" in attrs:
        return nh.to_array(attrs["value"])
    if "value_float" in attrs:
        return np.array(attrs["value_float"], np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], np.int64)
    raise node.error("Constant without a (numeric) value")


def _reshape_target(shape: tuple[int, ...], target: np.ndarray, allowzero: int) -> tuple[int, ...]:
    """ONNX Reshape semantics (0 copies a dimension unless allowzero, -1 is inferred)."""
    target = [int(t) for t in np.asarray(target).reshape(-1)]
    out = []
    for i, t in enumerate(target):
        if t == 0 and not allowzero:
            if i >= len(shape):
                raise ValueError(f"Reshape: 0 at position {i} beyond input rank {len(shape)}")
            out.append(shape[i])
        else:
            out.append(t)
    total = int(np.prod(shape))
    if out.count(-1) > 1:
        raise ValueError("Reshape: more than one -1")
    if -1 in out:
        known = int(np.prod([t for t in out if t != -1]))
        if known == 0 or total % known:
            raise ValueError(f"Reshape: cannot reshape {shape} to {target}")
        out[out.index(-1)] = total // known
    if int(np.prod(out)) != total or any(t < 0 for t in out):
        raise ValueError(f"Reshape: cannot reshape {shape} to {target}")
    return tuple(out)


def _fold(node: _Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    """Evaluate a node whose data inputs are all constants."""
    op = node.node.op_type
    x = inputs[0] if inputs else None
    if op == "Constant":
        return _constant_value(node)
    if op in ("Identity", "Dropout"):
        node.attrs({"ratio", "seed", "is_test", "training_mode"})
        return x
    if op == "Cast":
        attrs = node.attrs({"to", "saturate"})
        return np.asarray(x).astype(_np_dtype(attrs["to"]))
    if op == "Gather":
        attrs = node.attrs({"axis"})
        axis = attrs.get("axis", 0)
        idx = np.asarray(inputs[1]).astype(np.int64)
        idx = np.where(idx < 0, idx + np.shape(x)[axis], idx)
        return np.take(x, idx, axis=axis)
    if op in ("Unsqueeze", "Squeeze"):
        attrs = node.attrs({"axes"})
        axes = attrs.get("axes")
        if axes is None and len(inputs) > 1 and inputs[1] is not None:
            axes = [int(a) for a in np.asarray(inputs[1]).reshape(-1)]
        x = np.asarray(x)
        if op == "Squeeze":
            if axes is None:
                return np.squeeze(x)
            return np.squeeze(x, axis=tuple(a % x.ndim for a in axes))
        if axes is None:
            raise node.error("Unsqueeze without axes")
        rank = x.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            x = np.expand_dims(x, a)
        return x
    if op == "Concat":
        attrs = node.attrs({"axis"})
        return np.concatenate([np.asarray(i) for i in inputs], axis=attrs.get("axis", 0))
    if op == "Reshape":
        attrs = node.attrs({"allowzero", "shape"})
        target = attrs["shape"] if "shape" in attrs else inputs[1]
        x = np.asarray(x)
        return x.reshape(_reshape_target(x.shape, target, attrs.get("allowzero", 0)))
    if op == "Flatten":
        attrs = node.attrs({"axis"})
        x = np.asarray(x)
        axis = attrs.get("axis", 1) % (x.ndim + 1) if x.ndim else 0
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op == "Transpose":
        attrs = node.attrs({"perm"})
        return np.transpose(x, attrs.get("perm"))
    if op == "Slice":
        attrs = node.attrs({"starts", "ends", "axes", "steps"})
        x = np.asarray(x)
        if "starts" in attrs:
            starts, ends = attrs["starts"], attrs["ends"]
            axes, steps = attrs.get("axes"), None
        else:
            starts, ends = inputs[1], inputs[2]
            axes = inputs[3] if len(inputs) > 3 else None
            steps = inputs[4] if len(inputs) > 4 else None
        starts = [int(s) for s in np.asarray(starts).reshape(-1)]
        ends = [int(e) for e in np.asarray(ends).reshape(-1)]
        axes = list(range(len(starts))) if axes is None else [
            int(a) % x.ndim for a in np.asarray(axes).reshape(-1)]
        steps = [1] * len(starts) if steps is None else [int(s) for s in
                                                          np.asarray(steps).reshape(-1)]
        index = [slice(None)] * x.ndim
        for a, s, e, st in zip(axes, starts, ends, steps):
            index[a] = slice(s, e, st)
        return x[tuple(index)]
    if op == "ConstantOfShape":
        import onnx.numpy_helper as nh

        attrs = node.attrs({"value"})
        value = nh.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
        shape = tuple(int(s) for s in np.asarray(x).reshape(-1))
        return np.full(shape, value.reshape(-1)[0], dtype=value.dtype)
    if op == "Neg":
        return -np.asarray(x)
    if op == "Shape":
        attrs = node.attrs({"start", "end"})
        return np.array(np.shape(x), np.int64)[attrs.get("start", 0):attrs.get("end", None)]
    if op in ("Add", "Sub", "Mul", "Div"):
        attrs = node.attrs({"broadcast", "axis"})
        a, b = np.asarray(inputs[0]), np.asarray(inputs[1])
        if attrs.get("broadcast") and "axis" in attrs:
            b = _legacy_broadcast(b, a.ndim, attrs["axis"])
        if op == "Add":
            out = a + b
        elif op == "Sub":
            out = a - b
        elif op == "Mul":
            out = a * b
        elif np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer):
            out = np.trunc(a / b)
        else:
            out = a / b
        return out.astype(np.result_type(a, b))
    raise node.error("unsupported operator (on constants)")


def _legacy_broadcast(c: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """Opset < 7 broadcasting: ``c`` aligned at ``axis`` of a rank-``rank`` tensor."""
    axis %= rank
    return c.reshape((1,) * axis + c.shape + (1,) * (rank - axis - c.ndim))


def _per_channel(node: _Node, const: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A constant broadcast over a (batch, *shape) tensor, reduced to one value per channel
    (C for images, N per feature for flat inputs); error if it varies within a channel."""
    try:
        full = np.broadcast_to(np.asarray(const, np.float64), (1, *shape))[0]
    except ValueError:
        raise node.error(f"constant of shape {np.shape(const)} does not broadcast to the "
                         f"input (batch, {', '.join(map(str, shape))})") from None
    if len(shape) == 1:
        return full.copy()
    flat = full.reshape(shape[0], -1)
    if not np.all(flat == flat[:, :1]):
        raise node.error("normalisation constant is not per-channel")
    return flat[:, 0].copy()


_PRECISIONS = {1: torch.float32, 11: torch.float64}  # TensorProto.FLOAT, DOUBLE


def _input_precision(path: Path, graph: Any, name: str, consts: dict[str, np.ndarray]
                     ) -> torch.dtype:
    """The model's precision: its input's element type (FLOAT or DOUBLE); every floating
    initializer must have it."""
    import onnx

    value = next(v for v in graph.input if v.name == name)
    elem = value.type.tensor_type.elem_type
    if elem not in _PRECISIONS:
        shown = onnx.TensorProto.DataType.Name(elem) if elem else "undefined"
        raise ModelFormatError(f"{path}: input {name!r} has element type {shown}; supported: "
                               "FLOAT (float32) or DOUBLE (float64)")
    dtype = _PRECISIONS[elem]
    want = np.float32 if dtype == torch.float32 else np.float64
    for key, arr in consts.items():
        if np.issubdtype(arr.dtype, np.floating) and arr.dtype != want:
            raise ModelFormatError(_one_line(
                f"{path}: initializer {key!r} is {arr.dtype}, the input is {np.dtype(want)}; "
                "supported: one precision throughout (re-export the model in one precision)"))
    return dtype


def _input_shape(path: Path, graph: Any, name: str) -> tuple[int, ...]:
    value = next(v for v in graph.input if v.name == name)
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        raise ModelFormatError(f"{path}: input {name!r} has no shape; supported: "
                               "(batch, C, H, W) or (batch, N)")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if len(dims) not in (2, 4) or any(d is None or d <= 0 for d in dims[1:]):
        shown = ["?" if d is None else d for d in dims]
        raise ModelFormatError(_one_line(
            f"{path}: input {name!r} has shape {shown}; supported: (batch, C, H, W) or "
            "(batch, N) with concrete non-batch dimensions"))
    return tuple(int(d) for d in dims[1:])


def _read_model(path: Path) -> Any:
    import onnx

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: no such file") from None
    except OSError as err:
        raise ModelFormatError(_one_line(f"{path}: cannot read ({err})")) from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise ModelFormatError(_one_line(f"{path}: not an ONNX file (bad gzip: {err})")) \
                from None
    try:
        model = onnx.load_model_from_string(data)
    except Exception as err:  # protobuf DecodeError and friends
        raise ModelFormatError(_one_line(
            f"{path}: not an ONNX file or truncated ({type(err).__name__}: {err})")) from None
    if model.ir_version <= 0 or not model.HasField("graph") or not len(model.graph.node) \
            or not len(model.graph.output):
        raise ModelFormatError(f"{path}: not an ONNX file or truncated (no graph, nodes or "
                               "outputs)")
    return model


def load_onnx(path: str | Path, mean: tuple[float, ...] | None = None,
              std: tuple[float, ...] | None = None) -> Net:
    """An ONNX feed-forward ReLU network as a :class:`Net` (block 0 always a Normalize).

    ``mean``/``std`` (one value, or one per channel; the other defaults to 0 / 1) prepend a
    normalisation for networks exported without one (e.g. COLT's ONNX files); they may not be
    given for a graph that already normalises its input.
    """
    import onnx.numpy_helper as nh

    path = Path(path)
    model = _read_model(path)
    graph = model.graph

    consts: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        try:
            consts[init.name] = nh.to_array(init)
        except Exception as err:
            raise ModelFormatError(_one_line(
                f"{path}: initializer {init.name!r} unreadable ({err})")) from None
    real_inputs = [v.name for v in graph.input if v.name not in consts]
    if len(real_inputs) != 1:
        raise ModelFormatError(_one_line(
            f"{path}: graph has {len(real_inputs)} real inputs {real_inputs}; supported: "
            "exactly one (a single chain)"))
    input_name = real_inputs[0]
    input_shape = _input_shape(path, graph, input_name)
    precision = _input_precision(path, graph, input_name, consts)
    channels = input_shape[0]

    # The chain: tensor name -> its shape without batch (every chain tensor ever produced).
    chain_shapes: dict[str, tuple[int, ...]] = {input_name: input_shape}
    cur, cur_shape = input_name, input_shape
    blocks: list[nn.Module] = []
    norm_mean = np.zeros(channels if len(input_shape) > 1 else input_shape[0])
    norm_std = np.ones_like(norm_mean)
    has_norm = False
    last_affine: tuple[str, nn.Module] | None = None  # (output tensor, block) for bias fusion

    for index, onnx_node in enumerate(graph.node):
        node = _Node(path, index, onnx_node)
        op = onnx_node.op_type
        names = list(onnx_node.input)
        if onnx_node.domain not in ("", "ai.onnx"):
            raise node.error(f"operator from domain {onnx_node.domain!r} is unsupported")
        chain_in = [n for n in names if n in chain_shapes]
        if op == "Shape" and chain_in:
            attrs = node.attrs({"start", "end"})
            full = np.array((1, *chain_shapes[names[0]]), np.int64)
            consts[onnx_node.output[0]] = full[attrs.get("start", 0):attrs.get("end", None)]
            continue
        if not chain_in:
            missing = [n for n in names if n and n not in consts]
            if missing:
                raise node.error(f"input {missing[0]!r} is neither a constant nor on the chain "
                                 "from the graph input (non-chain graph)")
            if op not in _FOLDABLE:
                raise node.error("unsupported operator (on constants)")
            try:
                value = _fold(node, [consts[n] if n else None for n in names])
            except ModelFormatError:
                raise
            except Exception as err:
                raise node.error(f"cannot evaluate on constants ({type(err).__name__}: "
                                 f"{err})") from None
            consts[onnx_node.output[0]] = np.asarray(value)
            continue
        if len(chain_in) > 1 or names.count(chain_in[0]) > 1 or chain_in[0] != cur:
            raise node.error("consumes a tensor that is not the current end of the single "
                             "chain from the graph input (non-chain graph)")
        others = [n for n in names if n and n != cur]
        missing = [n for n in others if n not in consts]
        if missing:
            raise node.error(f"input {missing[0]!r} is not a constant (non-chain graph)")
        if op not in ("Dropout",) and len([o for o in onnx_node.output if o]) != 1:
            raise node.error("more than one output")
        out = onnx_node.output[0]
        new_shape = cur_shape
        block: nn.Module | None = None

        if op in ("Identity", "Dropout"):
            node.attrs({"ratio", "seed", "is_test", "training_mode"})
            if op == "Dropout" and len(names) > 2 and names[2] and \
                    bool(np.asarray(consts[names[2]]).reshape(-1)[0]):
                raise node.error("Dropout in training mode")
        elif op == "Relu":
            node.attrs(set())
            block = ReLU()
        elif op == "Conv":
            block, new_shape = _conv(node, cur_shape, names, consts, precision)
        elif op == "Gemm":
            block, new_shape = _gemm(node, cur, cur_shape, names, consts, precision)
        elif op == "MatMul":
            node.attrs(set())
            if names[0] != cur or len(cur_shape) != 1:
                raise node.error("MatMul supported only as (batch, N) @ constant (N, M)")
            weight = np.asarray(consts[names[1]], np.float64)
            if weight.ndim != 2 or weight.shape[0] != cur_shape[0]:
                raise node.error(f"MatMul weight of shape {weight.shape} does not fit an "
                                 f"input of {cur_shape[0]} features")
            block = _linear(weight.T, np.zeros(weight.shape[1]), precision)
            new_shape = (weight.shape[1],)
        elif op == "Flatten":
            attrs = node.attrs({"axis"})
            rank = len(cur_shape) + 1
            if attrs.get("axis", 1) % rank != 1:
                raise node.error(f"Flatten axis {attrs.get('axis')} (only axis 1 = keep batch)")
            if len(cur_shape) > 1:
                block, new_shape = Flatten(), (int(np.prod(cur_shape)),)
        elif op == "Reshape":
            attrs = node.attrs({"allowzero", "shape"})
            target = attrs["shape"] if "shape" in attrs else consts[names[1]]
            n = int(np.prod(cur_shape))
            try:
                shape = _reshape_target((1, *cur_shape), target, attrs.get("allowzero", 0))
            except ValueError as err:
                raise node.error(str(err)) from None
            if shape != (1, n) or np.asarray(target).reshape(-1)[0] not in (-1, 0, 1):
                raise node.error(f"Reshape of (batch, {', '.join(map(str, cur_shape))}) to "
                                 f"{[int(t) for t in np.asarray(target).reshape(-1)]} (only "
                                 "to (batch, -1))")
            if len(cur_shape) > 1:
                block, new_shape = Flatten(), (n,)
        elif op in ("Add", "Sub", "Mul", "Div"):
            attrs = node.attrs({"broadcast", "axis"})
            const = np.asarray(consts[others[0]], np.float64) if others else None
            if const is None:
                raise node.error("both operands are the chain tensor")
            if attrs.get("broadcast") and "axis" in attrs:
                const = _legacy_broadcast(const, len(cur_shape) + 1, attrs["axis"])
            chain_first = names[0] == cur
            if last_affine is not None and last_affine[0] == cur and op in ("Add", "Sub") \
                    and (chain_first or op == "Add"):
                _add_bias(node, last_affine[1], const if op == "Add" else -const, cur_shape)
                last_affine = (out, last_affine[1])
                cur = out
                chain_shapes[out] = cur_shape
                continue
            if blocks:
                raise node.error(f"{op} by a constant is supported only as a leading "
                                 "normalisation or as a bias right after Conv/Gemm/MatMul")
            if not chain_first and op in ("Sub", "Div"):
                raise node.error(f"{op} with the constant as first operand (only x {op} c)")
            value = _per_channel(node, const, cur_shape)
            if op == "Sub":
                norm_mean = norm_mean + value * norm_std
            elif op == "Add":
                norm_mean = norm_mean - value * norm_std
            elif op == "Div":
                norm_std = norm_std * value
            else:
                norm_std = norm_std / value
            if not np.all(np.isfinite(norm_std)) or np.any(norm_std == 0):
                raise node.error("normalisation divides by zero")
            has_norm = True
        else:
            raise node.error("unsupported operator")

        if block is not None:
            blocks.append(block)
            last_affine = (out, block) if isinstance(block, (Linear, Conv2d)) else None
        elif op in ("Identity", "Dropout") and last_affine is not None and last_affine[0] == cur:
            last_affine = (out, last_affine[1])
        else:
            last_affine = None
        cur, cur_shape = out, new_shape
        chain_shapes[out] = cur_shape

    outputs = [o.name for o in graph.output]
    if outputs != [cur]:
        raise ModelFormatError(_one_line(
            f"{path}: graph outputs {outputs} are not exactly the end {cur!r} of the single "
            "chain from the input (non-chain graph)"))

    if mean is not None or std is not None:
        if has_norm:
            raise ModelFormatError(f"{path}: the graph already normalises its input (leading "
                                   "Sub/Div); do not also pass mean/std")
        norm_mean = _per_channel_arg(path, "mean", mean, len(norm_mean), 0.0)
        norm_std = _per_channel_arg(path, "std", std, len(norm_std), 1.0)
        if np.any(norm_std == 0):
            raise ModelFormatError(f"{path}: std contains 0")
    normalize = Normalize(tuple(float(v) for v in norm_mean), tuple(float(v) for v in norm_std),
                          dtype=precision)
    stem = path.name
    for suffix in (".gz", ".onnx"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    net = Net([normalize, *blocks], input_shape, name=stem)
    net.precision = precision  # what the model runs in (pipeline.certify.fp_error)
    try:
        net.shapes()
    except Exception as err:  # a mismatch the per-node checks missed
        raise ModelFormatError(_one_line(f"{path}: the converted network does not run on "
                                         f"input {input_shape} ({err})")) from None
    return net


def _per_channel_arg(path: Path, what: str, values: tuple[float, ...] | None, n: int,
                     default: float) -> np.ndarray:
    if values is None:
        return np.full(n, default)
    arr = np.asarray(values, np.float64).reshape(-1)
    if arr.size == 1:
        return np.full(n, arr[0])
    if arr.size != n:
        raise ModelFormatError(f"{path}: {what} has {arr.size} values; expected 1 or {n}")
    return arr


def _linear(weight: np.ndarray, bias: np.ndarray, dtype: torch.dtype = torch.float32) -> Linear:
    block = Linear(weight.shape[1], weight.shape[0]).to(dtype)
    with torch.no_grad():
        block.weight.copy_(torch.as_tensor(weight, dtype=dtype))
        block.bias.copy_(torch.as_tensor(bias, dtype=dtype))
    return block


def _conv(node: _Node, shape: tuple[int, ...], names: list[str],
          consts: dict[str, np.ndarray], dtype: torch.dtype = torch.float32
          ) -> tuple[Conv2d, tuple[int, ...]]:
    attrs = node.attrs({"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"})
    if len(shape) != 3:
        raise node.error(f"Conv on an input of shape {shape} (only (batch, C, H, W))")
    weight = np.asarray(consts[names[1]], np.float64)
    if weight.ndim != 4 or weight.shape[1] != shape[0]:
        raise node.error(f"Conv weight of shape {weight.shape} does not fit {shape[0]} input "
                         "channels (only 2-D convolutions)")
    out_ch, _, kh, kw = weight.shape
    bias = (np.asarray(consts[names[2]], np.float64).reshape(-1)
            if len(names) > 2 and names[2] else np.zeros(out_ch))
    if bias.shape != (out_ch,):
        raise node.error(f"Conv bias of shape {bias.shape}, expected ({out_ch},)")
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in ("NOTSET", "VALID", ""):
        raise node.error(f"auto_pad={auto_pad} (only NOTSET/VALID with explicit pads)")
    if any(d != 1 for d in attrs.get("dilations", [1, 1])):
        raise node.error(f"dilations={list(attrs['dilations'])} (only 1)")
    if attrs.get("group", 1) != 1:
        raise node.error(f"group={attrs['group']} (only 1)")
    if "kernel_shape" in attrs and list(attrs["kernel_shape"]) != [kh, kw]:
        raise node.error(f"kernel_shape {list(attrs['kernel_shape'])} does not match weight "
                         f"{weight.shape}")
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
        raise node.error(f"pads={pads} (only symmetric [ph, pw, ph, pw])")
    strides = list(attrs.get("strides", [1, 1]))
    if len(strides) != 2 or min(strides) < 1:
        raise node.error(f"strides={strides}")
    c, h, w = shape
    oh = (h + 2 * pads[0] - kh) // strides[0] + 1
    ow = (w + 2 * pads[1] - kw) // strides[1] + 1
    if oh <= 0 or ow <= 0:
        raise node.error(f"kernel {kh}x{kw} larger than the padded input {h}x{w}")
    block = Conv2d(c, out_ch, (kh, kw), stride=tuple(strides),
                   padding=(pads[0], pads[1])).to(dtype)
    with torch.no_grad():
        block.weight.copy_(torch.as_tensor(weight, dtype=dtype))
        block.bias.copy_(torch.as_tensor(bias, dtype=dtype))
    return block, (out_ch, oh, ow)


def _gemm(node: _Node, cur: str, shape: tuple[int, ...], names: list[str],
          consts: dict[str, np.ndarray], dtype: torch.dtype = torch.float32
          ) -> tuple[Linear, tuple[int, ...]]:
    attrs = node.attrs({"alpha", "beta", "transA", "transB", "broadcast"})
    if attrs.get("transA", 0):
        raise node.error("transA=1 is unsupported")
    if names[0] != cur or len(shape) != 1:
        raise node.error("Gemm supported only as (batch, N) x constant B (+ constant C)")
    b = np.asarray(consts[names[1]], np.float64)
    if b.ndim != 2:
        raise node.error(f"Gemm B of shape {b.shape} (only 2-D)")
    weight = b if attrs.get("transB", 0) else b.T  # (out, in)
    if weight.shape[1] != shape[0]:
        raise node.error(f"Gemm B of shape {b.shape} does not fit {shape[0]} input features")
    weight = weight * float(attrs.get("alpha", 1.0))
    n_out = weight.shape[0]
    bias = np.zeros(n_out)
    if len(names) > 2 and names[2]:
        c = np.asarray(consts[names[2]], np.float64)
        try:
            bias = np.broadcast_to(c, (1, n_out))[0] * float(attrs.get("beta", 1.0))
        except ValueError:
            raise node.error(f"Gemm C of shape {c.shape} (only broadcastable to (1, "
                             f"{n_out}))") from None
    return _linear(weight, bias, dtype), (n_out,)


def _add_bias(node: _Node, block: nn.Module, const: np.ndarray, shape: tuple[int, ...]) -> None:
    """Fold ``+ const`` into the bias of the Linear/Conv2d block that produced the tensor."""
    value = _per_channel(node, const, shape)
    with torch.no_grad():
        block.bias.add_(torch.as_tensor(value, dtype=block.bias.dtype))


# --------------------------------------------------------------------------------------------
# VNN-LIB
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Disjunct:
    """A conjunction of linear constraints ``A y <= b`` over the network outputs."""

    A: np.ndarray  # (m, n_outputs) float64
    b: np.ndarray  # (m,) float64
    strict: np.ndarray | None = None  # (m,) bool: the row is A_i y < b_i (from < or >)
    # The rows as written: per row ({output j: coefficient}, b) in exact rationals.
    exact: tuple[tuple[dict[int, Fraction], Fraction], ...] | None = None

    def holds(self, y: np.ndarray, tol: float = 0.0) -> bool:
        """Whether the output vector ``y`` satisfies every constraint (within ``tol``; strict
        rows strictly), in exact rational arithmetic on the values of y and the constraints as
        written (the float64 A, b when the rows were not parsed)."""
        yf = [Fraction(float(v)) for v in np.asarray(y, np.float64).reshape(-1)]
        strict = np.zeros(len(self.b), bool) if self.strict is None else self.strict
        rows = self.exact if self.exact is not None else tuple(
            ({j: Fraction(float(c)) for j, c in enumerate(a) if c != 0}, Fraction(float(b)))
            for a, b in zip(self.A, self.b))
        for (coefs, b), st in zip(rows, strict):
            value = sum((c * yf[j] for j, c in coefs.items()), Fraction(0)) - b \
                - Fraction(float(tol))
            if not (value < 0 if st else value <= 0):
                return False
        return True


@dataclass(frozen=True, eq=False)
class VnnlibProperty:
    """Unsafe (sat) iff some x in [lower, upper] gives outputs satisfying some disjunct."""

    lower: np.ndarray  # input_shape, float64 (rounded outwards)
    upper: np.ndarray  # input_shape, float64 (rounded outwards)
    disjuncts: tuple[Disjunct, ...]
    # The box as written: per input (lower, upper, lower strict, upper strict), exact.
    exact_box: tuple[tuple[Fraction, Fraction, bool, bool], ...] | None = None

    def contains(self, x: np.ndarray) -> bool:
        """Whether the input ``x`` lies in the box exactly as written (strict bounds strictly;
        the float64 box when it was not parsed)."""
        flat = np.asarray(x, np.float64).reshape(-1)
        if self.exact_box is None:
            return bool(np.all(flat >= self.lower.reshape(-1)) and
                        np.all(flat <= self.upper.reshape(-1)))
        for v, (lo, up, lo_strict, up_strict) in zip(flat, self.exact_box):
            if not math.isfinite(v):
                return False
            f = Fraction(float(v))
            if not ((f > lo if lo_strict else f >= lo) and (f < up if up_strict else f <= up)):
                return False
        return True

    @property
    def n_outputs(self) -> int:
        return int(self.disjuncts[0].A.shape[1]) if self.disjuncts else 0

    def is_violated_by(self, y: np.ndarray, tol: float = 0.0) -> bool:
        """Whether the output ``y`` (of an x in the box) is a counterexample."""
        return any(d.holds(y, tol) for d in self.disjuncts)

    def is_robustness_of(self) -> int | None:
        """The label k if the disjuncts are exactly {y_j >= y_k : j != k}, else None."""
        n = self.n_outputs
        if n < 2 or len(self.disjuncts) != n - 1:
            return None
        label, others = None, set()
        for d in self.disjuncts:
            if d.A.shape[0] != 1 or d.b[0] != 0 or (d.strict is not None and d.strict.any()):
                return None  # strict rows (Y_j > Y_k) go through the general path
            row = d.A[0]
            pos, neg = np.flatnonzero(row > 0), np.flatnonzero(row < 0)
            if len(pos) != 1 or len(neg) != 1 or row[pos[0]] != -row[neg[0]]:
                return None
            k, j = int(pos[0]), int(neg[0])  # -y_j + y_k <= 0  <=>  y_j >= y_k
            if label is None:
                label = k
            if k != label or j in others:
                return None
            others.add(j)
        if others != set(range(n)) - {label}:
            return None
        return label


class _SList(list):
    """A parsed s-expression list, with the text offset of its opening parenthesis."""

    __slots__ = ("pos",)


_TOKEN = re.compile(r";[^\n]*|\(|\)|[^\s();]+")
_VAR = re.compile(r"([XY])_(\d+)$")
_IGNORED = {"check-sat", "get-model", "set-logic", "set-info", "set-option", "exit",
            "declare-fun"}


class _Vnnlib:
    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text = path, text

    def line(self, pos: int) -> int:
        return self.text.count("\n", 0, pos) + 1

    def error(self, pos: int | None, problem: str) -> PropertyFormatError:
        where = f"{self.path}:{self.line(pos)}" if pos is not None else f"{self.path}"
        return PropertyFormatError(_one_line(f"{where}: {problem}"))

    def parse(self) -> list[_SList]:
        stack: list[_SList] = []
        top: list[_SList] = []
        for match in _TOKEN.finditer(self.text):
            tok = match.group()
            c = tok[0]
            if c == ";":
                continue
            if c == "(":
                node = _SList()
                node.pos = match.start()
                if stack:
                    stack[-1].append(node)
                stack.append(node)
            elif c == ")":
                if not stack:
                    raise self.error(match.start(), "unbalanced ')'")
                node = stack.pop()
                if not stack:
                    top.append(node)
            else:
                if not stack:
                    raise self.error(match.start(), f"token {tok!r} outside parentheses")
                stack[-1].append(tok)
        if stack:
            raise self.error(stack[-1].pos, "unbalanced '(' (not closed by the end of file)")
        return top


def _number(tok: str) -> Fraction | None:
    """The exact value of a numeral (decimal, exponent or a rational like 1/3)."""
    try:
        value = Fraction(tok)
    except (ValueError, ZeroDivisionError):
        return None
    return value if abs(value) <= _FLOAT_MAX else None  # beyond float64: unusable


_FLOAT_MAX = Fraction(np.finfo(np.float64).max)


def _outward(value: Fraction, up: bool) -> float:
    """The float64 nearest ``value`` on the outside: >= value if ``up``, else <= value."""
    f = float(value)
    if up and Fraction(f) < value:
        f = float(np.nextafter(f, np.inf))
    elif not up and Fraction(f) > value:
        f = float(np.nextafter(f, -np.inf))
    return f


def load_vnnlib(path: str | Path, input_shape: tuple[int, ...]) -> VnnlibProperty:
    """A VNN-LIB property (plain or gzipped) over a network with the given input shape."""
    path = Path(path)
    input_shape = tuple(int(s) for s in input_shape)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PropertyFormatError(f"{path}: no such file") from None
    except OSError as err:
        raise PropertyFormatError(_one_line(f"{path}: cannot read ({err})")) from None
    if data[:2] == b"\x1f\x8b" or path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise PropertyFormatError(_one_line(f"{path}: bad gzip data ({err})")) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PropertyFormatError(_one_line(f"{path}: not a text file ({err})")) from None
    doc = _Vnnlib(path, text)
    commands = doc.parse()

    n_inputs = int(np.prod(input_shape))
    declared: dict[str, dict[int, int]] = {"X": {}, "Y": {}}  # kind -> index -> pos
    assertions: list[tuple[Any, int]] = []
    for cmd in commands:
        if not cmd or not isinstance(cmd[0], str):
            raise doc.error(cmd.pos, "expected a command like (declare-const ...) or (assert ...)")
        head = cmd[0]
        if head == "declare-const":
            if len(cmd) != 3 or not isinstance(cmd[1], str) or cmd[2] != "Real":
                raise doc.error(cmd.pos, "expected (declare-const <X_i|Y_j> Real)")
            m = _VAR.match(cmd[1])
            if not m:
                raise doc.error(cmd.pos, f"variable {cmd[1]!r}: only X_<i> (inputs) and Y_<j> "
                                         "(outputs) are supported")
            kind, idx = m.group(1), int(m.group(2))
            if idx in declared[kind]:
                raise doc.error(cmd.pos, f"{cmd[1]} declared twice")
            declared[kind][idx] = cmd.pos
        elif head == "assert":
            if len(cmd) != 2:
                raise doc.error(cmd.pos, "expected (assert <formula>)")
            assertions.append((cmd[1], cmd.pos))
        elif head in _IGNORED:
            if head == "declare-fun":
                raise doc.error(cmd.pos, "declare-fun is unsupported (use declare-const)")
        else:
            raise doc.error(cmd.pos, f"unsupported command {head!r}")

    xs, ys = declared["X"], declared["Y"]
    if len(xs) != n_inputs or (xs and max(xs) != len(xs) - 1):
        raise doc.error(None, f"declares {len(xs)} input variables X_i (indices "
                              f"{min(xs, default=None)}..{max(xs, default=None)}), but the "
                              f"input shape {input_shape} needs X_0..X_{n_inputs - 1}")
    if not ys or max(ys) != len(ys) - 1:
        raise doc.error(None, f"declares {len(ys)} output variables; expected Y_0..Y_<m-1> "
                              "with m >= 1")
    n_out = len(ys)

    lower = np.full(n_inputs, -np.inf)
    upper = np.full(n_inputs, np.inf)
    exact_lower: list[tuple[Fraction, bool] | None] = [None] * n_inputs
    exact_upper: list[tuple[Fraction, bool] | None] = [None] * n_inputs
    # Output constraint: a conjunction (over assertions) of DNFs; each DNF a list of row lists.
    output_dnfs: list[list[list[tuple[np.ndarray, float, bool]]]] = []

    def linear(expr: Any, pos: int) -> tuple[dict[tuple[str, int], float], float]:
        """A linear term as ({(kind, index): coefficient}, constant)."""
        if isinstance(expr, str):
            value = _number(expr)
            if value is not None:
                return {}, value
            m = _VAR.match(expr)
            if not m:
                raise doc.error(pos, f"unknown symbol {expr!r}")
            kind, idx = m.group(1), int(m.group(2))
            if idx not in declared[kind]:
                raise doc.error(pos, f"undeclared variable {expr}")
            return {(kind, idx): Fraction(1)}, Fraction(0)
        if not expr or not isinstance(expr[0], str):
            raise doc.error(expr.pos, "expected a term")
        op, args = expr[0], [linear(a, getattr(a, "pos", pos)) for a in expr[1:]]
        if not args:
            raise doc.error(expr.pos, f"({op}) without arguments")
        if op == "+" or (op == "-" and len(args) > 1):
            coefs, const = dict(args[0][0]), args[0][1]
            sign = 1 if op == "+" else -1
            for c, k in args[1:]:
                for var, v in c.items():
                    coefs[var] = coefs.get(var, Fraction(0)) + sign * v
                const += sign * k
            return coefs, const
        if op == "-":
            return {var: -v for var, v in args[0][0].items()}, -args[0][1]
        if op == "*":
            coefs, const = {}, Fraction(1)
            for c, k in args:
                if c and coefs:
                    raise doc.error(expr.pos, "non-linear product of variables")
                if c:
                    coefs = {var: v * const for var, v in c.items()}
                    const = k * const
                else:
                    coefs = {var: v * k for var, v in coefs.items()}
                    const *= k
            return coefs, const
        if op == "/" and len(args) == 2 and not args[1][0] and args[1][1] != 0:
            d = args[1][1]
            return {var: v / d for var, v in args[0][0].items()}, args[0][1] / d
        raise doc.error(expr.pos, f"unsupported term operator {op!r} (only + - * / by "
                                  "constants)")

    def atom_rows(expr: _SList) -> tuple[str | None, list[tuple[dict, float]]]:
        """(kind 'X'/'Y'/None, rows (coefs, b) meaning coefs . v <= b, or < b for < and >)."""
        op = expr[0]
        if len(expr) != 3:
            raise doc.error(expr.pos, f"({op} ...) needs exactly two arguments")
        (lc, lk), (rc, rk) = linear(expr[1], expr.pos), linear(expr[2], expr.pos)
        diff = dict(lc)
        for var, v in rc.items():
            diff[var] = diff.get(var, Fraction(0)) - v
        diff = {var: v for var, v in diff.items() if v != 0}
        b = rk - lk  # L - R <= 0  <=>  (lc - rc) . v <= rk - lk
        rows: list[tuple[dict, float]]
        if op in ("<=", "<"):
            rows = [(diff, b)]
        elif op in (">=", ">"):
            rows = [({var: -v for var, v in diff.items()}, -b)]
        else:  # "="
            rows = [(diff, b), ({var: -v for var, v in diff.items()}, -b)]
        kinds = {var[0] for var in diff}
        if len(kinds) > 1:
            raise doc.error(expr.pos, "constraint mixes inputs X and outputs Y")
        return (kinds.pop() if kinds else None), rows

    def input_bound(rows: list[tuple[dict, float]], pos: int, strict: bool = False) -> None:
        for coefs, b in rows:
            if len(coefs) != 1:
                raise doc.error(pos, "input constraints must bound a single X_i by a constant")
            ((_, idx), a), = coefs.items()
            edge = b / a
            # The tightest bound wins; at equal values a strict one (X_i < c excludes c).
            if a > 0:
                old = exact_upper[idx]
                if old is None or edge < old[0] or (edge == old[0] and strict):
                    exact_upper[idx] = (edge, strict)
                upper[idx] = _outward(exact_upper[idx][0], up=True)
            else:
                old = exact_lower[idx]
                if old is None or edge > old[0] or (edge == old[0] and strict):
                    exact_lower[idx] = (edge, strict)
                lower[idx] = _outward(exact_lower[idx][0], up=False)

    def output_dnf(expr: Any) -> list[list[tuple[np.ndarray, float, bool]]]:
        if not isinstance(expr, _SList) or not expr or not isinstance(expr[0], str):
            pos = getattr(expr, "pos", None)
            raise doc.error(pos if pos is not None else 0, f"expected a formula, got {expr!r}")
        op = expr[0]
        if op in ("<=", ">=", "<", ">", "="):
            kind, rows = atom_rows(expr)
            if kind == "X":
                raise doc.error(expr.pos, "input constraints inside or/and over outputs are "
                                          "unsupported (inputs must be a box)")
            dense = []
            for coefs, b in rows:
                a = np.zeros(n_out)
                for (_, j), v in coefs.items():
                    a[j] = float(v)
                exact = ({j: v for (_, j), v in coefs.items()}, b)
                dense.append((a, float(b), op in ("<", ">"), exact))
            return [dense]
        if op == "and":
            result: list[list[tuple[np.ndarray, float, bool]]] = [[]]
            for sub in expr[1:]:
                result = [r + s for r in result for s in output_dnf(sub)]
                if len(result) > 100_000:
                    raise doc.error(expr.pos, "disjunctive normal form too large")
            return result
        if op == "or":
            if len(expr) == 1:
                raise doc.error(expr.pos, "empty (or)")
            return [d for sub in expr[1:] for d in output_dnf(sub)]
        raise doc.error(expr.pos, f"unsupported formula operator {op!r} (only and, or, <=, >=, "
                                  "<, >, =)")

    def collect(expr: Any, pos: int) -> None:
        """Split top-level conjunctions; input atoms become bounds, the rest output DNFs."""
        if isinstance(expr, _SList) and expr and expr[0] == "and":
            for sub in expr[1:]:
                collect(sub, getattr(sub, "pos", pos))
            return
        if isinstance(expr, _SList) and expr and expr[0] in ("<=", ">=", "<", ">", "="):
            kind, rows = atom_rows(expr)
            if kind == "X":
                input_bound(rows, expr.pos, strict=expr[0] in ("<", ">"))
                return
            if kind is None:
                raise doc.error(expr.pos, "constraint without variables")
        if isinstance(expr, str):
            raise doc.error(pos, f"expected a formula, got {expr!r}")
        output_dnfs.append(output_dnf(expr))

    for formula, pos in assertions:
        collect(formula, pos)

    missing_lo, missing_up = np.flatnonzero(~np.isfinite(lower)), np.flatnonzero(
        ~np.isfinite(upper))
    if len(missing_lo) or len(missing_up):
        which = "lower" if len(missing_lo) else "upper"
        first = int((missing_lo if len(missing_lo) else missing_up)[0])
        count = len(set(missing_lo) | set(missing_up))
        raise doc.error(None, f"missing {which} bound for X_{first} ({count} input variables "
                              "without both bounds)")
    empty = np.flatnonzero(lower > upper)
    empty_exact = [i for i, (lo, up) in enumerate(zip(exact_lower, exact_upper))
                   if lo[0] > up[0] or (lo[0] == up[0] and (lo[1] or up[1]))]
    if empty_exact and not len(empty):
        i = empty_exact[0]
        raise doc.error(None, f"empty input box: X_{i} in {'(' if exact_lower[i][1] else '['}"
                              f"{float(exact_lower[i][0])}, {float(exact_upper[i][0])}"
                              f"{')' if exact_upper[i][1] else ']'}")
    if len(empty):
        i = int(empty[0])
        raise doc.error(None, f"empty input box: X_{i} in [{lower[i]}, {upper[i]}]")
    if not output_dnfs:
        raise doc.error(None, "no assertion over the outputs Y")

    dnf: list[list[tuple[np.ndarray, float, bool]]] = [[]]
    for part in output_dnfs:
        dnf = [r + s for r in dnf for s in part]
        if len(dnf) > 100_000:
            raise doc.error(None, "disjunctive normal form too large")
    disjuncts = []
    for rows in dnf:
        a = np.array([r[0] for r in rows], np.float64).reshape(len(rows), n_out)
        b = np.array([r[1] for r in rows], np.float64)
        strict = np.array([r[2] for r in rows], bool)
        a.flags.writeable = False
        b.flags.writeable = False
        strict.flags.writeable = False
        disjuncts.append(Disjunct(a, b, strict, tuple(r[3] for r in rows)))
    lower = lower.reshape(input_shape)
    upper = upper.reshape(input_shape)
    lower.flags.writeable = False
    upper.flags.writeable = False
    exact_box = tuple((lo[0], up[0], lo[1], up[1]) for lo, up in zip(exact_lower, exact_upper))
    return VnnlibProperty(lower, upper, tuple(disjuncts), exact_box)

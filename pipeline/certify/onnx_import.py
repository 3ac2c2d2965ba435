"""Networks from ONNX files (as in VNN-COMP): a feed-forward ReLU graph becomes a pipeline Net.

    from pipeline.certify.onnx_import import load_onnx
    net = load_onnx("mnist_0.1.onnx", mean=(0.1307,), std=(0.3081,))
    net.precision                   # torch.float32 (a FLOAT model) or torch.float64 (DOUBLE)

The CLI takes ONNX files with ``python -m pipeline.certify --model NET.onnx ...`` (README);
VNN-LIB properties over such a network are read by :mod:`pipeline.certify.vnnlib`.

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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.certify.input_files import one_line, read_maybe_gzipped
from pipeline.layers import Conv2d, Flatten, Linear, Normalize, ReLU
from pipeline.nets import Net

__all__ = ["ModelFormatError", "load_onnx"]


class ModelFormatError(ValueError):
    """An ONNX file that cannot be turned into a Net (one line: file, node, what is supported)."""


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
        return ModelFormatError(one_line(f"{self.path}: {label}: {problem}; {_SUPPORTED}"))

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
            raise ModelFormatError(one_line(
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
        raise ModelFormatError(one_line(
            f"{path}: input {name!r} has shape {shown}; supported: (batch, C, H, W) or "
            "(batch, N) with concrete non-batch dimensions"))
    return tuple(int(d) for d in dims[1:])


def _read_model(path: Path) -> Any:
    import onnx

    data = read_maybe_gzipped(path, ModelFormatError, "not an ONNX file (bad gzip: {err})")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as err:  # protobuf DecodeError and friends
        raise ModelFormatError(one_line(
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
            raise ModelFormatError(one_line(
                f"{path}: initializer {init.name!r} unreadable ({err})")) from None
    real_inputs = [v.name for v in graph.input if v.name not in consts]
    if len(real_inputs) != 1:
        raise ModelFormatError(one_line(
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
        raise ModelFormatError(one_line(
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
        raise ModelFormatError(one_line(f"{path}: the converted network does not run on "
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
    return _with_params(Linear(weight.shape[1], weight.shape[0]), weight, bias, dtype)


def _with_params(block: nn.Module, weight: np.ndarray, bias: np.ndarray, dtype: torch.dtype
                 ) -> nn.Module:
    """``block`` in ``dtype`` with the given weight and bias (converted straight from float64)."""
    block = block.to(dtype)
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
    block = Conv2d(c, out_ch, (kh, kw), stride=tuple(strides), padding=(pads[0], pads[1]))
    return _with_params(block, weight, bias, dtype), (out_ch, oh, ow)


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

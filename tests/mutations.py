"""Mutations of valid inputs for the fuzz tests: ONNX models (bytes and graph structure) and plans.
Each takes a random.Random (hypothesis supplies it, so failures replay) and says what it did."""
from __future__ import annotations

import copy
import json
import random
from typing import Any

import onnx
from onnx import TensorProto

OPS = ["Add", "Mul", "MatMul", "Softmax", "Relu", "Gather", "Reshape", "Transpose", "Identity",
       "Concat", "Where", "Expand", "NotAnOp"]
ELEM_TYPES = [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.INT32,
              TensorProto.BOOL, TensorProto.STRING, 0, 99]


def _node(g, rng):
    return g.node[rng.randrange(len(g.node))]


def _value_names(g) -> list[str]:
    return [o for n in g.node for o in n.output] + [i.name for i in g.input] + [t.name for t in g.initializer]


def _op_type(m, rng):
    n = _node(m.graph, rng)
    n.op_type = rng.choice(OPS)
    return f"node {n.name} becomes {n.op_type}"


def _delete_node(m, rng):
    n = _node(m.graph, rng)
    m.graph.node.remove(n)
    return f"node {n.name} deleted"


def _rewire(m, rng):
    n = _node(m.graph, rng)
    if not n.input:
        return "no-op"
    k = rng.randrange(len(n.input))
    n.input[k] = rng.choice(_value_names(m.graph) + ["nowhere", ""])
    return f"node {n.name} input {k} → {n.input[k]!r}"


def _attribute(m, rng):
    nodes = [n for n in m.graph.node if n.attribute]
    if not nodes:
        return "no-op"
    a = rng.choice(nodes).attribute
    attr = a[rng.randrange(len(a))]
    if attr.type == onnx.AttributeProto.INT:
        attr.i = rng.choice([-5, -1, 0, 1, 2, 3, 7, 1 << 40])
    elif attr.type == onnx.AttributeProto.INTS:
        attr.ints[:] = [rng.randint(-3, 5) for _ in range(rng.randint(0, 5))]
    elif attr.type == onnx.AttributeProto.FLOAT:
        attr.f = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e30])
    elif attr.type == onnx.AttributeProto.TENSOR:
        attr.t.dims[:] = [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]
    else:
        attr.type = rng.choice([onnx.AttributeProto.INT, onnx.AttributeProto.STRING])
    return f"attribute {attr.name} changed"


def _initializer(m, rng):
    if not m.graph.initializer:
        return "no-op"
    t = m.graph.initializer[rng.randrange(len(m.graph.initializer))]
    how = rng.choice(["dims", "dtype", "data", "drop", "external"])
    if how == "dims":
        t.dims[:] = [rng.randint(0, 70) for _ in range(rng.randint(0, 4))]
    elif how == "dtype":
        t.data_type = rng.choice(ELEM_TYPES)
    elif how == "data":
        t.raw_data = t.raw_data[: rng.randint(0, len(t.raw_data))]
    elif how == "drop":
        m.graph.initializer.remove(t)
    else:
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        entry = t.external_data.add()
        entry.key, entry.value = "location", rng.choice(["../escape.bin", "/etc/passwd", "missing.bin",
                                                          "sub/../../x.bin", ""])
    return f"initializer {t.name}: {how}"


def _opset(m, rng):
    m.opset_import[0].version = rng.choice([1, 7, 13, 17, 18, 21, 23, 99])
    return f"opset {m.opset_import[0].version}"


def _graph_io(m, rng):
    v = rng.choice(list(m.graph.input) + list(m.graph.output))
    how = rng.choice(["dtype", "rank", "name"])
    if how == "dtype":
        v.type.tensor_type.elem_type = rng.choice(ELEM_TYPES)
    elif how == "rank":
        dims = v.type.tensor_type.shape.dim
        if dims:
            del dims[-1]
    else:
        v.name = rng.choice(["pixel_values", "x", ""])
    return f"graph io {v.name}: {how}"


def _duplicate(m, rng):
    n = _node(m.graph, rng)
    m.graph.node.insert(rng.randrange(len(m.graph.node)), copy.deepcopy(n))
    return f"node {n.name} duplicated"


STRUCTURAL = [_op_type, _delete_node, _rewire, _attribute, _initializer, _opset, _graph_io, _duplicate]


def mutate_onnx(model: onnx.ModelProto, rng: random.Random) -> tuple[bytes, str]:
    """The bytes of a mutated copy of `model`: 1–3 structural mutations, or damaged bytes."""
    m = copy.deepcopy(model)
    what = [rng.choice(STRUCTURAL)(m, rng) for _ in range(rng.randint(1, 3))]
    data = m.SerializeToString()
    kind = rng.random()
    if kind < 0.15:
        data = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        what.append("bytes flipped")
    elif kind < 0.25:
        data = data[: rng.randrange(len(data))]
        what.append("truncated")
    return bytes(data), "; ".join(what)


# ---- plans ------------------------------------------------------------------------------------

JUNK: list[Any] = [None, True, -1, 0, 1, 2, 3, 7, 1 << 62, 0.5, float("nan"), float("inf"), "", "x",
                   "attn_pattern", [], [0], [3, 1], [[0]], [[4, 4.0, 0.0]], [4, 4.0, 0.0], [None, None], {},
                   {"channels": [1]}]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def mutate_plan(plan: dict, rng: random.Random) -> tuple[dict | Any, str]:
    """A plan with 1–3 values replaced by junk, deleted, or lists shortened/extended."""
    p = copy.deepcopy(plan)
    what = []
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(_paths(p)))
        if not path:
            return rng.choice(JUNK), "whole plan replaced"
        parent = p
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        how = rng.choice(["junk", "junk", "delete", "grow"])
        if how == "delete":
            del parent[key]
        elif how == "grow" and isinstance(parent[key], list):
            parent[key].append(copy.deepcopy(rng.choice(parent[key] or JUNK)))
        else:
            parent[key] = copy.deepcopy(rng.choice(JUNK))
        what.append(f"{how} {'/'.join(map(str, path))}")
    return json.loads(json.dumps(p)), "; ".join(what)

"""GroupQueryAttention, as onnxruntime-genai's model builder writes it: q, k and v (packed from one
MatMul, or three inputs) [B, S, heads·D], rotary embedding from cos/sin caches (do_rotary), this
step's keys and values appended to the past caches [B, kv heads, past, D] and returned as present,
keys and values repeated over each KV head's group of query heads, a causal softmax attention:

    q, k = rope(q, past + s), rope(k, past + s)    with past = total_sequence_length - S
    present_k = concat(past_k, k);  present_v = concat(past_v, v)
    out = softmax(q · repeat(present_k)ᵀ · scale + causal) · repeat(present_v)

Written back in the standard ops an Optimum `text-generation-with-past` export holds, which
recognition reads and whose KV cache tailor keeps consistent (onnx_kv_cache): a packed projection
is cut into its q, k and v MatMuls; rope as x·cos + rotate_half(x)·sin; the head counts as literal
Reshape/Expand sizes (onnx_surgery.set_head_counts edits them).

Positions come from total_sequence_length (the attention mask's length) as one offset for the
whole batch: the op's definition for sequences that fill the mask, which is how onnxruntime-genai
and tailor's runtime feed a sequence. seqlens_k, which only padded batches need, is not read.
Attribute combinations this form does not compute are refused by name (`check`)."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tailor.rewriter.quantized.weights import NBitsLinear, quantized_linear
from tailor.rewriter.unfuse.base import UnfuseRule, constant, given, used

QUERY, KEY, VALUE, PAST_KEY, PAST_VALUE, SEQLENS_K, TOTAL_LENGTH, COS, SIN = range(9)
# inputs after sin_cache (position_ids, attention_bias, head_sink) change what the op computes
LAST_READ = SIN


class GroupQueryAttention(UnfuseRule):
    op_types = ("GroupQueryAttention",)

    def check(self, node: ir.Node) -> str | None:
        attrs = node.attributes
        if attrs.get_float("softcap", 0.0) != 0.0:
            return "softcap"
        if attrs.get_int("local_window_size", -1) != -1:
            return "a sliding window (local_window_size)"
        if attrs.get_int("smooth_softmax", 0) or attrs.get_int("qk_output", 0):
            return "smooth_softmax or qk_output"
        if not attrs.get_int("do_rotary", 0):
            return "no rotary embedding inside the op (do_rotary=0)"
        if attrs.get_int("rotary_interleaved", 0):
            return "interleaved rotary embedding"
        extra = [i for i in range(LAST_READ + 1, len(node.inputs)) if given(node, i) is not None]
        if extra:
            return "position_ids, attention_bias or head_sink inputs"
        if any(given(node, i) is None for i in (PAST_KEY, PAST_VALUE, TOTAL_LENGTH, COS, SIN)):
            return "no past key/value caches, total_sequence_length or cos/sin caches"
        if (given(node, KEY) is None) != (given(node, VALUE) is None):
            return "a key without a value"
        cos = node.inputs[COS].shape
        head = _head_size(node)
        if head is None or cos is None or len(cos) != 2 or cos[1] != head // 2:
            return "a rotary embedding over part of the head (or of unknown size)"
        if any(used(o) for o in node.outputs[3:]):
            return "its attention-scores output is read"
        return None

    def rewrite(self, tape: ir.tape.Tape, node: ir.Node) -> list[ir.Value | None]:
        heads, kv_heads = node.attributes.get_int("num_heads"), node.attributes.get_int("kv_num_heads")
        head = _head_size(node)
        scale = node.attributes.get_float("scale", 0.0) or 1.0 / np.sqrt(head)
        if given(node, KEY) is None:
            q, k, v = split_packed(tape, node, [heads * head, kv_heads * head, kv_heads * head])
        else:
            q, k, v = node.inputs[QUERY], node.inputs[KEY], node.inputs[VALUE]
        length = tape.op("Shape", [q], attributes={"start": 1, "end": 2},
                         output=ir.Value(type=ir.TensorType(ir.DataType.INT64)))
        total = _int64(tape, tape.op("Reshape", [node.inputs[TOTAL_LENGTH], _ints(tape, node, "one", [1])]))
        past = tape.op("Sub", [total, length])
        cos = _rows(tape, node, node.inputs[COS], past, total)
        sin = _rows(tape, node, node.inputs[SIN], past, total)
        q = _rope(tape, node, _heads(tape, node, q, heads, head), cos, sin, head)
        k = _rope(tape, node, _heads(tape, node, k, kv_heads, head), cos, sin, head)
        present_k = tape.op("Concat", [node.inputs[PAST_KEY], k], attributes={"axis": 2})
        present_v = tape.op("Concat", [node.inputs[PAST_VALUE], _heads(tape, node, v, kv_heads, head)],
                            attributes={"axis": 2})
        batch, length_dim = (node.inputs[QUERY].shape or [None, None])[:2]
        for x in (present_k, present_v):
            x.shape = ir.Shape([batch, kv_heads, None, head])
        for cache in (node.inputs[PAST_KEY], node.inputs[PAST_VALUE]):  # the builder names D kv_cache_dim
            if cache.shape is not None and len(cache.shape) == 4 and not isinstance(cache.shape[3], int):
                cache.shape = ir.Shape([*cache.shape[:3], head])
        keys = _repeated(tape, node, present_k, heads, kv_heads, head)
        values = _repeated(tape, node, present_v, heads, kv_heads, head)
        keys_t = tape.op("Transpose", [keys], attributes={"perm": [0, 1, 3, 2]})
        scores = tape.op("Mul", [tape.op("MatMul", [q, keys_t]),
                                 constant(tape, node, "scale", scale, node.inputs[QUERY])])
        scores = tape.op("Add", [scores, _causal(tape, node, past, total)])
        probs = tape.op("Softmax", [scores], attributes={"axis": -1})
        attended = tape.op("MatMul", [probs, values])
        attended.shape = ir.Shape([batch, heads, length_dim, head])  # recognition reads D here
        out = tape.op("Transpose", [attended], attributes={"perm": [0, 2, 1, 3]})
        out = tape.op("Reshape", [out, _ints(tape, node, "merged", [0, 0, -1])])
        out.shape = ir.Shape([batch, length_dim, heads * head])
        return [out, present_k, present_v, None][: len(node.outputs)]


def _head_size(node: ir.Node) -> int | None:
    """D, from the query's width: packed q, k, v hold (heads + 2·kv heads)·D columns."""
    width = node.inputs[QUERY].shape[-1] if node.inputs[QUERY].shape is not None else None
    if not isinstance(width, int):
        return None
    heads, kv_heads = node.attributes.get_int("num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
    return width // (heads + 2 * kv_heads) if given(node, KEY) is None else width // heads


def split_packed(tape: ir.tape.Tape, node: ir.Node, sizes: list[int]) -> list[ir.Value]:
    """q, k and v of a packed projection: where one MatMul of a weight [in, q+k+v] (or one
    MatMulNBits of a 4-bit weight [q+k+v, blocks, blob]) makes it and nothing else reads it, three
    of the weight's output blocks (the q, k and v projections an export holds, which recognition
    and the rewrites read one by one); else a Split."""
    packed = node.inputs[QUERY]
    matmul = packed.producer()
    bounds = np.cumsum([0, *sizes])
    parts = list(zip(bounds[:-1], bounds[1:], "qkv"))
    if matmul is not None and len(packed.uses()) == 1:
        nbits = quantized_linear(matmul)
        if isinstance(nbits, NBitsLinear) and matmul.inputs[1].name:
            return [_nbits_part(tape, matmul, nbits, a, b, p) for a, b, p in parts]
        weight = matmul.inputs[1] if matmul.op_type == "MatMul" and matmul.domain in ("", "ai.onnx") else None
        if weight is not None and weight.const_value is not None and len(weight.shape) == 2:
            w = weight.const_value.numpy()
            stem = (weight.name or "qkv").removesuffix(".weight")
            return [tape.op("MatMul", [matmul.inputs[0], tape.initializer(
                        ir.tensor(w[:, a:b].copy(), name=f"{stem}.{p}.weight"))], name=f"{matmul.name}_{p}")
                    for a, b, p in parts]
    return list(tape.op_multi_out("Split", [packed, _ints(tape, node, "sizes", sizes)],
                                  attributes={"axis": -1}, num_outputs=3))


def _nbits_part(tape: ir.tape.Tape, matmul: ir.Node, nbits: NBitsLinear, start: int, stop: int,
                part: str) -> ir.Value:
    """Output channels start..stop-1 of a MatMulNBits, as one of its own (whole rows of blocks:
    exact)."""
    arrays = nbits.sliced(np.arange(start, stop), None)
    names = {i: f"{matmul.inputs[i].name}.{part}" for i in arrays}
    weights = [tape.initializer(ir.tensor(arrays[i], name=names[i])) if i in arrays else None
               for i in range(1, len(matmul.inputs))]
    inputs = [matmul.inputs[0], *weights]
    attributes = {a.name: a.value for a in matmul.attributes.values()} | {"N": int(stop - start)}
    return tape.op("MatMulNBits", inputs, attributes=attributes, domain=matmul.domain,
                   name=f"{matmul.name}_{part}")


def _ints(tape: ir.tape.Tape, node: ir.Node, what: str, values) -> ir.Value:
    """An int64 initializer named after `node`, made once per name (the rope of q and of k share it)."""
    name = f"{node.name}_{what}"
    made = next((v for v in tape.initializers if v.name == name), None)
    return made or tape.initializer(ir.tensor(np.asarray(values, np.int64), name=name))


def _int64(tape: ir.tape.Tape, x: ir.Value) -> ir.Value:
    return tape.op("Cast", [x], attributes={"to": int(ir.DataType.INT64)},
                   output=ir.Value(type=ir.TensorType(ir.DataType.INT64)))


def _rows(tape: ir.tape.Tape, node: ir.Node, cache: ir.Value, start: ir.Value, end: ir.Value) -> ir.Value:
    """The cache's rows of positions start..end-1, for both halves of the head: [S, D]."""
    half = tape.op("Slice", [cache, start, end, _ints(tape, node, "axis0", [0])])
    return tape.op("Concat", [half, half], attributes={"axis": -1})


def _heads(tape: ir.tape.Tape, node: ir.Node, x: ir.Value, count: int, head: int) -> ir.Value:
    """[B, S, count·D] -> [B, count, S, D]."""
    split = tape.op("Reshape", [x, _ints(tape, node, f"heads{count}", [0, 0, count, head])])
    out = tape.op("Transpose", [split], attributes={"perm": [0, 2, 1, 3]})
    batch, length = (x.shape or [None, None])[:2]
    out.shape = ir.Shape([batch, count, length, head])
    return out


def _rope(tape: ir.tape.Tape, node: ir.Node, x: ir.Value, cos: ir.Value, sin: ir.Value,
          head: int) -> ir.Value:
    """x·cos + rotate_half(x)·sin, rotate_half(x) = concat(-x[..., D/2:], x[..., :D/2])."""
    first = tape.op("Slice", [x, _ints(tape, node, "zero", [0]), _ints(tape, node, "half", [head // 2]),
                              _ints(tape, node, "last", [-1])])
    second = tape.op("Slice", [x, _ints(tape, node, "half", [head // 2]), _ints(tape, node, "head", [head]),
                               _ints(tape, node, "last", [-1])])
    rotated = tape.op("Concat", [tape.op("Neg", [second]), first], attributes={"axis": -1})
    out = tape.op("Add", [tape.op("Mul", [x, cos]), tape.op("Mul", [rotated, sin])])
    out.shape = x.shape
    return out


def _repeated(tape: ir.tape.Tape, node: ir.Node, x: ir.Value, heads: int, kv_heads: int,
              head: int) -> ir.Value:
    """[B, kv, T, D] -> [B, heads, T, D], each KV head repeated over its group (repeat_kv)."""
    if heads == kv_heads:
        return x
    groups = heads // kv_heads
    wide = tape.op("Expand", [tape.op("Unsqueeze", [x, _ints(tape, node, "axis2", [2])]),
                              _ints(tape, node, "groups", [1, kv_heads, groups, 1, 1])])
    out = tape.op("Reshape", [wide, _ints(tape, node, "repeated", [0, heads, -1, head])])
    out.shape = ir.Shape([x.shape[0] if x.shape is not None else None, heads, None, head])
    return out


def _causal(tape: ir.tape.Tape, node: ir.Node, past: ir.Value, total: ir.Value) -> ir.Value:
    """[1, 1, S, T]: 0 where key position j <= query position past + i, else the lowest float
    (laid out as the scores, [batch, heads, queries, keys], as attention patterns read a mask)."""
    one = _ints(tape, node, "step", 1)
    int64 = ir.TensorType(ir.DataType.INT64)
    queries = tape.op("Range", [tape.op("Squeeze", [past]), tape.op("Squeeze", [total]), one],
                      output=ir.Value(type=int64))
    keys = tape.op("Range", [_ints(tape, node, "start", 0), tape.op("Squeeze", [total]), one],
                   output=ir.Value(type=int64))
    seen = tape.op("LessOrEqual", [tape.op("Unsqueeze", [keys, _ints(tape, node, "axis0", [0])]),
                                   tape.op("Unsqueeze", [queries, _ints(tape, node, "axis1", [1])])],
                   output=ir.Value(type=ir.TensorType(ir.DataType.BOOL)))
    seen = tape.op("Unsqueeze", [seen, _ints(tape, node, "batch_heads", [0, 1])],
                   output=ir.Value(type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([1, 1, None, None])))
    like = node.inputs[PAST_KEY]
    lowest = np.finfo(like.dtype.numpy() if like.dtype is not None else np.float32).min
    return tape.op("Where", [seen, constant(tape, node, "zero_score", 0.0, like),
                             constant(tape, node, "lowest", lowest, like)],
                   output=ir.Value(type=ir.TensorType(like.dtype or ir.DataType.FLOAT),
                                   shape=ir.Shape([1, 1, None, None])))

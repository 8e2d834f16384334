"""The shapes a compile runs the model at: the workload, the calibration windows, the attention
profile's and the validation's lengths. An ONNX graph exported without dynamic axes fixes its
batch and length (rewriter.onnx_check.InputShape): where none is given they are its own, and one
it cannot run is refused here, once it is read and before any work."""
from __future__ import annotations

from dataclasses import dataclass

from tailor.backends.runners import takes_logits_to_keep
from tailor.core.errors import TailorError
from tailor.passes.cost import Workload
from tailor.rewriter.capture import Captured, OnnxSource, TorchSource
from tailor.rewriter.onnx_check import InputShape

DEFAULT_PROMPT_LEN = 1024
MIN_ATTN_LEN = 64  # the shortest default attention profile or validation length


@dataclass
class Shapes:
    workload: Workload
    calib_len: int | None       # None: calibration's own default (tailor.stages.calibrate)
    attn_lengths: list[int]     # lengths attention patterns are profiled at
    validation_len: int         # length plans are validated at


def input_shape(cap: Captured) -> InputShape:
    return cap.source.input_shape if isinstance(cap.source, OnnxSource) else InputShape()


def shapes_for(cap: Captured, *, batch: int | None, prompt_len: int | None, gen_len: int,
               calib_len: int | None, attn_lengths: list[int] | None,
               validation_len: int | None) -> Shapes:
    """The shapes asked for, or the defaults: batch 1 and DEFAULT_PROMPT_LEN tokens, or those the
    graph fixes; calibration windows of the fixed length, or for an encoder padded exactly, its
    lines whole (padded); attention lengths prompt_len/2 and prompt_len and validation at 3/4 of it
    where the graph takes them, else at the fixed length. TailorError for any the graph cannot
    take."""
    fixed = input_shape(cap)
    if batch is not None and fixed.batch not in (None, batch):
        raise TailorError(f"{_name(cap)} takes input_ids of fixed batch {fixed.batch}; --batch {batch} "
                          f"is not possible")
    for flag, n in (("--prompt-len", prompt_len), ("--calib-len", calib_len)):
        if n is not None and fixed.length not in (None, n):
            raise TailorError(f"{_name(cap)} takes input_ids of fixed length {fixed.length}; {flag} {n} "
                              f"is not possible")
    limit = cap.graph.max_positions
    asked = (("--prompt-len", [prompt_len]), ("--calib-len", [calib_len]),
             ("--attn-lengths", attn_lengths or []), ("--validation-len", [validation_len]))
    for flag, lengths in asked:
        over = [n for n in lengths if n is not None and limit is not None and n > limit]
        if over:
            raise TailorError(f"{_name(cap)} learns positions for at most {limit} tokens; {flag} {over[0]} "
                              f"is not possible")
    for flag, lengths in (("--attn-lengths", attn_lengths or []), ("--validation-len", [validation_len])):
        bad = [n for n in lengths if n is not None and not fixed.takes(n)]
        if bad:
            shorter = "" if fixed.paddable else (" (shorter inputs would need padding, exact only for "
                                                 "a causal model or one with an attention_mask input)")
            raise TailorError(f"{_name(cap)} takes input_ids of fixed length {fixed.length}{shorter}; "
                              f"{flag} {bad[0]} is not possible")
    prompt = prompt_len or fixed.length or min(DEFAULT_PROMPT_LEN, limit or DEFAULT_PROMPT_LEN)
    workload = Workload(batch=batch or fixed.batch or 1, prompt_len=prompt, gen_len=gen_len,
                        last_logits=serves_last_logits(cap))

    def taken(n: int) -> int:
        return n if fixed.takes(n) else fixed.length

    lengths = attn_lengths or sorted({taken(max(MIN_ATTN_LEN, prompt // 2)), prompt})
    # an encoder whose graph pads shorter inputs exactly calibrates on its lines whole, padded
    # (tailor.stages.calibrate), as it will run them; other fixed graphs on windows of its length
    calib_default = None if fixed.paddable and cap.graph.task == "encoder" else fixed.length
    return Shapes(workload, calib_len or calib_default, sorted(lengths),
                  validation_len or taken(max(MIN_ATTN_LEN, 3 * prompt // 4)))


def serves_last_logits(cap: Captured) -> bool:
    """Whether the model, served, computes its head at each prompt's last position only: a torch
    causal LM whose class takes logits_to_keep (transformers' generate passes 1; vLLM and TGI
    compute sampled positions only). Priced at every position, SmolLM2-135M's 49K-vocabulary head
    was 18% of its modelled 1K-token prefill on a CPU table (10% on the H100's; 0.2% and 3% at the
    last position), a cost no structural rewrite touches, which pulled every plan's predicted
    ratio toward 1 (end_to_end_gpu.py, timing prefills so, measured 0.443 for a predicted 0.500).
    An ONNX export's graph computes every position's logits, and is priced so."""
    return isinstance(cap.source, TorchSource) and cap.graph.task == "causal-lm" and \
        takes_logits_to_keep(type(cap.source.module))


def _name(cap: Captured) -> str:
    return str(cap.source.path)

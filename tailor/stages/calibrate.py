"""Calibration: the inputs every measurement of a compile runs on, from what the user gave."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tailor.backends.base import Backend
from tailor.core.devices import module_device
from tailor.core.dispatch import is_dispatched
from tailor.core.errors import TailorError
from tailor.data.calibration import (
    DEFAULT_CALIB_LEN,
    Calibration,
    Lines,
    Sampler,
    add_attention_data,
    calibration_data_free,
    calibration_from_ids,
    calibration_from_text,
    text_of_length,
)
from tailor.data.retrieval import (
    ANSWERED_FORM_SHARE,
    TEMPLATES,
    RetrievalTemplate,
    choose_template,
    form_name,
)
from tailor.data.text import has_tokenizer, load_tokenizer, read_text_pieces
from tailor.passes.attention_profile import cells_measured, gate_steps
from tailor.passes.profile import Profile
from tailor.rewriter.capture import OnnxSource, TorchSource
from tailor.runtime.generate import generate, new_state

CALIB_TOKENS = 8192  # default calibration size, in tokens
CHOOSE_LEN = 1024  # longest sequences the retrieval form is chosen on
# an encoder's lines are short and its layers cheap: more of them (MiniLM at 0.75, nominal cpu
# target, benchmarks/encoder_calibration.py: embedding cosine 0.9513 on 8192 tokens of lines,
# 0.9562 on 16384)
ENCODER_CALIB_TOKENS = 16384


def tokenizer_path(source: TorchSource | OnnxSource, tokenizer) -> Path | None:
    """The tokenizer: given, or the model's (its HF directory, its .gguf file, or the .onnx file's
    folder)."""
    if tokenizer:
        return Path(tokenizer)
    return source.path.parent if isinstance(source, OnnxSource) else source.path


def input_len(ids) -> int | str:
    """The calibration windows' length, or "lines" where every input is a whole line."""
    return "lines" if isinstance(ids, Lines) else int(ids.shape[1])


def calibration_windows(windows: int | None, length: int, tokens: int = CALIB_TOKENS) -> int:
    """Windows given, or enough for `tokens` tokens (at least 16): the least-squares refits
    of pruned FFNs and heads have as many unknowns per output as the layer is wide, and 64
    windows of 32 tokens (2048 tokens for MiniLM's 1536-wide FFN) fitted the calibration text,
    not the sentences after it (embedding cosine at 0.75: 0.925 with 2048 tokens, 0.946 with 8192)."""
    return windows if windows is not None else max(16, -(-tokens // length))


def runtime_attends_as_the_model(config, length: int) -> bool:
    """Whether tailor's runtime, whose dense attention is plain causal softmax attention, computes
    what the model's own attention does on `length` tokens: not where the model caps its
    attention logits (Gemma 2) or slides a window shorter than that."""
    window = getattr(config, "sliding_window", None)
    return getattr(config, "attn_logit_softcapping", None) is None and \
        not (isinstance(window, int) and window < length)


def runtime_sampler(model, seed: int, length: int) -> Sampler | None:
    """On one GPU, sampling sequences of `length` tokens through tailor's runtime with its decode
    step replayed as a CUDA graph, for the models the runtime drives as they are (None:
    transformers' `generate`, as elsewhere). transformers' sampling is bound by its host work a
    step: SmolLM2-135M's 16 × 511 tokens took 18–34 s on an H200 machine."""
    if not isinstance(model, torch.nn.Module) or module_device(model).type != "cuda" or is_dispatched(model) \
            or not runtime_attends_as_the_model(model.config, length):
        return None
    try:
        new_state(model, 1, 2, torch.zeros(1, dtype=torch.int32))
    except TailorError:  # attention the runtime does not drive
        return None

    def sample(ids: torch.Tensor, new: int) -> torch.Tensor:
        tokens = generate(model, ids, new, do_sample=True, seed=seed, cuda_graph=True)
        return torch.cat([ids, torch.tensor(tokens)], 1)
    return sample


def calibration(backend: Backend, source: TorchSource | OnnxSource, calib, tokenizer, windows: int | None,
                length: int | None, seed: int) -> Calibration:
    """Calibration windows; `length` None: DEFAULT_CALIB_LEN tokens (fewer where the model learns
    fewer positions), or for an encoder given text, its lines whole (windows × their median length
    tokens of them, by default ENCODER_CALIB_TOKENS)."""
    graph = backend.graph
    fixed = source.input_shape.length if isinstance(source, OnnxSource) else None
    default_len = fixed or min(DEFAULT_CALIB_LEN, graph.max_positions or DEFAULT_CALIB_LEN)
    if calib is not None and Path(calib).suffix != ".json":
        tok_path = tokenizer_path(source, tokenizer)
        if tok_path is None:
            raise TailorError("--calib needs a tokenizer: pass --tokenizer DIR (the model came in as a "
                              "module)")
        encoder = graph.task == "encoder"
        tokens = ENCODER_CALIB_TOKENS if encoder else CALIB_TOKENS
        return calibration_from_text(read_text_pieces(Path(calib)), load_tokenizer(tok_path),
                                     length or (None if encoder else default_len),
                                     lambda n: calibration_windows(windows, n, tokens), str(calib),
                                     per_line=encoder, max_line=fixed)
    length = length or default_len
    windows = calibration_windows(windows, length)
    if calib is None:
        return calibration_data_free(backend.model, graph.vocab_size, length, windows, seed,
                                     sample=runtime_sampler(backend.model, seed, length))
    return calibration_from_ids(Path(calib), graph.vocab_size, length, windows)  # no tokenizer needed


def attention_data(cal: Calibration, backend: Backend, source: TorchSource | OnnxSource, tokenizer,
                   passes: list[str], lengths: list[int], validation_len: int,
                   retrieval_template: dict | None, seed: int, grid, device_kind: str = "cpu",
                   measure_all: bool = False) -> dict[str, Any]:
    """Windows of the profiled and validation lengths and synthetic retrieval sequences (for a
    causal LM, or where attention patterns are searched), added to `cal`; the settings that
    change what the attention profile measures: how many cells a length where the backend has a
    proxy for the others (attention_profile.cells_measured on `device_kind`; `measure_all`: every one)."""
    graph = backend.graph
    if graph.task != "causal-lm" and "attn_pattern" not in passes:
        return {}
    tok = tokenizer_path(source, tokenizer)
    # retrieval sequences need the model's tokenizer: given, or beside the model
    usable = tok is not None and (tokenizer is not None or has_tokenizer(tok))
    tok = load_tokenizer(tok) if usable and graph.task == "causal-lm" else None
    answered, forms = None, []
    if retrieval_template is not None:
        forms = [RetrievalTemplate.parse(retrieval_template)]
    elif tok is not None:
        # chosen at a short length (a few forwards): sequences of the profiled lengths that the
        # dense model does not answer are dropped from the held-out check (stages.search.HeldOut)
        length = min(CHOOSE_LEN, *lengths)
        text = text_of_length(cal, length)
        template, answered = choose_template(backend.runnable(), tok, length, text, seed)
        # the check draws every form the model answers, not only the one the profile and the
        # retrieval gates are fitted on (the most answered, first), so that it measures retrieval
        # the fit did not see
        forms = sorted((t for t in TEMPLATES if answered.get(form_name(t), 0.0) >= ANSWERED_FORM_SHARE),
                       key=lambda t: -answered[form_name(t)]) or ([template] if template is not None else [])
    add_attention_data(cal, lengths, validation_len, tok if forms else None, forms=forms, seed=seed)
    if "attn_pattern" not in passes:
        return {}
    sequences = {n: len(cal.attn_texts.get(n, [])) + len(cal.retrieval.get(n, [])) for n in lengths}
    measured = None if measure_all else list(cells_measured(graph, sequences, device_kind).values())
    gates = gate_steps(graph, max(lengths), device_kind) if cal.gate_retrieval else 0
    return {"attn": {"lengths": lengths, "grid": [g.to_json() for g in grid],
                     "forms": [asdict(t) for t in forms],
                     "dense_answered": answered, "retrieval": cal.retrieval_weight, "measured": measured,
                     "gate_steps": gates}}


def profile_report(prof: Profile, cal: Calibration) -> dict[str, Any]:
    """What report.json says of the calibration and the profile's signals."""
    out: dict[str, Any] = {
        "calibration": {"data": prof.data, "tokens": prof.tokens, "cached": prof.extra["cached"],
                        "profile_seconds": prof.extra.get("seconds"),
                        "profile_peak_host_gib": prof.extra.get("peak_host_gib"),
                        "options_measured": prof.extra.get("options_measured"),
                        "options_estimated": len(prof.option_estimate),
                        # per pass, proxy vs measured KL over the options measured in the profile
                        "option_spearman": prof.extra.get("option_spearman"),
                        "heldout_windows": len(cal.heldout_ids),
                        "heldout_retrieval_candidates": len(cal.heldout_retrieval),
                        "retrieval_weight": cal.retrieval_weight},
        "signals": {"block_influence": prof.signals.block_influence,
                    "ffn_contribution": prof.signals.ffn_contribution}}
    if prof.signals.attention is not None:
        out["attention_profile"] = prof.signals.attention.to_json()
    return out

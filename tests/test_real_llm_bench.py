"""The pieces of benchmarks/real_llm.py: passkey and repeated-token probes, and the baselines'
option builders (tailor.passes.baselines) on a tiny model."""
from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tailor.backends import backend_for
from tailor.core.patterns import Pattern
from tailor.core.targets import get_target
from tailor.data.long_context import (
    FILLER,
    KEY_LINE,
    QUESTION,
    passkey_correct,
    passkey_samples,
    repeated_tokens,
)
from tailor.data.text import load_tokenizer
from tailor.passes import baselines
from tailor.passes.attn_pattern import head_losses
from tailor.passes.base import Option
from tailor.passes.cost import CostModel, Workload
from tailor.passes.registry import PASSES, apply_options
from tailor.passes.search import structure_of
from tailor.pipeline import prepare
from tailor.quality.long_context import repeat_accuracy
from tailor.quality.metrics import lm_metrics, windowed_lm_metrics
from tailor.rewriter.capture import capture
from tests.conftest import REFLLAMA, build_model, needs_shared

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@needs_shared
@pytest.mark.parametrize("length", [256, 1024])
def test_passkey_prompt_has_the_length_and_the_key_at_its_depth(length):
    tok = load_tokenizer(REFLLAMA)
    tok.chat_template = CHAT
    samples = passkey_samples(tok, length, 6, seed=3)
    sentence = len(tok(FILLER.split(". ")[0] + ". ", add_special_tokens=False)["input_ids"])
    for s in samples:
        assert length - 2 * sentence <= len(s.ids) <= length
        assert len(s.key) == 5 and s.key.isdigit()
        text = tok.decode(s.ids)
        assert text.endswith(QUESTION + "\n<|assistant|>\n")
        filler, question, key = text.index("The grass"), text.index(QUESTION), text.index("The pass key is")
        # the share of the filler before the key line (a whole number of sentences)
        where = (key - filler) / (question - filler - len(KEY_LINE.format(key=s.key)))
        assert abs(where - s.depth) < (0.06 if length == 256 else 0.02), (where, s.depth)
        assert text.count(s.key) == 2
    assert len({s.key for s in samples}) == len(samples)
    assert [s.ids for s in passkey_samples(tok, length, 6, seed=3)] == [s.ids for s in samples]


def test_passkey_reply_is_right_only_when_its_first_number_is_the_key():
    assert passkey_correct("The pass key is 40213.", "40213")
    assert passkey_correct("40213", "40213")
    assert not passkey_correct("It is 4021.", "40213")
    assert not passkey_correct("Maybe 12345, or 40213", "40213")
    assert not passkey_correct("I do not know", "40213")


TINY_TOKENIZER = SimpleNamespace(vocab_size=96, all_special_ids=[0, 1], bos_token_id=0)


def test_repeated_tokens_copy_model_scores_one_and_random_model_chance():
    ids, start = repeated_tokens(TINY_TOKENIZER, 64, 8, seed=1)
    assert ids.shape == (8, 64) and start == 1 + 31 and (ids[:, 0] == 0).all()
    assert torch.equal(ids[:, 1:start], ids[:, start:2 * start - 1])
    assert not np.isin(ids[:, 1:].numpy(), [0, 1]).any()

    def copier(row, positions):  # reads the next token off the first copy
        logits = torch.zeros(1, len(positions), 96)
        logits[0, torch.arange(len(positions)), row[0, positions - (start - 1) + 1]] = 1.0
        return logits

    assert repeat_accuracy(copier, ids, start) == 1.0
    random_model = build_model("llama")  # vocab 96, random weights: no induction
    run = backend_for(capture(random_model)).runnable()
    assert repeat_accuracy(run, ids, start) < 0.1  # chance: 1/94


# ---- baselines -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny llama (3 layers, 2 KV heads × 2 queries), profiled as compile does (data-free)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TAILOR_CACHE", str(tmp_path_factory.mktemp("cache")))
        # the baselines need the signals and the attention profile, no option measured alone
        return prepare(build_model("llama"), 0.9, objective="attention", prompt_len=64, calib_windows=4,
                       calib_len=16, target="h100", passes=["attn_pattern"])


def ratio(p, options, objective):
    return p.cost_model.ratio(structure_of(p.cost_model.graph, options), objective)


def runs(p, options) -> bool:
    variant = apply_options(p.dense.clone(), options, p.profile.signals).runnable()
    with torch.no_grad():
        return bool(torch.isfinite(variant(torch.arange(2, 34)[None])).all())


def test_streaming_llm_is_one_pattern_with_the_widest_window_in_budget(tiny):
    chosen = baselines.streaming_llm(tiny.cost_model, 0.5, "kv_memory")
    spans = {tuple(s) for o in chosen for s in o.choice["spans"]}
    assert len(chosen) == 3 and len(spans) == 1
    sink, window, beta = spans.pop()
    assert sink == baselines.STREAMING_SINK and beta == 0
    assert ratio(tiny, chosen, "kv_memory") <= 0.5
    wider = baselines.every_head_on(Pattern(sink, window + 1, 0.0), tiny.cost_model.graph)
    assert ratio(tiny, wider, "kv_memory") > 0.5
    assert runs(tiny, chosen)
    # a latency budget patterns alone cannot reach
    assert baselines.streaming_llm(tiny.cost_model, 0.3, "latency") is None


def test_duo_attention_streams_the_heads_that_lose_least(tiny):
    chosen = baselines.duo_attention(tiny.cost_model, tiny.profile.signals, 0.5, "kv_memory")
    assert ratio(tiny, chosen, "kv_memory") <= 0.5 and runs(tiny, chosen)
    grid, loss = head_losses(tiny.cost_model.graph, tiny.profile.signals)
    (pattern,) = {Pattern.from_json(s) for o in chosen for s in o.choice["spans"] if s is not None}
    k = grid.index(pattern)
    assert pattern.beta == 0
    streamed = {(o.layer, h) for o in chosen for h, s in enumerate(o.choice["spans"]) if s is not None}
    dense = {(i, h) for i in range(3) for h in range(2)} - streamed
    assert dense and max(loss[i, h, k] for i, h in streamed) <= min(loss[i, h, k] for i, h in dense)


def test_wide_window_plan_keeps_the_highest_gates_dense_and_the_rest_on_the_widest_window(tiny):
    assert baselines.duo_attention_wide(tiny.cost_model, tiny.profile.signals, 0.5, "kv_memory", 0.3) is None
    signals = copy.copy(tiny.profile.signals)
    gates = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.0]])
    signals.attention = dataclasses.replace(signals.attention, gates=gates, gate_pattern=Pattern(2, 4, 0.0))
    chosen = baselines.duo_attention_wide(tiny.cost_model, signals, 0.5, "kv_memory", 1 / 3)
    streamed = {(o.layer, h): Pattern.from_json(s) for o in chosen for h, s in enumerate(o.choice["spans"])
                if s is not None}
    assert set(streamed) == {(0, 1), (1, 0), (2, 0), (2, 1)}  # the two highest gates stay dense
    (pattern,) = set(streamed.values())
    assert pattern.sink == 2 and pattern.beta == 0 and ratio(tiny, chosen, "kv_memory") <= 0.5
    wider = Pattern(2, pattern.alpha + 1, 0.0).to_json()
    widened = [PASSES["attn_pattern"].from_plan(tiny.cost_model.graph, o.layer,
                                                {"spans": [s and wider for s in o.choice["spans"]]})
               for o in chosen]
    assert ratio(tiny, widened, "kv_memory") > 0.5
    assert runs(tiny, chosen)


def test_shortgpt_removes_the_layers_of_least_block_influence(tiny):
    chosen = baselines.shortgpt(tiny.cost_model, tiny.profile.signals, 0.7, "kv_memory")
    assert [o.layer for o in chosen] == [int(np.argmin(tiny.profile.signals.block_influence))]
    assert ratio(tiny, chosen, "kv_memory") == pytest.approx(2 / 3)


def test_sleb_removes_one_block_at_a_time_by_the_perplexity_left():
    """Alone, removing block 1 hurts less than removing block 2; after block 0 has gone, block 2
    hurts less: SLEB takes 0 then 2 where a ranking of single removals would take 0 then 1."""
    graph = capture(build_model("llama")).graph
    cm = CostModel(graph, Workload(1, 128, 0), get_target("h100"))
    table = {(): 5.0, (0,): 6.0, (1,): 6.5, (2,): 7.0, (0, 1): 9.0, (0, 2): 7.5, (1, 2): 8.0}
    asked = []

    def perplexity(options):
        asked.append(tuple(sorted(o.layer for o in options)))
        return table[asked[-1]]

    chosen = baselines.sleb(cm, 0.34, "kv_memory", perplexity)
    assert [o.layer for o in chosen] == [0, 2]
    assert asked == [(0,), (1,), (2,), (0, 1), (0, 2)]


def test_calibration_perplexity_replays_the_dense_prefix_exactly():
    model = build_model("llama")
    with torch.no_grad():  # block 1 writes nothing into the residual stream: an identity block
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    dense = backend_for(capture(model))
    ids = torch.randint(2, 96, (4, 64), generator=torch.Generator().manual_seed(0))
    perplexity = baselines.calibration_perplexity(dense, None, ids)
    for layers in ([], [2], [0, 2], [1]):
        options = [Option("layer_skip", i, {}, ()) for i in layers]
        with torch.no_grad():
            logits = apply_options(dense.clone(), options, None).runnable()(ids)
        assert perplexity(options) == pytest.approx(lm_metrics(logits, ids, None)["perplexity"], rel=1e-5)
    assert perplexity([Option("layer_skip", 1, {}, ())]) == pytest.approx(perplexity([]), rel=1e-6)
    assert perplexity([Option("layer_skip", 2, {}, ())]) != pytest.approx(perplexity([]), rel=1e-3)


def test_flap_uniform_prunes_alike_everywhere_and_ffns_only_where_they_count(tiny):
    for objective, budget in (("latency", 0.8), ("kv_memory", 0.5), ("attention", 0.6)):
        chosen = baselines.flap_uniform(tiny.cost_model, tiny.profile.signals, budget, objective)
        assert ratio(tiny, chosen, objective) <= budget and runs(tiny, chosen)
        heads = {(len(o.choice["kv_heads"]), len(o.choice["queries"][0]) if o.choice["queries"] else 0)
                 for o in chosen if o.pass_name == "head_prune"}
        widths = {len(o.choice["channels"]) for o in chosen if o.pass_name == "ffn_prune"}
        assert len(heads) <= 1 and len(widths) <= 1
        assert sum(o.pass_name == "head_prune" for o in chosen) in (0, 3)
        if objective == "latency":
            assert widths and sum(o.pass_name == "ffn_prune" for o in chosen) == 3
        else:
            assert not widths
    # no milder uniform choice meets the budget: one KV group fewer is the least for 0.5 KV memory
    chosen = baselines.flap_uniform(tiny.cost_model, tiny.profile.signals, 0.5, "kv_memory")
    assert {len(o.choice["kv_heads"]) for o in chosen} == {1}
    assert {len(o.choice["queries"][0]) for o in chosen} == {2}


def test_kv_sharer_shares_the_least_similar_pair_and_says_when_it_cannot_reach(tiny):
    chosen = baselines.kv_sharer(tiny.cost_model, tiny.profile.signals, 0.7, "kv_memory")
    sim = np.asarray(tiny.profile.signals.kv_similarity)
    (o,) = chosen
    assert sim[o.layer, o.choice["source"]] == min(sim[j, i] for j in range(1, 3) for i in range(j))
    assert ratio(tiny, chosen, "kv_memory") == pytest.approx(2 / 3) and runs(tiny, chosen)
    # three layers: a source serves one layer, so at most one layer loses its own cache
    assert baselines.kv_sharer(tiny.cost_model, tiny.profile.signals, 0.5, "kv_memory") is None


def test_text_metrics_window_by_window_equal_those_over_all_windows():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 16), generator=gen)
    logits, ref = torch.randn(3, 16, 50, generator=gen), torch.randn(3, 16, 50, generator=gen)
    rows = iter(logits)
    windowed = windowed_lm_metrics(lambda _: next(rows)[None], ids, [r[None] for r in ref])
    whole = lm_metrics(logits, ids, ref)
    assert windowed.keys() == whole.keys()
    for k, v in whole.items():
        assert windowed[k] == pytest.approx(v, rel=1e-9), k

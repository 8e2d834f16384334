"""generate() over the per-head KV cache equals greedy decoding by recomputing the whole sequence
with the rewritten model, for a plan that uses every rewrite the runtime has to honour."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from tailor.backends import backend_for
from tailor.passes.base import Option
from tailor.passes.registry import apply_options
from tailor.rewriter.capture import capture
from tailor.runtime.generate import Generator, equal_length_runs, generate, kv_cache_bytes
from tests.conftest import perturb_vectors

PLAN = [Option("attn_pattern", 0, {"spans": [[2, 3, 0.0], None]}, ()),
        Option("head_prune", 1, {"kv_heads": [1], "queries": [[0, 1]]}, ()),
        Option("layer_skip", 2, {}, ()),
        Option("kv_share", 4, {"source": 3}, ()),
        Option("attn_pattern", 3, {"spans": [[1, 4, 0.0], [2, 2, 0.0]]}, ())]


def _model(plan):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                            num_key_value_heads=2, num_hidden_layers=5, use_cache=False)
    model = perturb_vectors(tf.LlamaForCausalLM(config)).eval()
    apply_options(backend_for(capture(model)), plan, None)
    return model


def _recomputed(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("plan", [[], PLAN[:3] + PLAN[4:], PLAN[:4]], ids=["dense", "patterns", "kv_share"])
def test_generate_equals_recomputing(plan):
    """Prompts of one length prefill together (rows 0-1 in one forward, then row 2 alone)."""
    model = _model(plan)
    prompts = [[5, 17, 3, 88, 41, 9, 60, 2, 33, 71], [1, 30, 62, 9, 14, 5, 77, 20, 3, 48],
               [12, 4, 90, 7, 56, 23, 8]]
    out = generate(model, prompts, max_new_tokens=12)
    assert out == [_recomputed(model, p, 12) for p in prompts]


def test_equal_length_runs_bound_the_tokens_of_a_forward():
    prompts = [[1] * 4, [2] * 4, [3] * 4, [4] * 2, [5] * 4, [6] * 4]
    assert equal_length_runs(prompts, 8) == [(0, 2), (2, 1), (3, 1), (4, 2)]
    assert equal_length_runs(prompts, 3) == [(b, 1) for b in range(6)]  # one prompt at least


def test_compiled_generation_equals_eager():
    """torch.compile around the model, tailor's attention ops between its graphs: the same tokens
    and caches as the eager runtime (patterns, pruning, skips); KV sharing falls back to eager."""
    with pytest.warns(UserWarning, match="KV-sharing"):
        generate(_model(PLAN), [[1, 2, 3]], max_new_tokens=2, compiled=True)
    model = _model(PLAN[:3] + PLAN[4:])
    prompts = [[5, 17, 3, 88, 41, 9, 60, 2, 33, 71], [12, 4, 90, 7, 56, 23, 8, 1, 1, 1]]
    eager, state = generate(model, prompts, max_new_tokens=6, return_state=True)
    compiled, compiled_state = generate(model, prompts, max_new_tokens=6, return_state=True, compiled=True)
    assert compiled == eager
    for key in state.writers:
        torch.testing.assert_close(compiled_state.caches[key].k, state.caches[key].k, atol=1e-5, rtol=1e-5)


def test_compiled_prefill_is_one_graph():
    """Under torch.compile the prefill's attention is traced (PrefillStep's custom ops), so the
    whole forward is one graph with no break; prompts of one length prefill in one forward, and a
    new Generator reuses its graph."""
    from torch._dynamo.utils import counters

    model = _model(PLAN[:3] + PLAN[4:])
    torch._dynamo.reset()
    counters.clear()
    Generator(model, 2, 16, compiled=True).prefill([[5, 17, 3, 88, 41], [12, 4, 90, 7, 56]])
    graphs = counters["stats"]["unique_graphs"]
    Generator(model, 2, 16, compiled=True).prefill([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == graphs == 1


def test_compiled_prefill_in_runs_reuses_its_graph(monkeypatch):
    """Prompts prefilled in two forwards (rows 0-1, then rows 2-3: PREFILL_TOKENS bounds a forward)
    run one graph: the cache rows written are a tensor input of it, not a constant (each first row
    was a whole-model compile). The caches and logits equal the eager runtime's, for layers whose
    prompt fills every slot (layer 3) and layers where it does not (layer 0's dense head)."""
    from torch._dynamo.utils import counters

    import tailor.runtime.generate as generate_module

    monkeypatch.setattr(generate_module, "PREFILL_TOKENS", 20)
    model = _model(PLAN[:3] + PLAN[4:])
    prompts = [[5, 17, 3, 88, 41, 9, 60, 2, 33, 71], [1, 30, 62, 9, 14, 5, 77, 20, 3, 48],
               [12, 4, 90, 7, 56, 23, 8, 1, 1, 1], [6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
    eager = Generator(model, 4, 16)
    eager_logits = eager.prefill(prompts)
    torch._dynamo.reset()
    counters.clear()
    compiled = Generator(model, 4, 16, compiled=True)
    compiled_logits = compiled.prefill(prompts)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-5, rtol=1e-5)
    assert {c.every for c in compiled.state._steps.values()} == {True, False}
    for key in eager.state.writers:
        for a, b in ((compiled.state.caches[key].k, eager.state.caches[key].k),
                     (compiled.state.caches[key].v, eager.state.caches[key].v)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_kv_cache_shrinks_with_the_plan():
    prompts = [[1, 2, 3, 4]]
    _, dense = generate(_model([]), prompts, max_new_tokens=60, return_state=True)
    _, planned = generate(_model(PLAN), prompts, max_new_tokens=60, return_state=True)
    # dense: 5 layers x 2 KV heads x 64 tokens; planned: layer 0 one windowed head (2 + 3) and one
    # dense, layer 1 one head, no layer 2, layer 3 windowed (1 + 4, 2 + 2), layer 4 shares layer 3
    assert kv_cache_bytes(dense) == 5 * 2 * 64 * 16 * 4 * 2
    assert kv_cache_bytes(planned) == (5 + 64 + 64 + 5 + 4) * 16 * 4 * 2


def test_sampling_is_reproducible_for_a_seed():
    model = _model(PLAN)
    a = generate(model, [[3, 4, 5]], max_new_tokens=8, do_sample=True, top_k=20, seed=7)
    b = generate(model, [[3, 4, 5]], max_new_tokens=8, do_sample=True, top_k=20, seed=7)
    assert a == b and len(a[0]) == 8

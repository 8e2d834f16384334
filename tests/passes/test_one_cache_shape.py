"""A decoder whose KV cache is a graph input keeps one KV head count in every cache it keeps
(tailor.passes.standard.one_cache_shape): the solver's rows and the whole-plan check agree."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from tailor.passes.base import Option
from tailor.passes.search import keeps_uniform, solve
from tailor.passes.standard import one_cache_shape

LAYERS, KV = 3, 2
GRAPH = SimpleNamespace(num_layers=LAYERS,
                        blocks=[SimpleNamespace(attn=SimpleNamespace(num_kv_heads=KV))] * LAYERS)


def _heads(layer, kv, queries_per_kv=1, cost=-0.2, loss=0.1):
    return Option("head_prune", layer, {"kv_heads": list(range(kv)), "queries": [[0] * queries_per_kv] * kv},
                  (f"attn:{layer}",), {"kv_memory": cost}, loss)


def _whole(name, layer, cost=-0.4, loss=0.3):
    return Option(name, layer, {}, (f"attn:{layer}", f"ffn:{layer}"), {"kv_memory": cost}, loss)


def test_whole_plans_keep_one_count_in_the_caches_they_keep():
    same = one_cache_shape(GRAPH)
    one = [_heads(i, 1) for i in range(LAYERS)]
    assert keeps_uniform(one, same)
    assert not keeps_uniform(one[:1], same)                      # layers 1, 2 keep 2 KV heads
    assert keeps_uniform([one[0], one[1], _whole("layer_skip", 2)], same)
    assert keeps_uniform([one[0], one[1], _whole("kv_share", 2)], same)   # its cache is another's
    assert keeps_uniform([one[0], _heads(1, 0), one[2]], same)   # attention dropped: no cache
    assert keeps_uniform([_heads(1, KV, queries_per_kv=1)], same)  # query heads only: the cache stays
    assert not keeps_uniform([one[0], _heads(1, 0), _heads(2, KV, 1)], same)


def test_the_solver_prunes_kv_heads_everywhere_or_nowhere():
    # alone, pruning a KV head on layer 0 only is cheapest; one count for every cache forbids it
    options = [_heads(0, 1, cost=-0.5, loss=0.1), _heads(1, 1, cost=-0.5, loss=2.0),
               _heads(2, 1, cost=-0.5, loss=2.0), _heads(1, KV, cost=-0.1, loss=0.05),
               _whole("layer_skip", 2, cost=-0.6, loss=1.0)]
    losses = np.array([o.loss for o in options])
    free = solve(options, losses, "kv_memory", -0.5, 1.0)
    assert [(o.pass_name, o.layer) for o in free] == [("head_prune", 0)]
    # with it: the layer skip alone (loss 1.0) beats pruning every layer's KV head (4.1 or 3.1)
    tied = solve(options, losses, "kv_memory", -0.5, 1.0, one_cache_shape(GRAPH))
    assert [(o.pass_name, o.layer) for o in tied] == [("layer_skip", 2)]

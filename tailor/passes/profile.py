"""Profile: one calibration run that collects every signal the passes and the search need.

Signals (forward hooks on the modules the TransformerGraph points to):
- block influence per layer: 1 - cos(block input, block output) of the residual stream (ShortGPT);
- FFN contribution: |FFN output| / |block input|, and the FFN's mean output (for ffn_skip);
- the attention branch's mean output (for dropping attention);
- per output-projection input channel: mean and variance, and the weight-column norms (FLAP);
- per layer pair: cosine similarity of their keys (KVSharer-style ranking).
Then every candidate option of every pass is applied alone to a copy of the model and its real
KL to the dense model is measured on the calibration tokens: the search's loss estimates.

Results are cached on disk, keyed by (model hash, data hash, settings), with a checksum, so a
second compile at another budget costs no calibration.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tailor.backends.base import Backend, divergence
from tailor.core.digests import sha256_file
from tailor.core.patterns import Pattern
from tailor.data.calibration import Calibration, Inputs
from tailor.passes.attention_profile import AttentionInfluence, profile_attention
from tailor.passes.base import Option
from tailor.passes.obs import removal_importance
from tailor.passes.registry import PASSES, apply_options, candidates_for
from tailor.rewriter.graph import TransformerGraph
from tailor.rewriter.least_squares import COMPENSATION_RIDGE

PROFILE_VERSION = 4


@dataclass
class Signals:
    block_influence: list[float]
    ffn_contribution: list[float]
    ffn_mean: list[list[float]]
    attn_mean: list[list[float]]
    kv_similarity: list[list[float]]
    # per query head (output projection) and per FFN channel (down projection): when a greedy
    # optimal brain surgeon, refitting the rest, would remove it (tailor.passes.obs); higher
    # matters more. What head and FFN pruning rank by.
    o_importance: list[list[float]]
    down_importance: list[list[float]]
    # E[x̃ x̃ᵀ] of the inputs of the output and down projections, x̃ = [x; 1]: what least-squares
    # compensation of pruned channels needs. Kept out of JSON (cached in safetensors).
    o_gram: list[np.ndarray] = field(default_factory=list, repr=False)
    down_gram: list[np.ndarray] = field(default_factory=list, repr=False)
    # per (layer, KV head, pattern): the measured cost of sparse attention (attn_pattern)
    attention: AttentionInfluence | None = None

    GRAMS = ("o_gram", "down_gram")


@dataclass
class Profile:
    signals: Signals
    option_kl: dict[str, float]
    data: str                      # where the calibration tokens came from
    tokens: int
    key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(replace(self, signals=replace(self.signals, o_gram=[], down_gram=[], attention=None)))
        for g in Signals.GRAMS:
            d["signals"].pop(g)
        att = self.signals.attention
        d["signals"]["attention"] = att.to_json() if att is not None else None
        return d

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"{g}.{i}": np.ascontiguousarray(a) for g in Signals.GRAMS
                for i, a in enumerate(getattr(self.signals, g))}

    @classmethod
    def from_json(cls, d: dict, arrays: dict[str, np.ndarray]) -> "Profile":
        n = len(d["signals"]["block_influence"])
        grams = {g: [arrays[f"{g}.{i}"] for i in range(n)] for g in Signals.GRAMS}
        att = d["signals"].pop("attention", None)
        grams["attention"] = AttentionInfluence.from_json(att) if att is not None else None
        return cls(Signals(**d["signals"], **grams), {k: float(v) for k, v in d["option_kl"].items()},
                   d["data"], int(d["tokens"]), d.get("key", ""), d.get("extra", {}))


def neutral_signals(graph: TransformerGraph) -> Signals:
    """Flat statistics: enough to enumerate every pass's candidates and price them before any
    calibration (costs depend on shapes only)."""
    n, h = graph.num_layers, graph.hidden_size
    return Signals([0.0] * n, [0.0] * n, [[0.0] * h] * n, [[0.0] * h] * n, [[0.0] * n] * n,
                   [[0.0] * b.attn.num_heads for b in graph.blocks],
                   [[0.0] * b.ffn.width for b in graph.blocks])


# ---- calibration data ----------------------------------------------------------------------------


# ---- measuring ---------------------------------------------------------------------------------


def _gram(x: torch.Tensor) -> torch.Tensor:
    """Σ x̃ x̃ᵀ over tokens, x̃ = [x; 1]."""
    flat = x.reshape(-1, x.shape[-1])
    aug = torch.cat([flat, torch.ones(len(flat), 1, dtype=flat.dtype)], 1)
    return aug.T @ aug


class SignalSums:
    """Running sums of the profile's statistics, fed by torch hooks or onnxruntime outputs."""

    def __init__(self, n: int):
        self.n = n
        self.acc: dict[str, list] = {k: [None] * n for k in
                                     ("bi", "ffn_norm", "ffn_sum", "attn_sum", "o_gram", "d_gram", "tok")}
        self.keys: list = [None] * n

    def _add(self, dst, i, val):
        self.acc[dst][i] = val if self.acc[dst][i] is None else self.acc[dst][i] + val

    def block(self, i: int, x: torch.Tensor, y: torch.Tensor, ffn_out: torch.Tensor, attn_out: torch.Tensor):
        """Block input and output [B, T, H] and its two branches' outputs."""
        x, y, f = x.double(), y.double(), ffn_out.double()
        self._add("bi", i, float((1 - torch.cosine_similarity(x, y, dim=-1)).sum()))
        self._add("tok", i, x.shape[0] * x.shape[1])
        self._add("ffn_norm", i, float((f.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-9)).sum()))
        self._add("ffn_sum", i, f.sum((0, 1)))
        self._add("attn_sum", i, attn_out.double().sum((0, 1)))

    def projection_inputs(self, i: int, o_in: torch.Tensor, down_in: torch.Tensor):
        for name, x in (("o", o_in.double()), ("d", down_in.double())):
            self._add(f"{name}_gram", i, _gram(x))

    def key(self, i: int, k: torch.Tensor):
        self.keys[i] = k.double().flatten(0, 1)  # last batch only: enough for a ranking

    def signals(self, o_weights: list[torch.Tensor], down_weights: list[torch.Tensor],
                head_dims: list[int]) -> Signals:
        """The weights in out_in layout: the output and down projection of every layer."""
        acc, n, tok = self.acc, self.n, self.acc["tok"]
        o_gram = [(acc["o_gram"][i] / tok[i]).numpy() for i in range(n)]
        down_gram = [(acc["d_gram"][i] / tok[i]).numpy() for i in range(n)]
        ks = self.keys
        sim = [[float(torch.cosine_similarity(ks[i], ks[j], dim=-1).mean()) if ks[i].shape == ks[j].shape
                else 0.0 for j in range(n)] for i in range(n)]
        return Signals(
            block_influence=[acc["bi"][i] / tok[i] for i in range(n)],
            ffn_contribution=[acc["ffn_norm"][i] / tok[i] for i in range(n)],
            ffn_mean=[(acc["ffn_sum"][i] / tok[i]).tolist() for i in range(n)],
            attn_mean=[(acc["attn_sum"][i] / tok[i]).tolist() for i in range(n)],
            kv_similarity=sim,
            o_importance=[removal_importance(w.numpy(), gm, d, COMPENSATION_RIDGE).tolist()
                          for w, gm, d in zip(o_weights, o_gram, head_dims)],
            down_importance=[removal_importance(w.numpy(), gm, 1, COMPENSATION_RIDGE).tolist()
                             for w, gm in zip(down_weights, down_gram)],
            o_gram=o_gram, down_gram=down_gram)


def collect_signals(backend: Backend, ids: Inputs) -> Signals:
    """The profile's statistics, summed over the backend's block traces on `ids`."""
    graph = backend.graph
    sums = SignalSums(graph.num_layers)
    for traces in backend.block_traces(ids):
        for i, t in enumerate(traces):
            sums.block(i, t.input, t.output, t.ffn_out, t.attn_out)
            sums.projection_inputs(i, t.o_in, t.down_in)
            sums.key(i, t.key)
    return sums.signals([torch.from_numpy(backend.projection_weight(b.attn.o)) for b in graph.blocks],
                        [torch.from_numpy(backend.projection_weight(b.ffn.down)) for b in graph.blocks],
                        [b.attn.head_dim for b in graph.blocks])


def measure_options(backend: Backend, options: list[Option], signals: Signals, ids: Inputs,
                    reference: list[torch.Tensor], progress: bool) -> dict[str, float]:
    """Each option (of a pass that measures: PASSES[name].measured) applied alone to a copy: its
    divergence from `reference` on `ids`."""
    is_lm = backend.graph.task == "causal-lm"
    result = {}
    for o in tqdm(options, desc="measuring options", disable=not progress, unit="opt"):
        variant = apply_options(backend.clone(), [o], signals)
        result[o.key] = divergence(reference, variant.outputs(ids), is_lm)
    return result


# ---- cache -----------------------------------------------------------------------------------------

def cache_path(key: str) -> Path:
    from tailor.core.cache import cache_dir

    return cache_dir() / "profiles" / f"{key}.json"


def profile_key(model_hash: str, data_digest: str, settings: dict) -> str:
    blob = json.dumps({"model": model_hash, "data": data_digest, "settings": settings,
                       "version": PROFILE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def load_cached(key: str) -> Profile | None:
    from safetensors.numpy import load_file

    path = cache_path(key)
    try:
        d = json.loads(path.read_text())
        body = json.dumps(d["profile"], sort_keys=True)
        arrays_path = path.with_suffix(".safetensors")
        if hashlib.sha256(body.encode()).hexdigest() != d["checksum"] or \
                sha256_file(arrays_path) != d["arrays_checksum"]:
            return None  # corrupt: recompute
        return Profile.from_json(d["profile"], load_file(str(arrays_path)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(profile: Profile) -> None:
    from safetensors.numpy import save_file

    path = cache_path(profile.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = path.with_suffix(".safetensors")
    tmp_arrays = path.with_suffix(f".{os.getpid()}.tmp.safetensors")
    save_file(profile.arrays(), str(tmp_arrays))
    body = profile.to_json()
    data = {"checksum": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(),
            "arrays_checksum": sha256_file(tmp_arrays), "profile": body}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp_arrays, arrays)
    os.replace(tmp, path)


def run_profile(backend: Backend, calib: Calibration, passes: list[str], *, model_hash: str, settings: dict,
                progress: bool = True, use_cache: bool = True) -> tuple[Profile, list[Option]]:
    """Signals, the candidate options of `passes`, and each option's measured KL."""
    graph = backend.graph
    # everything that changes a measured number is part of the key
    key = profile_key(model_hash, calib.digest,
                      {**settings, "passes": sorted(passes), "ridge": COMPENSATION_RIDGE})
    cached = load_cached(key) if use_cache else None
    if cached is not None:
        cached.extra["cached"] = True
        candidates = candidates_for(graph, cached.signals, passes)
        # candidates a newer tailor offers that this entry has not measured: measure them now
        # rather than let the search take an unmeasured option for free
        missing = [o for o in candidates if o.key not in cached.option_kl and PASSES[o.pass_name].measured]
        if missing:
            reference = backend.outputs(calib.profile_ids)
            cached.option_kl.update(measure_options(backend, missing, cached.signals, calib.profile_ids,
                                                    reference, progress))
            store(cached)
        return cached, candidates
    signals = collect_signals(backend, calib.profile_ids)
    if "attn_pattern" in passes:
        grid = [Pattern.from_json(p) for p in settings["attn"]["grid"]]
        signals.attention = profile_attention(backend, calib.attn_texts, calib.retrieval, grid,
                                              progress=progress, retrieval_weight=calib.retrieval_weight,
                                              measured_per_length=settings["attn"]["measured"])
    candidates = candidates_for(graph, signals, passes)
    measured = [o for o in candidates if PASSES[o.pass_name].measured]
    reference = backend.outputs(calib.profile_ids) if measured else []
    option_kl = measure_options(backend, measured, signals, calib.profile_ids, reference, progress)
    prof = Profile(signals, option_kl, calib.source, int(calib.profile_ids.numel()), key)
    if use_cache:
        store(prof)
    prof.extra["cached"] = False
    return prof, candidates

"""Profile: one calibration run that collects every signal the passes and the search need.

Signals (forward hooks on the modules the TransformerGraph points to):
- block influence per layer: 1 - cos(block input, block output) of the residual stream (ShortGPT);
- FFN contribution: |FFN output| / |block input|, and the FFN's mean output (for ffn_skip);
- the attention branch's mean output (for dropping attention);
- per output-projection input channel: mean and variance, and the weight-column norms (FLAP);
- per layer pair: cosine similarity of their keys (KVSharer-style ranking).
Then each candidate option is applied alone to a copy of the model and its real KL to the dense
model is measured on the calibration tokens: the search's loss estimates. Where measuring every
option would take more than OPTION_SECONDS of work (cost.Allowance), each pass measures options
spread over the order of a cheap proxy (Pass.proxy) and a monotone map fitted on them estimates
the others; the search then measures the estimated options its plans choose (OptionMeter).

Results are cached on disk, keyed by (model hash, data hash, settings), with a checksum, so a
second compile at another budget costs no calibration. The passes are not in the key: a compile
with other passes extends the entry with what it lacks (refllama-16m's compile without int8,
after one with it, repeated its whole profile, attention at two lengths included, ~20 minutes
on 2 CPU cores, to measure nothing new).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tailor.backends.base import Backend, BlockTrace, HeadInput, compared_positions, divergence, with_logits
from tailor.core.devices import PeakMemory
from tailor.core.digests import sha256_file
from tailor.core.host_memory import release_free_memory
from tailor.core.patterns import Pattern
from tailor.data.calibration import Calibration, Inputs
from tailor.passes.attention_profile import (
    AttentionInfluence,
    monotone_map,
    profile_attention,
    rank_correlation,
    spread,
)
from tailor.passes.base import Option
from tailor.passes.cost import Allowance, forward_flops
from tailor.passes.obs import removal_importance
from tailor.passes.registry import PASSES, apply_options, offered
from tailor.rewriter.graph import TransformerGraph
from tailor.rewriter.least_squares import COMPENSATION_RIDGE, add_gram

PROFILE_VERSION = 5


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
    # per query head / FFN channel: that OBS's compensated error once it and every one ranked
    # below it are removed, relative to the projection's output energy (the options' proxy)
    o_removal_error: list[list[float]]
    down_removal_error: list[list[float]]
    # the attention branch's output norm over the block input's, averaged over tokens
    attn_contribution: list[float]
    # E[x̃ x̃ᵀ] of the inputs of the output and down projections, x̃ = [x; 1]: what least-squares
    # compensation of pruned channels needs. Kept out of JSON (cached in safetensors).
    o_gram: list[np.ndarray] = field(default_factory=list, repr=False)
    down_gram: list[np.ndarray] = field(default_factory=list, repr=False)
    # per (layer, KV head, pattern): the measured cost of sparse attention (attn_pattern)
    attention: AttentionInfluence | None = None

    GRAMS = ("o_gram", "down_gram")

    def drop_grams(self) -> None:
        """Frees the grams once the plan's rewrites are applied: nothing after reads them (the
        refit gathers statistics of its own), and a profile is stored before, never after."""
        self.o_gram, self.down_gram = [], []


@dataclass
class Profile:
    signals: Signals
    option_kl: dict[str, float]    # measured
    data: str                      # where the calibration tokens came from
    tokens: int
    key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    option_estimate: dict[str, float] = field(default_factory=dict)  # from the proxy, not measured

    def loss(self, option: Option) -> float:
        """The option's KL: measured, else estimated, else the pass's own estimate."""
        return self.option_kl.get(option.key, self.option_estimate.get(option.key, option.loss))

    def add_measured(self, option_kl: dict[str, float]) -> None:
        """Options measured since (by the search): measured from now on, in the cache too."""
        self.option_kl |= option_kl
        for key in option_kl:
            self.option_estimate.pop(key, None)

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
                   d["data"], int(d["tokens"]), d.get("key", ""), d.get("extra", {}),
                   {k: float(v) for k, v in d.get("option_estimate", {}).items()})


def neutral_signals(graph: TransformerGraph) -> Signals:
    """Flat statistics: enough to enumerate every pass's candidates and price them before any
    calibration (costs depend on shapes only)."""
    n, h = graph.num_layers, graph.hidden_size
    heads = [[0.0] * b.attn.num_heads for b in graph.blocks]
    channels = [[0.0] * b.ffn.width for b in graph.blocks]
    return Signals([0.0] * n, [0.0] * n, [[0.0] * h] * n, [[0.0] * h] * n, [[0.0] * n] * n,
                   heads, channels, heads, channels, [0.0] * n)


# ---- calibration data ----------------------------------------------------------------------------


# ---- measuring ---------------------------------------------------------------------------------


# seconds before the signals' progress bars show: a small model's signals take less, and a
# replayed plan refused after them leaves one line on the terminal, not a bar
PROGRESS_DELAY = 2.0
# rows of a layer's keys kept for kv_similarity: enough for a ranking, and bounded on a GPU
KEY_ROWS = 4096


class SignalSums:
    """Running sums of the profile's statistics, fed by torch hooks or onnxruntime outputs: in
    float64 on the device of the tensors given."""

    def __init__(self, n: int):
        self.n = n
        names = ("bi", "ffn_norm", "attn_norm", "ffn_sum", "attn_sum", "o_gram", "d_gram", "tok")
        self.acc: dict[str, list] = {k: [None] * n for k in names}
        self.keys: list = [None] * n
        self.device = torch.device("cpu")  # where the traces come from: the grams are ranked there

    def _add(self, dst, i, val):
        self.acc[dst][i] = val if self.acc[dst][i] is None else self.acc[dst][i] + val

    def block(self, i: int, x: torch.Tensor, y: torch.Tensor, ffn_out: torch.Tensor, attn_out: torch.Tensor):
        """Block input and output [B, T, H] and its two branches' outputs."""
        self.device = x.device
        x, y, f, a = x.double(), y.double(), ffn_out.double(), attn_out.double()
        self._add("bi", i, float((1 - torch.cosine_similarity(x, y, dim=-1)).sum()))
        self._add("tok", i, x.shape[0] * x.shape[1])
        norm = x.norm(dim=-1).clamp_min(1e-9)
        self._add("ffn_norm", i, float((f.norm(dim=-1) / norm).sum()))
        self._add("attn_norm", i, float((a.norm(dim=-1) / norm).sum()))
        self._add("ffn_sum", i, f.sum((0, 1)))
        self._add("attn_sum", i, a.sum((0, 1)))

    def projection_inputs(self, i: int, o_in: torch.Tensor, down_in: torch.Tensor):
        """Each batch's gram in float64 on the device, summed on the host in float32: every
        layer's sum on a GPU at once (float64) took 8.6 GiB for Llama-3.2-1B's shape and would
        take 52 GiB for 8B's; a few batches summed in float32 lose nothing a ridge fit notices."""
        for name, x in (("o_gram", o_in), ("d_gram", down_in)):
            batch = add_gram(None, x.reshape(-1, x.shape[-1])).float().cpu()
            self._add(name, i, batch)

    def key(self, i: int, k: torch.Tensor):
        """Last batch only: enough for a ranking. Evenly spaced rows past KEY_ROWS, the same in
        every layer (the similarity compares layers token by token)."""
        k = k.flatten(0, 1)
        if len(k) > KEY_ROWS:
            k = k[torch.linspace(0, len(k) - 1, KEY_ROWS, dtype=torch.float64, device=k.device).long()]
        self.keys[i] = k.double()

    def signals(self, o_weights, down_weights, head_dims: list[int], progress: bool = False) -> Signals:
        """o_weights(i), down_weights(i): layer i's output and down projection weights in out_in
        layout (asked for one layer at a time: an 8B model's, all in float64, take 19 GiB). Consumes
        the grams: each layer's is ranked on its device, then kept as float32 on the CPU (half
        the host memory; an 8B model's down projections alone have 32 × 14337² entries) and its
        float64 sum freed."""
        acc, n, tok = self.acc, self.n, self.acc["tok"]

        def ranked(name: str, weights, groups: list[int]):
            grams, importance, error = [], [], []
            what = "heads" if name == "o_gram" else "channels"
            for i in tqdm(range(n), desc=f"ranking {what}", disable=not progress, unit="layer",
                          delay=PROGRESS_DELAY):
                gram, acc[name][i] = acc[name][i] / tok[i], None
                imp, err = removal_importance(weights(i), gram.double(), groups[i], COMPENSATION_RIDGE,
                                              device=self.device)
                importance.append(imp.tolist())
                error.append(err.tolist())
                grams.append(gram.numpy())
            return grams, importance, error

        o_gram, o_importance, o_error = ranked("o_gram", o_weights, head_dims)
        down_gram, down_importance, down_error = ranked("d_gram", down_weights, [1] * n)
        ks = self.keys
        sim = [[float(torch.cosine_similarity(ks[i], ks[j], dim=-1).mean()) if ks[i].shape == ks[j].shape
                else 0.0 for j in range(n)] for i in range(n)]
        return Signals(
            block_influence=[acc["bi"][i] / tok[i] for i in range(n)],
            ffn_contribution=[acc["ffn_norm"][i] / tok[i] for i in range(n)],
            ffn_mean=[(acc["ffn_sum"][i] / tok[i]).tolist() for i in range(n)],
            attn_mean=[(acc["attn_sum"][i] / tok[i]).tolist() for i in range(n)],
            kv_similarity=sim, o_importance=o_importance, down_importance=down_importance,
            o_removal_error=o_error, down_removal_error=down_error,
            attn_contribution=[acc["attn_norm"][i] / tok[i] for i in range(n)],
            o_gram=o_gram, down_gram=down_gram)


def collect_signals(backend: Backend, ids: Inputs, progress: bool = False) -> Signals:
    """The profile's statistics, summed over the backend's block traces on `ids`."""
    graph = backend.graph
    sums = SignalSums(graph.num_layers)

    with tqdm(desc="collecting signals", disable=not progress, unit="block", delay=PROGRESS_DELAY) as bar:
        def visit(i: int, t: BlockTrace) -> None:
            sums.block(i, t.input, t.output, t.ffn_out, t.attn_out)
            sums.projection_inputs(i, t.o_in, t.down_in)
            sums.key(i, t.key)
            bar.update()
        backend.block_traces(ids, visit)
    return sums.signals(lambda i: torch.from_numpy(backend.projection_weight(graph.blocks[i].attn.o)),
                        lambda i: torch.from_numpy(backend.projection_weight(graph.blocks[i].ffn.down)),
                        [b.attn.head_dim for b in graph.blocks], progress)


# seconds of work (cost.MEASURE_RATE) the options measured one by one may take; beyond, proxies
# (every option of refllama-16m: 0.59 of it; of MiniLM on 16K tokens of lines: 0.74–0.77)
OPTION_SECONDS = 300
# options a pass measures at least where proxies estimate the rest: the points of its map
MIN_MEASURED_PER_PASS = 6


def input_lengths(ids: Inputs) -> list[int]:
    return [len(r) for r in ids.rows] if hasattr(ids, "rows") else [ids.shape[1]] * ids.shape[0]


class OptionMeter:
    """Options applied alone to a copy of the model: their divergence from the dense model on
    `ids`. The dense outputs and the record of its blocks (an option edits its own layer only: the
    blocks before it replay the dense model's outputs, half the forward on average) are made on
    first use and kept until `close`."""

    def __init__(self, backend: Backend, signals: Signals, ids: Inputs, progress: bool):
        self.backend, self.signals, self.ids, self.progress = backend, signals, ids, progress
        self.reference: list[torch.Tensor | HeadInput] | None = None
        self.record = None
        self.positions = compared_positions(backend.graph, ids)
        head = None if self.positions is None else len(self.positions)
        lengths = input_lengths(ids)  # an encoder's thousands of lines: priced once per first layer
        self.work_from = [float(sum(forward_flops(backend.graph, n, first, head) for n in lengths))
                          for first in range(backend.graph.num_layers + 1)]  # + 1: the head's option

    def work(self, option: Option) -> float:
        """FLOPs of measuring it: the blocks the backend computes, from where its replay of the
        dense blocks ends (Backend.replay_start; the whole forward where it replays none: an ONNX
        model's options priced as replayed were half their work, and MiniLM's 132 and
        refllama-16m's 140 were all measured within an allowance meant for fewer)."""
        return self.work_from[self.backend.replay_start(PASSES[option.pass_name].first_layer(option))]

    def __call__(self, options: list[Option]) -> dict[str, float]:
        if not options:
            return {}
        if self.reference is None:
            reference, self.record = self.backend.reference_with_record(self.ids, self.positions)
            self.reference = with_logits(reference)
        is_lm = self.backend.graph.task == "causal-lm"
        result = {}
        for o in tqdm(options, desc="measuring options", disable=not self.progress, unit="opt"):
            first = PASSES[o.pass_name].first_layer(o)
            variant = apply_options(self.backend.clone(from_layer=first), [o], self.signals)
            outputs = variant.stream(self.ids, replay=(self.record, first), positions=self.positions,
                                     head_inputs=True)
            result[o.key] = divergence(self.reference, outputs, is_lm)
            variant.close()
            release_free_memory()
        return result

    def close(self) -> None:
        self.reference = self.record = None


Ranked = dict[str, list[tuple[Option, float]]]  # per pass, (option, proxy) in proxy order


def measured_subset(graph: TransformerGraph, options: list[Option], signals: Signals, meter: OptionMeter,
                    allowance: Allowance) -> tuple[list[Option], Ranked]:
    """The options to measure now within `allowance`: all where they fit; else those without a
    proxy and, per pass, options evenly spread over the proxy's order (as many as fit, at least
    MIN_MEASURED_PER_PASS). Also the proxied options by pass, (option, proxy) in proxy order."""
    if sum(meter.work(o) for o in options) <= allowance.left:
        return options, {}
    by_pass: Ranked = {}
    always = []
    for o in options:
        p = PASSES[o.pass_name].proxy(graph, o, signals)
        if p is None:
            always.append(o)
        else:
            by_pass.setdefault(o.pass_name, []).append((o, p))
    if not by_pass:
        return options, {}
    for ranked in by_pass.values():
        ranked.sort(key=lambda op: op[1])
    proxied = [o for ranked in by_pass.values() for o, _ in ranked]
    each = (allowance.left - sum(meter.work(o) for o in always)) / \
        (np.mean([meter.work(o) for o in proxied]) * len(by_pass))
    k = max(MIN_MEASURED_PER_PASS, int(each))
    chosen = always + [ranked[r][0] for ranked in by_pass.values() for r in spread(len(ranked), k)]
    return chosen, by_pass


def estimate_rest(by_pass: Ranked, measured: dict[str, float]
                  ) -> tuple[dict[str, float], dict[str, float | None]]:
    """Each unmeasured proxied option's KL through its pass's monotone map (proxy -> measured KL),
    and per pass Spearman's correlation of proxy and KL over its measured options."""
    estimate, spearman = {}, {}
    for name, ranked in by_pass.items():
        done = [(p, measured[o.key]) for o, p in ranked if o.key in measured]
        proxy, kl = np.array([p for p, _ in done]), np.array([v for _, v in done])
        spearman[name] = rank_correlation(proxy, kl)
        fit = monotone_map(proxy, kl)
        estimate |= {o.key: float(fit(np.array([p]))[0]) for o, p in ranked if o.key not in measured}
    return estimate, spearman


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


def _per_length(attn: dict) -> dict[int, int | None]:
    measured = attn["measured"]
    if isinstance(measured, list):
        return dict(zip(attn["lengths"], measured))
    return {n: measured for n in attn["lengths"]}


def run_profile(backend: Backend, calib: Calibration, passes: list[str], *, model_hash: str, settings: dict,
                progress: bool = True, use_cache: bool = True) -> tuple[Profile, list[Option], OptionMeter]:
    """Signals, the candidate options of `passes`, each option's KL (measured, or estimated from
    its proxy) and the meter that measures more of them. The cache entry is the model's on this
    data whatever the passes: each option is measured alone, so a compile with other passes
    reuses what an earlier one measured and measures only what it lacks (the attention profile,
    options of passes not searched before), within the same allowance."""
    graph = backend.graph
    # everything that changes a measured number is part of the key; the passes are not (they
    # choose which numbers are wanted)
    key = profile_key(model_hash, calib.digest, {**settings, "ridge": COMPENSATION_RIDGE})
    cached = load_cached(key) if use_cache else None
    seconds: dict[str, float] = {}
    peaks: dict[str, float] = {}
    if cached is None:
        with _phase("signals", seconds, peaks):
            signals = collect_signals(backend, calib.profile_ids, progress)
        prof = Profile(signals, {}, calib.source, int(calib.profile_ids.numel()), key)
    else:
        prof, signals = cached, cached.signals
    profiled_attention = "attn_pattern" in passes and signals.attention is None
    if profiled_attention:
        with _phase("attention", seconds, peaks):
            grid = [Pattern.from_json(p) for p in settings["attn"]["grid"]]
            signals.attention = profile_attention(backend, calib.attn_texts, calib.retrieval, grid,
                                                  progress=progress, retrieval_weight=calib.retrieval_weight,
                                                  measured_per_length=_per_length(settings["attn"]),
                                                  gate_samples=calib.gate_retrieval,
                                                  gate_steps=settings["attn"].get("gate_steps", 0))
    with _phase("options", seconds, peaks):
        candidates = offered(backend, signals, passes)
        meter = OptionMeter(backend, signals, calib.profile_ids, progress)
        missing = [o for o in candidates if PASSES[o.pass_name].measured and
                   o.key not in prof.option_kl and o.key not in prof.option_estimate]
        chosen, by_pass = measured_subset(graph, missing, signals, meter,
                                          Allowance(OPTION_SECONDS, settings.get("device", "cpu")))
        prof.option_kl |= meter(chosen)
        estimate, spearman = estimate_rest(by_pass, prof.option_kl)
        prof.option_estimate |= estimate
    prof.extra["option_spearman"] = prof.extra.get("option_spearman", {}) | spearman
    if use_cache and (cached is None or profiled_attention or missing):
        store(prof)
    # where the profile's time went (not cached: what a cache hit spared is not counted)
    prof.extra |= {"cached": cached is not None, "seconds": {k: round(v, 2) for k, v in seconds.items()},
                   "peak_host_gib": peaks, "options_measured": len(chosen)}
    return prof, candidates, meter


@contextlib.contextmanager
def _phase(name: str, seconds: dict[str, float], peaks: dict[str, float]):
    """Seconds and peak host RSS of one part of the profile (the report's split of its stage)."""
    t0 = time.perf_counter()
    with PeakMemory()() as meter:
        yield
    seconds[name], peaks[name] = time.perf_counter() - t0, meter.host_gib

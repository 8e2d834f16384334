"""What the attention profile costs at scale: tailor.passes.attention_profile.profile_attention on
random-weight models of SmolLM2-135M's and Llama-3-8B's shapes, at a prompt length's profiled
lengths (prompt/2 and prompt) with the compile's calibration shape there (one text window of
2048 tokens or fewer, four retrieval sequences a length; here random tokens, answers of 5).

Timed: the dense recording passes (with the proxy of every cell) and the measured cells, apart.
Random weights price the work, not the quality (the proxy's quality: benchmarks/attention_proxy.py).
The graph is recognised on a narrow CPU twin of the model (same layers, heads and module names),
so that the model itself is built once, where it runs.

    python benchmarks/attention_proxy_scale.py --shape smollm2-135m --prompt 4096 [--device cuda]
"""
from __future__ import annotations

import argparse
import time

import torch
import transformers as tf

from tailor.backends.torch_backend import TorchBackend, TorchPatternRunner
from tailor.data.retrieval import RetrievalSample
from tailor.passes.attention_profile import MEASURED_PER_LENGTH, profile_attention
from tailor.passes.attn_pattern import default_grid
from tailor.rewriter.capture import capture

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
}


def config(shape: str, **narrow) -> tf.LlamaConfig:
    c = tf.LlamaConfig(**{**SHAPES[shape], **narrow}, max_position_embeddings=16384)
    c.use_cache = False
    return c


class Timed(TorchPatternRunner):
    """The torch runner, with the time its recording passes and its measurements take."""
    seconds = {"record": 0.0, "measure": 0.0}

    def _timed(self, what, f, *args):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        started = time.perf_counter()
        out = f(*args)
        sync()
        self.seconds[what] += time.perf_counter() - started
        return out

    def record(self, batch, grid=None):
        return self._timed("record", super().record, batch, grid)

    def loss(self, layer, patterns, batches):
        return self._timed("measure", super().loss, layer, patterns, batches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--measured", type=int, default=MEASURED_PER_LENGTH)
    args = ap.parse_args()
    heads = SHAPES[args.shape]["num_attention_heads"]
    twin = tf.LlamaForCausalLM(config(args.shape, vocab_size=64, hidden_size=4 * heads, intermediate_size=8,
                                      head_dim=4))
    graph = capture(twin).graph
    torch.manual_seed(0)
    with torch.device(args.device):
        model = tf.LlamaForCausalLM(config(args.shape)).to(getattr(torch, args.dtype)).eval()
    backend = TorchBackend(model, graph)
    backend.pattern_runner = lambda: Timed(model, graph)
    lengths = [args.prompt // 2, args.prompt]
    gen = torch.Generator(device=args.device).manual_seed(0)
    ids = lambda b, n: torch.randint(0, model.config.vocab_size, (b, n), generator=gen, device=args.device)  # noqa: E731
    texts = {n: ids(max(1, 2048 // n), n) for n in lengths}
    retrieval = {n: [RetrievalSample(row, n - 5, 5) for row in ids(4, n)] for n in lengths}
    started = time.perf_counter()
    prof = profile_attention(backend, texts, retrieval, default_grid(args.prompt), retrieval_weight=0.25,
                             progress=False, measured_per_length=args.measured)
    total = time.perf_counter() - started
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"cpu, {torch.get_num_threads()} threads"
    cells = sum(int((p > 0).sum()) for p in prof.proxy.values())
    print(f"{args.shape} ({args.dtype}, {where}), prompt {args.prompt}, lengths {lengths}: "
          f"profile {total:.1f} s (recording with the proxy {Timed.seconds['record']:.1f} s, "
          f"{prof.measured} of {cells} cells measured {Timed.seconds['measure']:.1f} s)")


if __name__ == "__main__":
    main()

"""Which synthetic retrieval forms a causal LM answers: for each of tailor.data.retrieval.TEMPLATES,
the dense model's teacher-forced exact match on sequences of each length, the filler (for the
"text" forms) taken from a calibration text. What tailor's retrieval calibration rests on
(docs/BENCHMARKS.md, issue 24): a form the model does not answer measures nothing.

    python benchmarks/retrieval_forms.py --model MODEL.gguf|HF_DIR [--lengths 1024,4096] [--samples 8]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tailor.backends.runners import HFModel
from tailor.data.retrieval import TEMPLATES, answered, make_samples
from tailor.data.text import load_tokenizer
from tailor.rewriter.capture import load_gguf

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--calib", type=Path, default=SHARED / "data" / "code-calib.txt")
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model.suffix == ".gguf":
        inner = load_gguf(args.model, device="cpu", dtype="float32")
    else:
        import transformers as tf
        inner = tf.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    run, tok = HFModel(inner.eval()), load_tokenizer(args.model)
    text = torch.tensor(tok(args.calib.read_text()[:400_000], add_special_tokens=False)["input_ids"])
    for n in (int(x) for x in args.lengths.split(",")):
        for i, template in enumerate(TEMPLATES):
            t0 = time.perf_counter()
            share = answered(run, make_samples(tok, n, args.samples, 100 + n + i, template, text))
            print(json.dumps({"length": n, "form": f"{template.context}: {template.line.strip()}",
                              "samples": args.samples, "answered": share,
                              "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()

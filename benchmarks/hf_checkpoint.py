"""Standard checkpoints on refllama-16m: what --hf-compatible costs, and whether transformers alone
loads what --format hf writes.

Per budget (objective latency, target cpu, prompt 512; calibrated on code-calib.txt, evaluated
on code-eval.txt): `tailor.compile(..., hf_compatible=True, formats=("hf",))`, which searches the
unrestricted plan and the plan a standard config can say and measures both on the same held-out
calibration data. The artifact's hf/ folder is then loaded by AutoModelForCausalLM in a child
interpreter that never imports tailor, and its logits on code-eval windows and its greedy
continuation compared with tailor's rewritten model.

    python benchmarks/hf_checkpoint.py [--budgets 0.75,0.5] [--objective latency]
    python benchmarks/hf_checkpoint.py --as-qwen2 --objective kv_memory --budgets 0.5

`--as-qwen2`: refllama-16m's weights in Qwen2's architecture (Llama's, plus q/k/v biases, here
zeros, and a config listing each layer's kind): the same trained function, checked here, whose
standard config can say per-layer sliding windows, which Llama's cannot.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

import tailor
from tailor.data.text import load_tokenizer, read_text, token_windows

REPO = Path(__file__).resolve().parent.parent
SHARED = (REPO / "../shared").resolve()
MODEL = SHARED / "models" / "refllama-16m"
CALIB, EVAL = SHARED / "data" / "code-calib.txt", SHARED / "data" / "code-eval.txt"
RESULTS = REPO / "benchmarks" / "results" / "hf_checkpoint_cpu.json"
NEW_TOKENS = 32

# the child: transformers alone (the repository is not on its path), as a server would load it
CHILD = """
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM
folder, ids_file, out = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
ids = torch.from_numpy(np.load(ids_file))
with torch.no_grad():
    logits = model(ids).logits.numpy()
    tokens = model.generate(ids[:1, :64], max_new_tokens=%d, min_new_tokens=%d, do_sample=False)
np.save(out + ".npy", logits)
result = {"tokens": tokens[0, 64:].tolist(), "tailor_imported": "tailor" in sys.modules}
json.dump(result, open(out + ".json", "w"))
""" % (NEW_TOKENS, NEW_TOKENS)


def without_tailor(folder: Path, ids: torch.Tensor, work: Path) -> tuple[np.ndarray, list[int], bool]:
    (work / "child.py").write_text(CHILD)
    np.save(work / "ids.npy", ids.numpy())
    subprocess.run([sys.executable, str(work / "child.py"), str(folder), str(work / "ids.npy"),
                    str(work / "child")], check=True, cwd=work, timeout=600,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(work), "HF_HUB_OFFLINE": "1"})
    result = json.loads((work / "child.json").read_text())
    return np.load(work / "child.npy"), result["tokens"], result["tailor_imported"]


def as_qwen2(llama_dir: Path, out: Path) -> Path:
    """The Llama checkpoint as a Qwen2 one computing the same function (zero q/k/v biases)."""
    import transformers as tf

    dtype = tf.AutoConfig.from_pretrained(llama_dir).dtype
    llama = tf.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    c = llama.config
    same = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "eos_token_id", "pad_token_id")
    config = tf.Qwen2Config(**{k: getattr(c, k) for k in same}, rope_parameters=dict(c.rope_parameters),
                            use_sliding_window=False)
    qwen2 = tf.Qwen2ForCausalLM(config).eval()
    missing, unexpected = qwen2.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in missing)
    with torch.no_grad():
        for k in missing:
            qwen2.get_parameter(k).zero_()
        ids = torch.randint(0, c.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
        diff = float((qwen2(ids).logits - llama(ids).logits).abs().max())
        assert diff < 1e-4, f"the Qwen2 copy computes another function (max abs Δlogit {diff:.2g})"
    qwen2.to(dtype).save_pretrained(out)  # in the checkpoint's own dtype
    for f in llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def summary(labels: list[str]) -> str:
    """A plan's rewrites counted by kind, with the FFN widths and head layouts they leave."""
    skips = [x.split()[-1] for x in labels if x.startswith("skip layer")]
    ffn_skips = [x.split()[-1] for x in labels if x.startswith("skip FFN")]
    widths = sorted({int(x.split("keep ")[1].split("/")[0]) for x in labels if "FFN keep" in x})
    heads = sorted({x.split(": ", 1)[1] for x in labels if "KV ×" in x or "drop attention" in x})
    pruned = sum("FFN keep" in x for x in labels)
    parts = ([f"skip layer {', '.join(skips)}"] if skips else []) + \
        ([f"skip FFN {', '.join(ffn_skips)}"] if ffn_skips else []) + \
        ([f"{pruned} FFNs at {'/'.join(map(str, widths))}"] if widths else []) + \
        ([f"{sum(('KV ×' in x) or ('drop attention' in x) for x in labels)} attentions: {', '.join(heads)}"]
         if heads else [])
    windows = sorted({x.split("kv0 ", 1)[1].split(",")[0] for x in labels if ": kv0 " in x})
    patterned = sum(": kv0 " in x for x in labels)
    parts += [f"{patterned} layers' attention at {' / '.join(windows)}"] if patterned else []
    others = len(labels) - len(skips) - len(ffn_skips) - patterned - \
        sum("FFN keep" in x or "KV ×" in x or "drop attention" in x for x in labels)
    return "; ".join(parts + ([f"{others} other rewrites"] if others else [])) or "none"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0.75,0.5")
    ap.add_argument("--objective", default="latency")
    ap.add_argument("--as-qwen2", action="store_true", help="refllama-16m's weights in Qwen2's architecture")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not MODEL.is_dir():
        sys.exit(f"{MODEL} not found")
    tok = load_tokenizer(MODEL)
    ids = token_windows(tok(read_text(EVAL))["input_ids"], 256, 4)
    work = tempfile.TemporaryDirectory()
    model = as_qwen2(MODEL, Path(work.name) / "refllama-qwen2") if args.as_qwen2 else MODEL
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        start = time.perf_counter()
        compiled = tailor.compile(str(model), budget, objective=args.objective, target="cpu", prompt_len=512,
                                  calib=str(CALIB), eval_text=str(EVAL), hf_compatible=True, formats=("hf",))
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            out = compiled.save(Path(tmp) / "art")
            with torch.no_grad():
                want = compiled.model(ids).float().numpy()
            want_tokens = compiled.generate(ids[:1, :64].tolist(), max_new_tokens=NEW_TOKENS)[0]
            got, tokens, imported = without_tailor(out / "hf", ids, Path(tmp))
            config = json.loads((out / "hf" / "config.json").read_text())
        r = compiled.report
        rows.append({
            "budget": budget,
            "unrestricted_plan": r["hf_compatible"]["unrestricted_plan"],
            "unrestricted_kl_heldout": r["hf_compatible"]["unrestricted_measured_kl_heldout"],
            "restricted_plan": [x["label"] for x in compiled.plan.rewrites],
            "restricted_kl_heldout": r["hf_compatible"]["measured_kl_heldout"],
            "restricted_kl_heldout_refitted": r["search"]["measured_kl_heldout"],
            "restricted_kl_code_eval": r["quality"]["kl_to_reference"],
            "objective": args.objective, "architecture": config["architectures"][0],
            "predicted_latency_ratio": compiled.plan.predicted["latency"],
            "predicted": compiled.plan.predicted,
            "hf_config": {k: config.get(k) for k in ("num_hidden_layers", "intermediate_size",
                                                      "num_attention_heads", "num_key_value_heads",
                                                      "attention_bias", "mlp_bias", "layer_types",
                                                      "sliding_window")},
            "loaded_without_tailor": not imported,
            "max_abs_logit_diff": float(np.abs(got - want).max()),
            "greedy_equal": tokens == want_tokens,
            "compile_seconds": seconds,
        })
        print(json.dumps(rows[-1]), flush=True)
    info = {"command": " ".join(["python benchmarks/hf_checkpoint.py", *sys.argv[1:]]),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "date": date.today().isoformat(), "transformers": __import__("transformers").__version__,
            "rows": rows}
    args.out.write_text(json.dumps(info, indent=2) + "\n")
    print("| budget | unrestricted plan | held-out KL | --hf-compatible plan | held-out KL | after refit "
          "| code-eval KL | hf/ config | loaded without tailor | max abs Δlogit | greedy 32 equal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        c = x["hf_config"]
        sliding = sum(t == "sliding_attention" for t in c["layer_types"] or [])
        slides = f", {sliding} layers sliding at {c['sliding_window']}" if sliding else ""
        print(f"| {x['objective']} {x['budget']:g} | {summary(x['unrestricted_plan'])} "
              f"| {x['unrestricted_kl_heldout']:.4f} "
              f"| {summary(x['restricted_plan'])} | {x['restricted_kl_heldout']:.4f} "
              f"| {x['restricted_kl_heldout_refitted']:.4f} | {x['restricted_kl_code_eval']:.4f} "
              f"| {c['num_hidden_layers']} layers, FFN {c['intermediate_size']}, "
              f"{c['num_attention_heads']}/{c['num_key_value_heads']} heads{slides} "
              f"| {'yes' if x['loaded_without_tailor'] else 'no'} | {x['max_abs_logit_diff']:.2e} "
              f"| {'yes' if x['greedy_equal'] else 'no'} |")


if __name__ == "__main__":
    main()

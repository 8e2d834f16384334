"""tailor.compile() and tailor.load(): the pipeline of DESIGN.md, read top to bottom.

    capture -> (profile -> search -> rewrite) -> runnable model + plan + report -> save
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from tailor.errors import TailorError
from tailor.passes.cost import Workload, model_flops
from tailor.plan import OBJECTIVES, Plan, check_budget
from tailor.rewriter.capture import (
    TOKENIZER_FILES,
    Captured,
    OnnxSource,
    TorchSource,
    capture,
    example_input_ids,
    load_hf_directory,
)
from tailor.rewriter.export import export_onnx, save_onnx
from tailor.rewriter.graph import TransformerGraph
from tailor.runtime.artifact import verify_artifact, write_artifact
from tailor.runtime.session import HFModel, OrtModel

FORMATS = ("safetensors", "onnx")
# rewrite passes the search may use; the identity plan is all this build can produce
AVAILABLE_PASSES: tuple[str, ...] = ()


@dataclass
class Compiled:
    model: torch.nn.Module      # model(input_ids [B, T]) -> logits or hidden states
    plan: Plan
    report: dict[str, Any]
    graph: TransformerGraph | None = None
    source: TorchSource | OnnxSource | None = field(default=None, repr=False)
    formats: tuple[str, ...] = ()
    run_config: dict[str, Any] | None = None

    def save(self, out: str | Path, *, force: bool = False, check=None) -> Path:
        """Write the artifact directory atomically; refuses to replace one unless force.
        check(tmp_dir), if given, validates the written artifact before it is moved into place."""
        if self.source is None:
            raise TailorError("this Compiled was loaded from an artifact; copy the folder instead")
        return write_artifact(Path(out), self._write, force=force, check=check)

    def _write(self, tmp: Path) -> None:
        (tmp / "plan.json").write_text(self.plan.dumps())
        (tmp / "report.json").write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        if self.run_config is not None:
            (tmp / "run.yaml").write_text(yaml.safe_dump(self.run_config, sort_keys=False))
        src = self.source
        if isinstance(src, OnnxSource):
            save_onnx(src.model, tmp / "model.onnx")
            _copy_tokenizer(src.path.parent, tmp)
            return
        module = src.module
        if "safetensors" in self.formats:
            module.save_pretrained(tmp, safe_serialization=True)
        if "onnx" in self.formats:
            export_onnx(module, tmp / "model.onnx", encoder=self.graph.task == "encoder")
        if src.path is not None:
            _copy_tokenizer(src.path, tmp)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Carry the tokenizer along so the artifact is usable on its own (JSON/text files only)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())


def compile(model: Any, budget: float = 1.0, *, objective: str = "latency", seq_len: int = 1024,
            batch: int = 1, formats: tuple[str, ...] | None = None,
            trust_remote_code: bool = False, stages: "StageLog | None" = None) -> Compiled:
    """Compile `model` (an HF model, an HF directory or an .onnx path) to cost at most `budget`
    of the original under `objective` for a workload of `batch` × `seq_len` tokens."""
    budget = check_budget(budget)
    if objective not in OBJECTIVES:
        raise TailorError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    stages = stages or StageLog()
    with stages("capture"):
        cap = capture(model, trust_remote_code=trust_remote_code)
    formats = _resolve_formats(formats, cap)
    workload = Workload(batch=batch, seq_len=seq_len)
    with stages("search"):
        plan = Plan(cap.model_hash, budget, objective, {"batch": batch, "seq_len": seq_len},
                    rewrites=[], predicted={objective: 1.0})
        if budget < 1.0:
            passes = ", ".join(AVAILABLE_PASSES) or "none in this build"
            raise TailorError(f"budget {budget:g} is unreachable: with the available rewrite passes "
                              f"({passes}) the smallest reachable budget is 1.0")
    runnable = HFModel(cap.source.module) if isinstance(cap.source, TorchSource) \
        else OrtModel(cap.source.path)
    report = {"model": describe(cap.graph, workload), "plan": {"rewrites": plan.rewrites,
              "predicted_cost_ratio": plan.predicted}, "stages": stages.times}
    return Compiled(runnable, plan, report, cap.graph, cap.source, formats)


def load(folder: str | Path) -> Compiled:
    """Load an artifact written by Compiled.save(); verifies every file's sha256 first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TailorError(f"{folder}: no such artifact directory")
    files = verify_artifact(folder)
    plan = Plan.load(folder / "plan.json")
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise TailorError(f"{folder}/report.json: unreadable") from None
    if "model.safetensors" in files or "model.safetensors.index.json" in files:
        model: torch.nn.Module = HFModel(load_hf_directory(folder))
    elif "model.onnx" in files:
        model = OrtModel(folder / "model.onnx")
    else:
        raise TailorError(f"{folder}: the artifact holds no model (model.safetensors or model.onnx)")
    return Compiled(model, plan, report)


def describe(graph: TransformerGraph, workload: Workload) -> dict[str, Any]:
    """What `tailor inspect` shows: structure, parameters and FLOPs per block."""
    from tailor.passes.cost import attention_flops, ffn_flops

    return {
        "backend": graph.backend, "task": graph.task, "layers": graph.num_layers,
        "hidden_size": graph.hidden_size, "vocab_size": graph.vocab_size,
        "positional": graph.positional, "tied_embeddings": graph.tied_embeddings,
        "params": graph.params, "workload": {"batch": workload.batch, "seq_len": workload.seq_len},
        "flops": model_flops(graph, workload),
        "blocks": [{
            "layer": b.index, "heads": b.attn.num_heads, "kv_heads": b.attn.num_kv_heads,
            "head_dim": b.attn.head_dim, "rope": b.attn.rope, "causal": b.attn.causal,
            "attention_op": b.attn.kind, "ffn": b.ffn.kind, "activation": b.ffn.activation,
            "ffn_width": b.ffn.width, "norm": "/".join(sorted({n.kind for n in b.norms})),
            "residual": b.residual, "params": b.params,
            "attn_flops": attention_flops(b.attn, workload), "ffn_flops": ffn_flops(b.ffn, workload),
        } for b in graph.blocks],
    }


def _resolve_formats(formats, cap: Captured) -> tuple[str, ...]:
    if isinstance(cap.source, OnnxSource):
        if formats and set(formats) - {"onnx"}:
            raise TailorError("an ONNX input can only produce an ONNX artifact (--format onnx)")
        return ("onnx",)
    formats = tuple(formats or ("safetensors",))
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise TailorError(f"unknown format(s) {sorted(unknown)}; choose from {', '.join(FORMATS)}")
    return formats


def reference_outputs(model: torch.nn.Module, vocab: int, seq_len: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Sample token ids and the model's outputs on them, for validation."""
    ids = example_input_ids(vocab, seq_len, batch=1, seed=1)
    with torch.no_grad():
        return ids.numpy(), model(ids).float().numpy()


class StageLog:
    """Times pipeline stages. The CLI passes `status` (a spinner while a stage runs) and
    `on_done` (one line per finished stage)."""

    def __init__(self, on_done=None, status=None):
        self.times: dict[str, float] = {}
        self.on_done = on_done
        self.status = status

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        with self.status(name) if self.status else contextlib.nullcontext():
            yield
        self.times[name] = round(time.perf_counter() - t0, 3)
        if self.on_done:
            self.on_done(name, self.times[name])

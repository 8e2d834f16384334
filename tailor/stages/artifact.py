"""The result of a compile (`Compiled`), the artifact it saves, and `load`."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from tailor.backends.base import Backend
from tailor.backends.hf_checkpoint import HF_DIR, StandardShape, save_standard
from tailor.backends.onnx_export_folder import write_export_configs
from tailor.backends.runners import HFModel, OrtModel
from tailor.backends.torch_backend import BASE_CONFIG, TorchBackend
from tailor.core.devices import checkpoint_dtype, module_device, resolve_device
from tailor.core.dispatch import device_map_summary, dispatch, is_dispatched, resolve_max_memory
from tailor.core.errors import TailorError
from tailor.core.plan import Plan
from tailor.data.text import load_tokenizer
from tailor.passes.cost import Workload, attention_flops, ffn_flops, model_flops
from tailor.passes.registry import apply_options, options_from_plan
from tailor.quality.plots import plan_picture
from tailor.rewriter.capture import (
    TOKENIZER_FILES,
    Captured,
    OnnxSource,
    TorchSource,
    capture,
    example_input_ids,
    load_dtype,
    load_hf_directory,
    load_placement,
)
from tailor.rewriter.graph import TransformerGraph
from tailor.rewriter.onnx_check import InputShape, is_past_input
from tailor.rewriter.quantized.weights import MICROSOFT, quantized_linear
from tailor.runtime.artifact import verify_artifact, write_artifact

# tvm: a CPU build of model.onnx, so it implies onnx; hf: a standard transformers checkpoint in
# the artifact's hf/ folder (tailor.backends.hf_checkpoint)
FORMATS = ("safetensors", "onnx", "tvm", "hf")


@dataclass
class Compiled:
    model: torch.nn.Module      # model(input_ids [B, T]) -> logits or hidden states
    plan: Plan
    report: dict[str, Any]
    graph: TransformerGraph | None = None
    source: TorchSource | OnnxSource | None = field(default=None, repr=False)
    formats: tuple[str, ...] = ()
    run_config: dict[str, Any] | None = None
    rewritten: Backend | None = field(default=None, repr=False)   # the rewritten model in its backend
    standard: StandardShape | None = None   # the plan as a standard config says it (format hf)
    tune_trials: int = 0   # MetaSchedule samples for the TVM build's kernels (tailor.codegen.tvm.tune)

    def generate(self, prompts, max_new_tokens: int, **sampling) -> list[list[int]]:
        """Continue token-id prompts with the per-head KV cache (tailor.runtime.generate): Triton
        kernels where the model is on CUDA, their torch references elsewhere."""
        from tailor.runtime.generate import generate

        if isinstance(self.model, OrtModel):
            return self._generate_onnx(prompts, max_new_tokens, **sampling)
        if not isinstance(self.model, HFModel):
            raise TailorError("generate() runs transformers decoders and ONNX causal LMs")
        if is_dispatched(self.model.inner):
            raise TailorError("generate() runs a model on one device; this one is dispatched by accelerate "
                              "over several (its forward works as usual)")
        return generate(self.model, prompts, max_new_tokens, **sampling)

    def _generate_onnx(self, prompts, max_new_tokens: int, *, eos_token_id: int | None = None,
                       **sampling) -> list[list[int]]:
        """Greedy continuations by onnxruntime: a decoder with its KV cache as inputs and outputs
        (Optimum's, onnxruntime-genai's) as the runtimes that load it run it, the prompt once and
        then one token a step with the cache fed back; any other causal graph by running the
        whole sequence again for each token."""
        if sampling.get("do_sample"):
            raise TailorError("generate() on an ONNX model is greedy only")
        if self.graph is not None and self.graph.task != "causal-lm":
            raise TailorError(f"generate() continues causal LMs; this model is a {self.graph.task}")
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        cached = self.model.has_cache
        out = []
        for prompt in prompts:
            ids, past = list(prompt), None
            for _ in range(max_new_tokens):
                if cached:
                    step = ids if past is None else ids[-1:]
                    logits, past = self.model.run_cached(np.asarray([step], dtype=np.int64), past,
                                                         len(ids) - len(step))
                else:
                    logits = self.model.run_numpy(np.asarray([ids], dtype=np.int64))
                ids.append(int(logits[0, -1].argmax()))
                if ids[-1] == eos_token_id:
                    break
            out.append(ids[len(prompt):])
        return out

    def save(self, out: str | Path, *, force: bool = False, check=None) -> Path:
        """Write the artifact directory atomically; refuses to replace one unless force.
        check(tmp_dir), if given, validates the written artifact before it is moved into place."""
        if self.source is None:
            raise TailorError("this Compiled was loaded from an artifact; copy the folder instead")
        return write_artifact(Path(out), lambda tmp: self._write(tmp, Path(out)), force=force, check=check)

    def _write(self, tmp: Path, out: Path) -> None:
        (tmp / "plan.json").write_text(self.plan.dumps())
        self._write_model(tmp)
        if "tvm" in self.formats:
            self._build_tvm(tmp, out)
        (tmp / "report.json").write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        if self.plan.rewrites and self.graph is not None:
            plan_picture(self.graph, self.plan.rewrites, tmp / "plan.png",
                         length=self.plan.workload.get("prompt_len", 1024))
        if self.run_config is not None:
            (tmp / "run.yaml").write_text(yaml.safe_dump(self.run_config, sort_keys=False))

    def _write_model(self, tmp: Path) -> None:
        src = self.source
        if isinstance(self.rewritten, TorchBackend):
            # reloading a rewritten model replays the plan's structure on the original architecture
            base = src.module.config.to_dict()
            base["architectures"] = [type(src.module).__name__]
            self.rewritten.save(tmp, self.formats, base_config=base)
        else:
            self.rewritten.save(tmp, self.formats)
        if isinstance(src, OnnxSource):
            # an exporter's folder (Optimum's): its configs, updated, so its runtimes load the artifact
            skipped = {r["layer"] for r in self.plan.rewrites if r["pass"] == "layer_skip"}
            configs = write_export_configs(self.rewritten.model, self.graph, skipped, src.path.parent, tmp)
            if configs is not None:
                self.report["export_folder"] = configs
        folders = [tmp]
        if "hf" in self.formats:
            save_standard(self.rewritten.model, src.module, self.standard, tmp / HF_DIR)
            folders.append(tmp / HF_DIR)
        # the tokenizer: in the HF directory, beside the .onnx file, or in a GGUF's metadata
        tokenizer = src.path.parent if isinstance(src, OnnxSource) else src.path
        # a file (GGUF) holds it in its metadata: read once, written to each folder
        from_file = load_tokenizer(tokenizer) if tokenizer is not None and tokenizer.is_file() else None
        for folder in folders:
            if from_file is not None:
                from_file.save_pretrained(folder)
            elif tokenizer is not None:
                _copy_tokenizer(tokenizer, folder)

    def _build_tvm(self, tmp: Path, out: Path) -> None:
        """model.so + weights from the written model.onnx, for the plan's workload shape; the
        tuning records of the artifact it replaces, if any, are reused."""
        from tailor.codegen.tvm.build import build
        from tailor.codegen.tvm.tune import TUNE_DB

        w = self.plan.workload
        info = build(tmp / "model.onnx", tmp, batch=w.get("batch", 1), seq_len=w.get("prompt_len", 1024),
                     causal=self.graph.task == "causal-lm", vocab_size=self.graph.vocab_size,
                     tune_trials=self.tune_trials, records=out / TUNE_DB, progress=True)
        info = {k: v for k, v in info.items() if k != "params"}
        if any(r["pass"] == "attn_pattern" for r in self.plan.rewrites):
            info["attention"] = (
                "attention patterns run in TVM as the block-sparse ONNX ops (gathers and batched "
                "products, untuned)" if isinstance(self.source, OnnxSource) else
                "attention patterns run in TVM as dense attention under a mask: correct, but no "
                "attention work is saved (the exported graph masks; no sparse TVM lowering yet)")
        self.report["tvm"] = info


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Carry the tokenizer along so the artifact is usable on its own (JSON/text files only)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())


def resolve_formats(formats, cap: Captured) -> tuple[str, ...]:
    if "tvm" in (formats or ()) and importlib.util.find_spec("tvm") is None:
        raise TailorError("format tvm needs Apache TVM: pip install 'apache-tvm==0.27.0.post1' "
                          "(the tailor[tvm] extra)")
    if isinstance(cap.source, OnnxSource):
        if formats and set(formats) - {"onnx", "tvm"}:
            raise TailorError("an ONNX input can only produce an ONNX artifact (--format onnx or onnx,tvm)")
        if "tvm" in (formats or ()) and any(map(is_past_input, cap.source.input_names)):
            raise TailorError("format tvm builds a graph of token inputs only; this decoder has KV cache "
                              "inputs (past_key_values.N.*): --format onnx")
        runtime_ops = sorted({n.op_type for n in cap.source.model.graph
                              if n.domain == MICROSOFT and quantized_linear(n) is not None})
        if "tvm" in (formats or ()) and runtime_ops:
            raise TailorError(f"format tvm: TVM's ONNX importer has no {' or '.join(runtime_ops)} "
                              f"(onnxruntime's quantized ops, which this model's weights are in): "
                              f"--format onnx")
        return ("onnx", "tvm") if "tvm" in (formats or ()) else ("onnx",)
    formats = tuple(formats or ("safetensors",))
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise TailorError(f"unknown format(s) {sorted(unknown)}; choose from {', '.join(FORMATS)}")
    if "hf" in formats and cap.graph.task != "causal-lm":
        raise TailorError(f"format hf writes causal LMs (AutoModelForCausalLM); this model is a "
                          f"{cap.graph.task}")
    if set(formats) - {"safetensors"} and is_dispatched(cap.source.module):
        raise TailorError("the model is dispatched by accelerate over several devices: it is saved as "
                          "safetensors only (the ONNX export traces the model whole on one device)")
    if "tvm" in formats and "onnx" not in formats:
        formats = formats + ("onnx",)
    return formats


def load(folder: str | Path, runtime: str | None = None, *, device: str = "cpu",
         dtype: str = "auto", max_memory: dict | str | None = None) -> Compiled:
    """Load an artifact written by Compiled.save(); verifies every file's sha256 first.
    runtime "tvm" runs its TVM build (format tvm); otherwise its model runs in PyTorch
    (safetensors, on `device` in `dtype`: tailor.core.devices, or spread by accelerate over the
    devices `max_memory` names, as tailor.compile) or onnxruntime (model.onnx)."""
    max_memory = resolve_max_memory(max_memory)
    folder = Path(folder)
    if not folder.is_dir():
        raise TailorError(f"{folder}: no such artifact directory")
    files = verify_artifact(folder)
    if runtime not in (None, "tvm"):
        raise TailorError(f"unknown runtime {runtime!r}; leave it out, or 'tvm'")
    if runtime == "tvm" and "tvm.json" not in files:
        raise TailorError(f"{folder}: the artifact holds no TVM build (compile with format tvm)")
    plan = Plan.load(folder / "plan.json")
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise TailorError(f"{folder}/report.json: unreadable") from None
    if runtime == "tvm":
        from tailor.codegen.tvm.module import TvmModel

        model: torch.nn.Module = TvmModel(folder)
    elif BASE_CONFIG in files and plan.rewrites:
        model = HFModel(load_rewritten(folder, plan, device, dtype, max_memory))
    elif "model.safetensors" in files or "model.safetensors.index.json" in files:
        model = HFModel(load_hf_directory(folder, device=device, dtype=dtype, max_memory=max_memory))
    elif f"{HF_DIR}/config.json" in files:  # format hf alone
        model = HFModel(load_hf_directory(folder / HF_DIR, device=device, dtype=dtype, max_memory=max_memory))
    elif "model.onnx" in files:
        # a graph of fixed length runs shorter inputs padded where that is exact: causal, as compiled
        blocks = report.get("model", {}).get("blocks") or [{"causal": False}]
        model = OrtModel(folder / "model.onnx", causal=all(b.get("causal") for b in blocks))
    else:
        raise TailorError(f"{folder}: the artifact holds no model (model.safetensors or model.onnx)")
    return Compiled(model, plan, report)


def load_rewritten(folder: Path, plan: Plan, device: str = "cpu", dtype: str = "auto",
                   max_memory: dict[int | str, int] | None = None) -> torch.nn.Module:
    """Rebuild a rewritten model: the original architecture from base_config.json, the plan's
    structural edits (shapes only), then the weights from safetensors (strictly), on `device`
    in `dtype`, or spread by accelerate over the devices `max_memory` names."""
    import transformers
    from safetensors.torch import load_file

    cfg = json.loads((folder / BASE_CONFIG).read_text())
    if cfg.get("auto_map"):
        raise TailorError(f"{folder}/{BASE_CONFIG}: remote code is not loaded")
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch or "", None)
    if cls is None:
        raise TailorError(f"{folder}/{BASE_CONFIG}: unknown architecture {arch!r}")
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "model_type"},
                                              model_type=cfg["model_type"])
    model = cls(config).eval()
    graph = capture(model).graph
    backend = TorchBackend(model, graph)
    apply_options(backend, options_from_plan(graph, plan.rewrites, f"{folder}/plan.json", backend), None)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {graph.lm_head.weight.name} if graph.lm_head is not None and graph.tied_embeddings else set()
    if unexpected or set(missing) - tied:
        raise TailorError(f"{folder}: weights do not match the plan's structure "
                          f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if tied:
        model.tie_weights()
    where = resolve_device(device)
    model = model.to(load_dtype(checkpoint_dtype(cfg), where, dtype))
    if max_memory is None and where.type == "cpu":
        return model  # built there
    # placed as tailor.compile loads a model: on the device, or spread by accelerate
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    placed = load_placement(folder, need, device, model.dtype, max_memory)
    if placed["device_map"] == "auto":
        return dispatch(model, placed.get("max_memory"))
    return model.to(placed["device_map"])


def describe(graph: TransformerGraph, workload: Workload) -> dict[str, Any]:
    """What `tailor inspect` shows: structure, parameters and FLOPs per block."""
    return {
        "backend": graph.backend, "task": graph.task, "layers": graph.num_layers,
        "hidden_size": graph.hidden_size, "vocab_size": graph.vocab_size,
        "positional": graph.positional, "tied_embeddings": graph.tied_embeddings,
        "max_positions": graph.max_positions, "params": graph.params,
        "workload": {"batch": workload.batch, "prompt_len": workload.prompt_len, "gen_len": workload.gen_len,
                     "logits": "last position" if workload.last_logits else "every position"},
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


def placement(cap: Captured) -> dict[str, Any]:
    """Where the model was compiled and in which precision (an ONNX model: onnxruntime on the
    CPU, in the file's own types). A model dispatched by accelerate: where its inputs go, and
    where its modules went (`device_map`: {where: modules})."""
    if cap.source.backend != "torch":
        return {"device": "cpu", "dtype": "as stored"}
    module = cap.source.module
    placed = {"device": str(module_device(module)), "dtype": str(module.dtype).removeprefix("torch.")}
    return placed | ({"device_map": device_map_summary(module)} if is_dispatched(module) else {})


def reference_outputs(model: torch.nn.Module, vocab: int, seq_len: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Sample token ids and the model's outputs on them, for validation: of the batch and length
    an ONNX graph fixes, where it does (what the artifact's model takes unpadded)."""
    fixed = model.input_shape if isinstance(model, OrtModel) else InputShape()
    batch, seq_len = fixed.example(1, seq_len)
    ids = example_input_ids(vocab, seq_len, batch=batch, seed=1)
    with torch.no_grad():
        return ids.numpy(), model(ids).float().cpu().numpy()

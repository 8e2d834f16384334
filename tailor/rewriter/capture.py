"""Capture: a model (HF module, HF directory, .gguf or .onnx file) -> TransformerGraph + its source.

Loading never unpickles: HF weights only from safetensors, configs from JSON, GGUF through
transformers' GGUF reader (raw tensors and typed metadata), ONNX as ONNX.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch

from tailor.core.devices import checkpoint_dtype, module_device, resolve_device, resolve_dtype
from tailor.core.digests import sha256_files
from tailor.core.dispatch import (
    check_supported,
    device_map_summary,
    format_memory,
    is_dispatched,
    stored_state,
)
from tailor.core.errors import TailorError, first_line
from tailor.data.text import load_tokenizer
from tailor.rewriter.cleanup import clean
from tailor.rewriter.fx_dataflow import FxDataflow
from tailor.rewriter.graph import TransformerGraph
from tailor.rewriter.onnx_check import InputShape, check_onnx_file
from tailor.rewriter.onnx_dataflow import OnnxDataflow
from tailor.rewriter.onnx_kv_cache import check_caches, check_not_merged, has_cache
from tailor.rewriter.onnx_surgery import region
from tailor.rewriter.quantized import read_quantized
from tailor.rewriter.recognize import recognize
from tailor.rewriter.unfuse import unfuse, unsupported_ops

# files worth carrying into an artifact so the result stays HF-loadable; never pickles
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "merges.txt", "vocab.json", "tokenizer.model",
                   "generation_config.json", "added_tokens.json",
                   "chat_template.jinja")  # where transformers 5 saves a chat template


@dataclass
class TorchSource:
    module: torch.nn.Module            # a transformers PreTrainedModel, in eval mode
    path: Path | None = None           # the HF directory or .gguf file it came from, if any

    backend = "torch"

    @property
    def config(self):
        return self.module.config


@dataclass
class OnnxSource:
    model: ir.Model
    path: Path
    input_names: list[str] = field(default_factory=list)
    data_files: list[str] = field(default_factory=list)  # external data, relative to path's folder
    cleaned: dict[str, int] = field(default_factory=dict)  # lossless clean-ups: sites per rule
    input_shape: InputShape = InputShape()  # the batch and length the graph fixes, if any

    backend = "onnx"


@dataclass
class Captured:
    graph: TransformerGraph
    source: TorchSource | OnnxSource
    model_hash: str


def capture(model: Any, *, trust_remote_code: bool = False, device: str | torch.device = "auto",
            dtype: str | torch.dtype = "auto", max_memory: dict[int | str, int] | None = None,
            seq_len: int = 16) -> Captured:
    """Recognise any supported model. `model` is an nn.Module, an HF directory, a .gguf or an
    .onnx path.
    A torch model is captured where it will be compiled: `device` and `dtype` (tailor.core.devices;
    for a module, auto is where it already is and its own dtype). Files are loaded through
    accelerate over the devices `max_memory` names ({GPU index or "cpu": bytes}), or over every
    GPU and host memory where a GPU asked as auto or cuda cannot hold the weights alone; a module
    already dispatched by accelerate is compiled as it is placed."""
    if isinstance(model, torch.nn.Module):
        if max_memory is not None:
            raise TailorError("--max-memory places a model as it is loaded from files; dispatch a module "
                              "with accelerate (infer_auto_device_map, dispatch_model) before compiling it")
        return capture_torch(on_device(model, device, dtype), seq_len=seq_len)
    if not isinstance(model, (str, Path)):
        raise TailorError(f"cannot compile a {type(model).__name__}: pass a transformers model, "
                          f"an HF model directory, a .gguf or an .onnx file")
    path = Path(model)
    if not path.exists():
        raise TailorError(f"{path}: no such file or directory")
    if path.is_dir():
        if is_onnx_export(path):
            return capture_onnx(path / "model.onnx")
        if (path / "config.json").is_file():
            module = load_hf_directory(path, trust_remote_code=trust_remote_code, device=device, dtype=dtype,
                                       max_memory=max_memory)
            return capture_torch(module, seq_len=seq_len, path=path)
        if (path / "model.onnx").is_file():
            return capture_onnx(path / "model.onnx")
        raise TailorError(f"{path}: a directory without config.json (HF model) or model.onnx")
    if path.suffix == ".gguf":
        return capture_torch(load_gguf(path, device=device, dtype=dtype, max_memory=max_memory),
                             seq_len=seq_len, path=path)
    return capture_onnx(path)


def is_onnx_export(folder: Path) -> bool:
    """An exporter's folder (Optimum's: model.onnx beside config.json and the tokenizer), not an HF
    checkpoint: it has model.onnx and no safetensors weights."""
    return (folder / "model.onnx").is_file() and not any(folder.glob("*.safetensors*"))


# ---- torch ---------------------------------------------------------------------------------

def on_device(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """The module itself where it already is on `device` in `dtype` (auto: its own), else a copy
    moved there: the user's module is never changed. A module dispatched by accelerate over
    several devices stays as it is placed."""
    import copy

    here = module_device(module)
    params = next(module.parameters(), None)
    want_device = here if str(device or "auto") == "auto" else resolve_device(device)
    stored = params.dtype if params is not None else torch.float32
    want_dtype = resolve_dtype(dtype, want_device, stored)
    if want_device == here and want_dtype == stored:
        return module
    if is_dispatched(module):
        raise TailorError(f"the model is dispatched by accelerate ({device_map_summary(module)}); it is "
                          f"compiled as it is placed: leave --device and --dtype at auto")
    return copy.deepcopy(module).to(want_device, want_dtype)


def load_dtype(stored: torch.dtype | None, device: torch.device, dtype) -> torch.dtype:
    """`auto`: the checkpoint's dtype (`stored`) on a GPU; float32 on the CPU, where bf16/fp16
    matmuls are emulated or slow on most processors and the reference numbers of a CPU compile
    are fp32."""
    if str(dtype or "auto") == "auto" and device.type == "cpu":
        return torch.float32
    return resolve_dtype(dtype, device, stored)


def load_hf_directory(path: Path, *, trust_remote_code: bool = False, device="cpu",
                      dtype="auto", max_memory: dict[int | str, int] | None = None) -> torch.nn.Module:
    """The model, its weights read from safetensors straight onto `device` in `dtype` (one copy;
    no fp32 upcast of a bf16 checkpoint unless asked), or spread by accelerate (`load_placement`)."""
    import transformers

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TailorError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise TailorError(f"{path / 'config.json'}: expected a JSON object")
    if config.get("auto_map") and not trust_remote_code:
        raise TailorError(f"{path}: config.json asks for remote code (auto_map); refusing to run "
                          f"it — pass --trust-remote-code if you trust this model")
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise TailorError(f"{path}: config.json names architecture {archs[:1] or 'none'}, which "
                          f"transformers {transformers.__version__} does not provide")
    has_st = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    if not has_st:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
        extra = f" (found {', '.join(pickled)}: pickle files are never loaded)" if pickled else ""
        raise TailorError(f"{path}: no model.safetensors{extra}")
    where = resolve_device(device)
    dtype = load_dtype(checkpoint_dtype(config), where, dtype)
    placed = load_placement(path, weight_bytes(path, dtype), device, dtype, max_memory)
    return from_pretrained(cls, path, path, use_safetensors=True, dtype=dtype,
                           trust_remote_code=trust_remote_code, **placed)


def from_pretrained(cls, source: Path, folder: Path, **kwargs) -> torch.nn.Module:
    """`cls.from_pretrained(folder, **kwargs)` from local files, in eval mode; a failure, or weights
    that do not fill the model, as a TailorError naming `source`."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        module, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True, **kwargs)
    except Exception as e:  # transformers raises many types for broken files
        raise TailorError(f"{source}: could not load the model: {first_line(e)}") from None
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "mismatched_keys")}
    if bad:
        detail = "; ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[:3]}" for k, v in bad.items())
        raise TailorError(f"{source}: weights do not match the config ({detail})")
    return module.eval()


def weight_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes the checkpoint's floating-point weights take in `dtype` (from the safetensors
    headers: nothing is loaded)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                floating = sl.get_dtype().startswith(("F", "BF"))
                total += math.prod(sl.get_shape()) * (itemsize if floating else 1)
    return total


def host_available() -> int:
    """Bytes the host can still give: MemAvailable (free pages and reclaimable page cache, where
    the weights just read usually sit), or the free pages where /proc is not there."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_memory(device: int | str | torch.device) -> tuple[int, str]:
    """Bytes free on a GPU (an index or a cuda device) or in host memory ("cpu"), and its name."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"{device} ({torch.cuda.get_device_name(device)})"
    return host_available(), "host memory"


def load_placement(path: Path, need: int, device, dtype: torch.dtype,
                   max_memory: dict[int | str, int] | None) -> dict[str, Any]:
    """from_pretrained's placement arguments for weights of `need` bytes in `dtype`: the device
    itself where they fit there; through accelerate (device_map="auto") over the devices
    `max_memory` names, or over every GPU and host memory where a GPU asked as auto or cuda cannot
    hold them alone. Refused, before anything is loaded, where they fit nowhere (a compile needs
    more than the weights: activations, a copy of each rewritten layer)."""
    where = resolve_device(device)
    asked = str(device or "auto")
    name = str(dtype).removeprefix("torch.")
    if max_memory is not None:
        gpus = sorted(k for k in max_memory if k != "cpu")
        if asked not in ("auto", "cuda", "cpu") or (asked == "cpu" and gpus):
            raise TailorError(f"--max-memory places the model on the devices it names; leave --device at "
                              f"auto (it is {asked})")
        usable = {k: min(v, free_memory(k)[0]) for k, v in max_memory.items()}
        if need > sum(usable.values()):
            raise TailorError(f"{path}: its weights take {need / 2**30:.1f} GiB in {name}, more than the "
                              f"{sum(usable.values()) / 2**30:.1f} GiB that --max-memory gives where free "
                              f"({format_memory(usable)}); give more, or choose a smaller --dtype")
        return {"device_map": "auto", "max_memory": max_memory}
    free, there = free_memory(where)
    if need <= free:
        return {"device_map": where}
    if where.type == "cuda" and asked in ("auto", "cuda"):
        usable = {i: free_memory(i)[0] for i in range(torch.cuda.device_count())} | {"cpu": host_available()}
        if need <= sum(usable.values()):
            return {"device_map": "auto"}
        raise TailorError(f"{path}: its weights take {need / 2**30:.1f} GiB in {name}, more than the "
                          f"{sum(usable.values()) / 2**30:.1f} GiB free on every GPU and in host memory "
                          f"together ({format_memory(usable)}); choose a smaller --dtype")
    raise TailorError(f"{path}: its weights take {need / 2**30:.1f} GiB in {name}, more than the "
                      f"{free / 2**30:.1f} GiB free on {there}; choose a smaller --dtype or another "
                      f"--device")


def example_input_ids(vocab_size: int, seq_len: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen)


def capture_torch(module: torch.nn.Module, *, seq_len: int = 16, path: Path | None = None) -> Captured:
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "vocab_size"):
        raise TailorError(f"{type(module).__name__} is not a transformers model (no config.vocab_size)")
    module.eval()
    ids = example_input_ids(int(config.vocab_size), seq_len)
    old_cache = getattr(config, "use_cache", None)
    config.use_cache = False  # a DynamicCache in the outputs does not export
    try:
        if is_dispatched(module):
            check_supported(module)
            traced, ids = structure_twin(module), ids.to("meta")
        else:
            traced, ids = module, ids.to(module_device(module))
        with torch.no_grad():
            program = torch.export.export(traced, (ids,), strict=False)
    except TailorError:
        raise
    except Exception as e:
        raise TailorError(f"torch.export could not capture {type(module).__name__}: "
                          f"{str(e).splitlines()[0]}") from None
    finally:
        if old_cache is not None:
            config.use_cache = old_cache
    graph = recognize(FxDataflow(program))
    digest = source_digest(path) if path is not None else hash_state_dict(module)
    return Captured(graph, TorchSource(module, path), digest)


def structure_twin(module: torch.nn.Module) -> torch.nn.Module:
    """The module's architecture with its weights on the meta device, for torch.export to trace in
    place of a model dispatched by accelerate: export cannot run accelerate's hooks (they move
    weights by data pointer, which export's fake tensors lack), and recognition needs the
    structure only, so not one weight is read or moved. Built from the config; refused where its
    weights' names and shapes are not the module's (a model changed after it was built)."""
    import copy

    with torch.device("meta"):
        twin = type(module)(copy.deepcopy(module.config)).to(module.dtype).eval()
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    twin_shapes = {n: tuple(p.shape) for n, p in twin.named_parameters()}
    if shapes != twin_shapes:
        differ = sorted(set(shapes.items()) ^ set(twin_shapes.items()))[:2]
        raise TailorError(f"the dispatched {type(module).__name__} differs from what its config builds "
                          f"({differ}); tailor captures a dispatched model from its config")
    return twin


def source_digest(path: Path) -> str:
    """A model loaded from files is named by them, whatever dtype and device it was loaded in: a
    plan made on a GPU in bf16 replays on the CPU in fp32. A GGUF by the file; an HF directory by
    its safetensors."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    return "sha256:" + sha256_files(files)


def hash_state_dict(module: torch.nn.Module) -> str:
    """One sha256 over each tensor's name and the sha256 of its bytes (offloaded ones read from
    where accelerate keeps them). The tensors are hashed on several threads (hashlib lets go of
    the GIL on large buffers): one thread took 27 s of an 8B model's 43 s capture on an H100 host."""
    from concurrent.futures import ThreadPoolExecutor

    def digest(t: torch.Tensor) -> bytes:
        data = t.detach().contiguous().cpu().view(torch.uint8).numpy() if t.numel() else b""
        return hashlib.sha256(data).digest()

    items = sorted(stored_state(module).items())
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(digest, (t for _, t in items)))
    h = hashlib.sha256()
    for (name, _), d in zip(items, digests):
        h.update(name.encode())
        h.update(d)
    return "sha256:" + h.hexdigest()


# ---- GGUF --------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"


@dataclass
class GgufHeader:
    architecture: str        # general.architecture, llama.cpp's name (llama, qwen2, ...)
    parameters: int          # elements of every tensor: the dequantized model's parameter count
    stored: torch.dtype      # what `--dtype auto` loads it in on a GPU


def read_gguf_header(path: Path) -> GgufHeader:
    """The header and tensor table of a GGUF file (no tensor is read), or a TailorError: a file
    that is not GGUF, or one cut short."""
    return _header(path, _parse_gguf(path))


def _parse_gguf(path: Path):
    """gguf's reader over the file (its metadata parsed, its tensors mapped, not read)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise TailorError(f"{path}: reading GGUF files needs the gguf package: "
                          f"pip install 'gguf>=0.10'") from None
    with open(path, "rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise TailorError(f"{path}: not a GGUF file (it does not start with the bytes GGUF)")
    try:
        reader = GGUFReader(path)
        reader.fields["general.architecture"]
        return reader
    except Exception as e:  # the reader fails on offsets past the end with numpy's errors
        raise TailorError(f"{path}: unreadable GGUF file, truncated or corrupt ({first_line(e)})") from None


def _header(path: Path, reader) -> GgufHeader:
    from gguf import GGMLQuantizationType

    try:
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:
        raise TailorError(f"{path}: unreadable GGUF file, truncated or corrupt ({first_line(e)})") from None
    kinds = {t.tensor_type for t in reader.tensors}
    floats = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
              GGMLQuantizationType.BF16: torch.bfloat16}
    if kinds <= set(floats):
        # a file's F32 tensors are its norms beside half-precision weights: the half type is the model's
        stored = next((floats[k] for k in (GGMLQuantizationType.BF16, GGMLQuantizationType.F16)
                       if k in kinds), torch.float32)
    else:  # quantized blocks: bf16, what GPU checkpoints come in (fp16 activations can overflow)
        stored = torch.bfloat16
    return GgufHeader(architecture, sum(int(t.n_elements) for t in reader.tensors), stored)


def gguf_architectures() -> list[str]:
    """The GGUF architectures this transformers reads (llama.cpp's names)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # the mapping the list is made from has sections that are no architecture
    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    try:  # newer transformers read some architectures through a second, faster path
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
        names |= set(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    return sorted(names)


@contextmanager
def _gguf_parsed_once(path: Path, reader):
    """Within: transformers reuses `reader` (the parse of `path`) and builds gguf's tensor-name
    table once. Unpatched it parses the file again for the config and again for the weights, and
    builds that table for each of the model's ~700 modules (a SmolLM2-135M capture: 3.3 + 4.5 of
    its 19.5 s on this project's 2-core CPU). Both are looked up in the gguf module at call time,
    so replacing them there for the duration of the load reaches transformers' own calls."""
    import gguf

    parse, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    same = path.resolve()
    gguf.GGUFReader = lambda p, *a, **k: reader if Path(p).resolve() == same and not a and not k \
        else parse(p, *a, **k)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = parse, name_map


def load_gguf(path: Path, *, device="cpu", dtype="auto",
              max_memory: dict[int | str, int] | None = None) -> torch.nn.Module:
    """A plain transformers model from a GGUF file: weights dequantized by transformers straight
    into `dtype` on `device` (auto: float32 on the CPU, else the file's float type, bfloat16 for
    quantized blocks), or spread by accelerate (`load_placement`), with nothing of the quantizer
    left, so it saves like any HF model."""
    import transformers

    path = Path(path)
    reader = _parse_gguf(path)
    header = _header(path, reader)
    dtype = load_dtype(header.stored, resolve_device(device), dtype)
    need = header.parameters * torch.empty((), dtype=dtype).element_size()
    placed = load_placement(path, need, device, dtype, max_memory)
    # the absolute path: transformers looks a relative gguf_file up in the working directory first
    options = {"gguf_file": str(path.resolve())}
    if hasattr(transformers, "GgufConfig"):  # transformers 5 keeps GGUF blocks packed unless asked
        options["quantization_config"] = transformers.GgufConfig(gguf_file=options["gguf_file"],
                                                                 dequantize=True)
    try:
        with _gguf_parsed_once(path, reader):
            module = from_pretrained(transformers.AutoModelForCausalLM, path, path.parent, dtype=dtype,
                                     **placed, **options)
            # kept by load_tokenizer for the calibration and the artifact, built while this parse
            # of the file is at hand (parsed again for it: 11 s of a 99 s compile on an H100 host)
            with suppress(TailorError):  # --tokenizer DIR may stand in for it
                load_tokenizer(path)
    except TailorError:
        spelled = {a.replace("_", "").replace("-", "") for a in gguf_architectures()}
        if header.architecture.replace("_", "").replace("-", "") not in spelled:
            raise TailorError(f"{path}: a GGUF of architecture {header.architecture!r}, which transformers "
                              f"{transformers.__version__} cannot load; it loads "
                              f"{', '.join(gguf_architectures())}") from None
        raise
    # the weights are plain tensors now: without this the model refuses save_pretrained
    if hasattr(module.config, "quantization_config"):
        del module.config.quantization_config
    module.hf_quantizer = None
    return module


# ---- ONNX ----------------------------------------------------------------------------------

def _external_tensors(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    """(tensor name, location) of every tensor whose data lives in another file."""
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        tensors.extend(a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return [(t.name, next((e.value for e in t.external_data if e.key == "location"), ""))
            for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]


def check_external_data(proto: onnx.ModelProto, folder: Path) -> list[str]:
    """Refuse external-data locations that leave the model's folder (../, absolute, symlinks);
    the external-data files, relative to the folder (none: all data inside the model file)."""
    root = folder.resolve()
    external = _external_tensors(proto)
    for name, loc in external:
        target = (folder / loc).resolve()
        if Path(loc).is_absolute() or not target.is_relative_to(root):
            raise TailorError(f"refusing external data '{loc}' of tensor '{name}': it points "
                              f"outside the model's folder {folder}")
        if not target.is_file():
            raise TailorError(f"external data '{loc}' of tensor '{name}' is missing")
    return sorted({loc for _, loc in external})


def load_onnx(path: Path) -> ir.Model:
    """A checked ONNX model that onnxruntime runs, or a TailorError saying what is wrong."""
    model, run_problem, _ = _load_checked(path)
    if run_problem:
        raise TailorError(run_problem)
    return model


def _load_checked(path: Path) -> tuple[ir.Model, str | None, list[str]]:
    """The model, checked (TailorError if invalid); why onnxruntime cannot run it (or None); its
    external-data files."""
    if path.stat().st_size == 0:
        raise TailorError(f"{path}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise TailorError(f"{path}: not a valid ONNX model ({type(e).__name__})") from None
    if not proto.graph.node:
        raise TailorError(f"{path}: the ONNX graph has no nodes (corrupt or not a model)")
    bad = _not_text(proto)
    if bad is not None:
        raise TailorError(f"{path}: {bad} is not UTF-8 text (a corrupt ONNX file)")
    data_files = check_external_data(proto, path.parent)
    # types, shapes (strict inference unless data is external: inference cannot read it),
    # well-formed tensors, and a run in onnxruntime; in a child, where a crash cannot take us down
    run_problem = check_onnx_file(path, full_check=not data_files)
    if not proto.graph.value_info:
        # exporters like the TorchScript one write no intermediate shapes; recognition needs
        # head_dim, which shape inference with data propagation recovers from Reshape targets
        try:
            proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        except Exception:  # inference is best effort; recognition says what it still misses
            pass
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise TailorError(f"{path}: could not read the ONNX model ({type(e).__name__}: "
                          f"{first_line(e)})") from None
    return model, run_problem, data_files


def _not_text(message) -> str | None:
    """The first string field of a protobuf message (recursively) that is not UTF-8 text:
    protobuf hands such a field back as bytes, which the onnx checker and onnxruntime let pass
    and writing the model back fails on. Where it is, or None."""
    for fd, value in message.ListFields():
        # is_repeated: protobuf ≥ 5 (label is gone from its upb descriptors)
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else \
            fd.label == fd.LABEL_REPEATED
        items = value if repeated else [value]
        if fd.type == fd.TYPE_MESSAGE:
            found = next((f for f in map(_not_text, items) if f is not None), None)
            if found is not None:
                return found
        elif fd.type == fd.TYPE_STRING:
            bad = next((v for v in items if isinstance(v, bytes)), None)
            if bad is not None:
                return f"{message.DESCRIPTOR.name}.{fd.name} {bad[:40]!r}"
    return None


def capture_onnx(path: Path) -> Captured:
    model, run_problem, data_files = _load_checked(path)
    check_not_merged(model, path)
    unfused = unfuse(model)  # onnxruntime's fused ops, read as the standard ops they stand for
    unfused |= read_quantized(model)  # quantize_dynamic's linears, read as one op each
    unsupported = unsupported_ops(model)
    if unsupported:
        if (path.parent / "genai_config.json").exists():  # onnxruntime-genai's model builder wrote it
            what = ("the Hugging Face model its builder read (onnxruntime-genai's genai_config.json is "
                    "beside it), or that model's Optimum ONNX export, whose artifact onnxruntime-genai runs")
        elif "quantized" in unsupported:
            what = ("the float model, before quantization, or one quantized by onnxruntime's "
                    "quantize_dynamic, quantize_static (QDQ) or MatMulNBitsQuantizer (4 bits), "
                    "which tailor rewrites as they are")
        else:
            what = "the model as exported, before onnxruntime's fusions"
        raise TailorError(f"{path}: tailor cannot rewrite through {unsupported} yet; give it {what}")
    if run_problem:
        recognize(OnnxDataflow(model))  # a graph that is no transformer: said first
        raise TailorError(run_problem)
    cleaned = clean(model)  # before recognition, which names the nodes the rewrites change
    graph = recognize(OnnxDataflow(model))
    if has_cache(model):
        check_caches(model, [set(region(model, [b.attn.q, b.attn.k, b.attn.v], b.attn.o))
                             for b in graph.blocks])
    names = [v.name for v in model.graph.inputs]
    digest = sha256_files([path] + [path.parent / loc for loc in data_files])
    source = OnnxSource(model, path, names, data_files, unfused | cleaned, input_shape(model, graph))
    return Captured(graph, source, "sha256:" + digest)


def input_shape(model: ir.Model, graph: TransformerGraph) -> InputShape:
    """The dims the graph's inputs fix, read from their declared shapes (numbers are fixed)."""
    specs = [(v.name, None if v.shape is None else [d if isinstance(d, int) else None for d in v.shape], None)
             for v in model.graph.inputs]
    return InputShape.of(specs, causal=is_causal(graph))


def is_causal(graph: TransformerGraph) -> bool:
    """Whether no position attends to a later one, in every block."""
    return all(b.attn.causal for b in graph.blocks)

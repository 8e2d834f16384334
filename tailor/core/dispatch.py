"""Models that accelerate spreads over several devices (`from_pretrained(device_map="auto",
max_memory=...)`, `dispatch_model`): too big for one GPU, split over GPUs and offloaded to host
memory or disk.

accelerate gives each module an AlignDevicesHook that moves the module's inputs to the device it
runs on (its execution device). An offloaded module holds its weights on the meta device between
forwards; its hook keeps the real tensors in a `weights_map` (host memory or disk) and copies them
in for each forward. tailor keeps that arrangement: it reads weights through the hooks, places the
weights a rewrite makes where the ones they replace ran (offloaded again where those were) and
measures the model as dispatched; nothing here shards a model by itself.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tailor.core.errors import TailorError


def _align_hooks(module: nn.Module) -> Iterator[Any]:
    """The AlignDevicesHooks on the module itself (a SequentialHook holds several)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return
    from accelerate.hooks import AlignDevicesHook

    for h in getattr(hook, "hooks", [hook]):
        if isinstance(h, AlignDevicesHook):
            yield h


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed the model's modules through hooks (a model loaded whole onto one
    device has none)."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def offload_hook(module: nn.Module):
    """The hook holding this module's own offloaded weights (None: they are where they run)."""
    return next((h for h in _align_hooks(module) if h.offload), None)


def execution_device(module: nn.Module) -> torch.device:
    """Where the module's forward runs: the execution device of its hook (or, lacking one, of the
    first hooked module inside it), else where its first weight is (the CPU for a module without
    weights)."""
    device = next((h.execution_device for m in module.modules() for h in _align_hooks(m)
                   if h.execution_device is not None), None)
    if device is not None:
        return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    p = next((p for p in module.parameters() if not p.is_meta), None)
    return p.device if p is not None else torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a dispatched model's inputs go: where its input embedding runs."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(embeddings if embeddings is not None else model)


def tensor(module: nn.Module, name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The module's own parameter or buffer `name`, detached, on `device` (default: where the module
    runs); an offloaded one is read from its hook's weights_map, never from the meta placeholder."""
    hook = offload_hook(module)
    value = getattr(module, name)
    if hook is not None and value.is_meta:
        value = hook.weights_map[name]
    return value.detach().to(device if device is not None else execution_device(module))


def check_supported(model: nn.Module) -> None:
    """Refuse offloading that keeps a whole block's weights in one hook (accelerate's
    preload_module_classes): a rewritten submodule's weights would be overwritten with the old ones
    at the next forward. transformers' device_map="auto" offloads module by module, which is fine."""
    for name, module in model.named_modules():
        if any(h.offload and h.place_submodules for h in _align_hooks(module)):
            raise TailorError(f"{name or type(model).__name__}: its weights are offloaded as one block "
                              f"(accelerate's preload_module_classes), which tailor cannot rewrite; "
                              f"dispatch the model without preload_module_classes")


def stored_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each offloaded tensor read from its hook (host memory, or disk:
    read when used), not the meta placeholder."""
    from accelerate.utils import named_module_tensors

    state = model.state_dict()
    for prefix, module in model.named_modules():
        hook = offload_hook(module)
        if hook is None:
            continue
        for name, value in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                                recurse=hook.place_submodules, remove_non_persistent=True):
            key = f"{prefix}.{name}" if prefix else name
            if value.is_meta and key in state:
                state[key] = hook.weights_map[name]
    return state


def shared_hook_state(model: nn.Module) -> dict[int, Any]:
    """A deepcopy memo that keeps the hooks' weight stores shared: a copy of a dispatched model
    would otherwise copy every offloaded weight (each hook's weights_map reaches all of them)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for h in _align_hooks(module):
            for store in (h.weights_map, h.tied_params_map):
                if store is not None:
                    memo[id(store)] = store
    return memo


def place_like(new: nn.Module, old: nn.Module) -> nn.Module:
    """`new`, which replaces `old`, set to run where `old` ran: its tensors on `old`'s execution
    device, and where `old`'s weights were offloaded, `new`'s offloaded too, by an AlignDevicesHook
    of its own as accelerate gives each offloaded module. A rewrite's weights are offloaded to host
    memory even where the ones they replace were on disk (tailor writes no offload files)."""
    device = execution_device(old)
    hook = offload_hook(old)
    if hook is None:
        return new.to(device)
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    # the hook takes the tensors into its weights_map (host memory) and leaves meta placeholders
    add_hook_to_module(new.to("cpu"), AlignDevicesHook(execution_device=hook.execution_device, offload=True,
                                                       offload_buffers=hook.offload_buffers))
    return new


def device_map_summary(model: nn.Module) -> dict[str, str]:
    """Where accelerate put the model's modules, as {where: modules}, layers as ranges: "cuda:0":
    "model.embed_tokens, model.layers.0-15". Offloaded weights say where they run: "cpu, runs on
    cuda:0"."""
    placed = getattr(model, "hf_device_map", None) or {"": execution_device(model)}
    groups: dict[str, list[str]] = {}
    for name, where in placed.items():
        runs = execution_device(model.get_submodule(name))
        stored = f"cuda:{where}" if isinstance(where, int) else str(where)
        label = stored if stored == str(runs) else f"{stored}, runs on {runs}"
        groups.setdefault(label, []).append(name or "all")
    return {label: _ranges(names) for label, names in groups.items()}


def _ranges(names: list[str]) -> str:
    """'model.layers.0, model.layers.1, model.layers.2' -> 'model.layers.0-2'."""
    out: list[str] = []
    runs: dict[str, list[int]] = {}
    for name in names:
        m = re.fullmatch(r"(.*\.)(\d+)", name)
        if m is None:
            out.append(name)
            continue
        if m.group(1) not in runs:
            runs[m.group(1)] = []
            out.append(m.group(1))  # the range is written where its first entry stood
        runs[m.group(1)].append(int(m.group(2)))
    for prefix, idx in runs.items():
        idx.sort()
        spans, start = [], idx[0]
        for a, b in zip(idx, idx[1:] + [None]):
            if b != a + 1:
                spans.append(f"{prefix}{start}" if start == a else f"{prefix}{start}-{a}")
                start = b
        out[out.index(prefix)] = ", ".join(spans)
    return ", ".join(out)


def dispatch(model: nn.Module, max_memory: dict[int | str, int] | None) -> nn.Module:
    """Spread a model built whole in host memory over the devices `max_memory` names (None: every
    GPU's free memory, then host memory), through accelerate (infer_auto_device_map, then
    dispatch_model): blocks fill the GPUs in order and what is left is offloaded to host memory.
    Refused where it would need the disk."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_max_memory

    max_memory = get_max_memory(max_memory)
    no_split = getattr(model, "_no_split_modules", None) or []
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=list(no_split))
    if "disk" in device_map.values():
        on_disk = [n for n, d in device_map.items() if d == "disk"]
        raise TailorError(f"the model does not fit in the memory given ({format_memory(max_memory)}): "
                          f"{', '.join(on_disk[:3])}{' …' if len(on_disk) > 3 else ''} would go to disk")
    if len(set(device_map.values())) == 1:  # one device: no hooks, the model is simply moved
        where = next(iter(device_map.values()))
        model = model.to(f"cuda:{where}" if isinstance(where, int) else where)
        model.hf_device_map = device_map
        return model
    return dispatch_model(model, device_map)


def format_memory(max_memory: dict[int | str, int]) -> str:
    """{0: 2**31, "cpu": 2**30} -> 'cuda:0 2.0 GiB, cpu 1.0 GiB'."""
    return ", ".join(f"{'cuda:' if isinstance(k, int) else ''}{k} {v / 2**30:.1f} GiB"
                     for k, v in max_memory.items())


MAX_MEMORY_FORM = "DEVICE=SIZE pairs, DEVICE a GPU index or cpu (e.g. 0=70GiB,1=70GiB,cpu=100GiB)"


def resolve_max_memory(spec: str | dict | None) -> dict[int | str, int] | None:
    """`--max-memory 0=70GiB,1=70GiB,cpu=100GiB` (or that as a mapping, accelerate's form): the
    memory the weights may take on each device, {GPU index or "cpu": bytes}, checked against this
    machine's GPUs. None: not given."""
    if spec is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    if isinstance(spec, str):
        items = [item.partition("=") for item in spec.split(",") if item.strip()]
        if any(not sep for _, sep, _ in items):
            raise TailorError(f"--max-memory takes {MAX_MEMORY_FORM}, got {spec!r}")
        pairs = [(key.strip(), size.strip()) for key, _, size in items]
    elif isinstance(spec, dict):
        pairs = list(spec.items())
    else:
        raise TailorError(f"--max-memory takes {MAX_MEMORY_FORM}, got {spec!r}")
    if not pairs:
        raise TailorError(f"--max-memory takes {MAX_MEMORY_FORM}, got {spec!r}")
    out: dict[int | str, int] = {}
    for key, size in pairs:
        text = str(key).strip()
        if text == "cpu":
            device: int | str = "cpu"
        elif text.isdigit():
            device = int(text)
            if device >= torch.cuda.device_count():
                have = torch.cuda.device_count()
                raise TailorError(f"--max-memory names GPU {device}; this machine has "
                                  f"{have or 'no'} CUDA GPU{'' if have == 1 else 's'} that torch can use")
        else:
            raise TailorError(f"--max-memory: {text!r} is no device; it takes {MAX_MEMORY_FORM}")
        try:
            if isinstance(size, bool):
                raise ValueError(size)
            amount = convert_file_size_to_int(int(size) if isinstance(size, str) and size.isdigit() else size)
        except (ValueError, OverflowError, AttributeError, TypeError):
            amount = -1
        if amount <= 0:
            raise TailorError(f"--max-memory: {size!r} for {text} is no size; write it as 70GiB, "
                              f"500MiB or a number of bytes")
        out[device] = amount
    return out

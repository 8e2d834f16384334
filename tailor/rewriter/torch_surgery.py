"""Structural edits of a torch model, addressed through the TransformerGraph.

Modules are found from the weight names recognition recorded (state-dict keys), never from
architecture-specific attribute names: a projection's module owns its weight; a block's module
is the deepest module owning all of the block's weights; likewise the attention and the FFN.

Edits never write into an existing Parameter: they put new modules in place. A clone being
rewritten may share its unchanged Parameters with the dense model, which an in-place write would
change too. New tensors take the dtype of the weights they replace, and the new module runs where
the old one ran: in a model accelerate dispatched over devices, on the old module's device, its
weights offloaded again where the old ones were (tailor.core.dispatch.place_like). Weights are
read through tailor.core.dispatch.tensor, which finds an offloaded weight where accelerate keeps it.
"""
from __future__ import annotations

import copy
import os
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from tailor.core.dispatch import execution_device, place_like, tensor
from tailor.core.errors import TailorError
from tailor.rewriter.graph import Block, Projection
from tailor.rewriter.least_squares import compensate
from tailor.rewriter.modules.constant_branch import ConstantBranch
from tailor.rewriter.modules.int8_linear import Int8Linear


def module_path(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0]


def common_module(weight_names: list[str]) -> str:
    """The deepest module path owning all these weights."""
    paths = [module_path(n).split(".") for n in weight_names]
    prefix = os.path.commonprefix(paths)
    return ".".join(prefix)


def block_path(model: nn.Module, block: Block) -> str:
    names = [p.weight.name for p in block.attn.projections + block.ffn.projections]
    names += [n.weight.name for n in block.norms if n.weight is not None]
    return common_module(names)


def attention_path(model: nn.Module, block: Block) -> str:
    return common_module([p.weight.name for p in block.attn.projections])


def ffn_path(model: nn.Module, block: Block) -> str:
    return common_module([p.weight.name for p in block.ffn.projections])


def clone_modules(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """What `copy.deepcopy(module, memo)` returns, ten times faster: every module a new object with
    its own tables (parameters, buffers, submodules, hooks), and whatever else it holds (a config,
    a hook, a buffer not in `memo`) deep-copied through the same memo. deepcopy rebuilt each
    module's ~15 tables through __reduce_ex__: SmolLM2's 400 modules were 5K objects and 75 ms a
    copy on a GPU machine's host, and a compile copies the model once for each of its ~560 options."""
    if id(module) in memo:
        return memo[id(module)]
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new   # before its attributes: a hook's partial or a bound forward refers back
    new.__dict__.update((name, _cloned(v, memo)) for name, v in module.__dict__.items())
    return new


_IMMUTABLE = frozenset((int, float, bool, str, type(None)))


def _cloned(v, memo: dict[int, Any]):
    """One attribute of a module, for `clone_modules`. A function of its own, not a closure: a
    nested function calling itself is a reference cycle holding the memo, and with it every module
    of the copy, until the garbage collector's next full pass (an 8B compile's dropped variants
    held 30 GB of a GPU so)."""
    kind = type(v)
    if kind in _IMMUTABLE:
        return v
    if kind in (dict, OrderedDict):   # a table: a new one, its entries copied one by one
        return kind((k, _cloned(x, memo)) for k, x in v.items())
    if kind is set:                   # of names (non-persistent buffers, modules kept in fp32)
        return {_cloned(x, memo) for x in v}
    return clone_modules(v, memo) if isinstance(v, nn.Module) else copy.deepcopy(v, memo)


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def replace_with_constant(model: nn.Module, path: str, hidden: int, returns_tuple: bool,
                          mean=None) -> None:
    old = model.get_submodule(path)
    dtype = next(old.parameters(), next(model.parameters())).dtype
    branch = ConstantBranch(hidden, returns_tuple, dtype)
    if mean is not None:
        branch.mean_output.copy_(torch.as_tensor(mean, dtype=dtype))
    # a few numbers: kept where the branch ran, never offloaded
    set_module(model, path, branch.to(execution_device(old)))


# ---- linear layers -----------------------------------------------------------------------------

def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None,
                cls: type[nn.Linear] = nn.Linear) -> nn.Linear:
    """An nn.Linear (or `cls`) holding new Parameters `weight` [out, in] and `bias`: built on the
    meta device, so that no initialisation is computed only to be overwritten."""
    lin = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight)
    if bias is not None:
        lin.bias = nn.Parameter(bias)
    return lin


def _linear(model: nn.Module, p: Projection) -> nn.Linear:
    mod = model.get_submodule(module_path(p.weight.name))
    if not isinstance(mod, nn.Linear):
        raise TailorError(f"{module_path(p.weight.name)} is a {type(mod).__name__}; structural "
                          f"pruning supports nn.Linear projections")
    return mod


def _weights(lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Linear's weight and bias, where it runs."""
    return tensor(lin, "weight"), None if lin.bias is None else tensor(lin, "bias")


def _put_linear(model: nn.Module, path: str, old: nn.Module, weight: torch.Tensor,
                bias: torch.Tensor | None, cls: type[nn.Linear] | None = None) -> nn.Linear:
    # an INT8 projection stays INT8 when a refit gives it new weights
    cls = cls or (Int8Linear if isinstance(old, Int8Linear) else nn.Linear)
    new = place_like(_new_linear(weight, bias, cls), old)
    set_module(model, path, new)
    return new


def slice_linear(model: nn.Module, p: Projection, *, rows: torch.Tensor | None = None,
                 cols: torch.Tensor | None = None) -> nn.Linear:
    """Keep output rows `rows` and input columns `cols` of a projection, in place of the module."""
    old = _linear(model, p)
    w, b = _weights(old)
    if rows is not None:
        rows = torch.as_tensor(rows, device=w.device)
        w, b = w[rows], (b[rows] if b is not None else None)
    if cols is not None:
        w = w[:, torch.as_tensor(cols, device=w.device)]
    # what was not sliced (the bias, for columns) is shared with the old module, as a clone
    # shares unchanged weights
    return _put_linear(model, module_path(p.weight.name), old, w, b)


def add_bias(model: nn.Module, p: Projection, delta: torch.Tensor) -> None:
    """bias += delta (a new module), creating the bias if the projection had none."""
    lin = _linear(model, p)
    w, b = _weights(lin)
    bias = w.new_zeros(lin.out_features) if b is None else b
    delta = torch.as_tensor(delta).to(bias.device, bias.dtype)
    _put_linear(model, module_path(p.weight.name), lin, w, bias + delta)


def to_int8(model: nn.Module, p: Projection) -> None:
    """The projection runs on INT8 weights (Int8Linear), holding the same float weights: a new
    module, since a clone's modules may be its original's."""
    old = _linear(model, p)
    if not isinstance(old, Int8Linear):
        _put_linear(model, module_path(p.weight.name), old, *_weights(old), cls=Int8Linear)


def replace_weights(model: nn.Module, path: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The nn.Linear at `path` with new weights (its bias kept where `bias` is None), as a new
    module in the old one's dtype."""
    old = model.get_submodule(path)
    w, b = _weights(old)
    new_bias = b if bias is None else torch.as_tensor(bias).to(w.device, w.dtype)
    _put_linear(model, path, old, torch.as_tensor(weight).to(w.device, w.dtype), new_bias)


# ---- layers --------------------------------------------------------------------------------------

def remove_layers(model: nn.Module, paths: list[str]) -> None:
    """Delete blocks from their ModuleList; renumber the KV-cache index of the ones after."""
    by_list: dict[str, list[int]] = {}
    for path in paths:
        parent, _, idx = path.rpartition(".")
        if not idx.isdigit() or not isinstance(model.get_submodule(parent), nn.ModuleList):
            raise TailorError(f"cannot remove {path}: it is not an entry of a ModuleList")
        by_list.setdefault(parent, []).append(int(idx))
    for parent, idxs in by_list.items():
        layers = model.get_submodule(parent)
        keep_idx = [i for i in range(len(layers)) if i not in set(idxs)]
        kept = [layers[i] for i in keep_idx]
        set_module(model, parent, nn.ModuleList(kept))
        for new_i, m in enumerate(kept):
            for sub in m.modules():
                if isinstance(getattr(sub, "layer_idx", None), int):
                    sub.layer_idx = new_i
        cfg = getattr(model, "config", None)
        if cfg is not None:
            for attr in ("num_hidden_layers", "n_layer", "num_layers"):
                if isinstance(getattr(cfg, attr, None), int) and getattr(cfg, attr) == len(layers):
                    setattr(cfg, attr, len(kept))
            lt = getattr(cfg, "layer_types", None)
            if isinstance(lt, list) and len(lt) == len(layers):
                cfg.layer_types = [lt[i] for i in keep_idx]


def reconstruct_inputs(model: nn.Module, p: Projection, kept: torch.Tensor, gram) -> None:
    """Keep input channels `kept` of an nn.Linear, compensated (least_squares.compensate, on the
    weight's device), in place of the module."""
    lin = _linear(model, p)
    weight, bias = _weights(lin)
    w, b = compensate(weight, bias, gram, kept)
    _put_linear(model, module_path(p.weight.name), lin, w.to(weight.dtype), b.to(weight.dtype))

"""Writing models out: ONNX through onnx_ir (external data for big models), torch models to
ONNX through torch.onnx.export(dynamo=True)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx_ir as ir
import torch

from tailor.backends.runners import HFModel
from tailor.rewriter.capture import example_input_ids

# protobuf cannot hold a model over 2 GB; past this size weights go to a side file
EXTERNAL_DATA_BYTES = 1 << 30


def save_onnx(model: ir.Model, path: Path) -> None:
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)
    if size > EXTERNAL_DATA_BYTES:
        ir.save(model, path, external_data=path.name + ".data")
    else:
        # the source may have had external data; write everything inline into the new file
        ir.save(model, path)


def export_onnx(module: torch.nn.Module, path: Path, *, encoder: bool, seq_len: int = 16, batch: int = 2,
                static_axes: tuple[int, ...] = ()) -> None:
    """Export a transformers model with dynamic batch and sequence axes, except `static_axes`
    (0: batch, 1: sequence), fixed at the example's `batch` and `seq_len`, as an export without
    dynamic axes writes them."""
    wrapped = HFModel(module)
    ids = example_input_ids(int(module.config.vocab_size), seq_len, batch=batch)
    dyn = {axis: torch.export.Dim.DYNAMIC for axis in (0, 1) if axis not in static_axes}
    if encoder:
        args, names = (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"]
        shapes = {"input_ids": dyn, "attention_mask": dyn}
    else:
        args, names, shapes = (ids,), ["input_ids"], {"input_ids": dyn}
    out = "last_hidden_state" if encoder else "logits"
    old_cache = getattr(module.config, "use_cache", None)
    module.config.use_cache = False
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapped, args, dynamo=True, input_names=names,
                                        output_names=[out], dynamic_shapes=shapes, verbose=False)
        save_onnx(program.model, Path(path))
    finally:
        if old_cache is not None:
            module.config.use_cache = old_cache

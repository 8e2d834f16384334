"""Where a compile runs and in which precision: the device and dtype follow the model.

`--device auto` is the first CUDA GPU when there is one, else the CPU; `--dtype auto` is the
checkpoint's own dtype (config.json's `dtype` / `torch_dtype`), so a bf16 checkpoint is never
upcast to fp32 (twice the memory) unless asked. Every stage runs where the model sits; inputs
are moved to the model's device by the runners, and statistics come back to the host.
"""
from __future__ import annotations

import contextlib
import os
import resource
import threading

import torch

from tailor.core.dispatch import input_device, is_dispatched
from tailor.core.errors import TailorError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config.json spellings of a checkpoint's dtype
_CONFIG_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                  "half": torch.float16}


def resolve_device(request: str | torch.device | None = "auto") -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` → a device this machine has (TailorError otherwise)."""
    text = str(request or "auto")
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise TailorError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise TailorError(f"device {text!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise TailorError(f"--device {text}: this machine has no CUDA GPU that torch "
                          f"{torch.__version__} can use")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise TailorError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device("cuda", index)


def checkpoint_dtype(config: dict) -> torch.dtype | None:
    """The dtype a config.json says its weights are stored in, if it says."""
    value = config.get("dtype", config.get("torch_dtype"))
    return _CONFIG_DTYPES.get(str(value).removeprefix("torch.")) if value else None


def resolve_dtype(request: str | torch.dtype | None, device: torch.device,
                  stored: torch.dtype | None = None) -> torch.dtype:
    """`auto` (the stored dtype, float32 when unknown) or a name in DTYPES, checked to run on
    `device`."""
    if isinstance(request, torch.dtype):
        dtype = request
    elif request in (None, "auto"):
        dtype = stored or torch.float32
    elif request in DTYPES:
        dtype = DTYPES[request]
    else:
        raise TailorError(f"unknown dtype {request!r}; use auto, {', '.join(DTYPES)}")
    check_runs(device, dtype)
    return dtype


def check_runs(device: torch.device, dtype: torch.dtype) -> None:
    """A matmul and a softmax in `dtype` on `device`, or a TailorError naming the pair."""
    name = str(dtype).removeprefix("torch.")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise TailorError(f"{torch.cuda.get_device_name(device)} cannot run bfloat16; use --dtype float16 "
                          f"or float32")
    try:
        x = torch.ones(8, 8, device=device, dtype=dtype)
        torch.softmax(x @ x, -1).sum().item()
    except (RuntimeError, TypeError) as e:
        raise TailorError(f"{device} cannot run {name}: {str(e).splitlines()[0]}") from None


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's inputs go: where its first weight sits (the CPU for a module without
    weights); for a model that accelerate dispatched over several devices, where its input
    embedding runs."""
    if is_dispatched(module):
        return input_device(module)
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def attention_for_changing_shapes():
    """torch's scaled_dot_product_attention kept off its cuDNN backend, for work whose shapes
    change call after call: torch builds a cuDNN execution plan for each new shape, and sampling
    grows the keys by one every step (SmolLM2-135M sampling 16 × 511 tokens on an H200: 34 s with
    cuDNN chosen, 18 s with transformers' eager attention). The other backends stay as torch picks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def tolerance(dtype: torch.dtype) -> float:
    """Max abs difference allowed between two runs of one model in `dtype` (a reload, a different
    kernel order): a few units in the last place of the logits' magnitude."""
    return {torch.float32: 1e-5, torch.bfloat16: 6e-2, torch.float16: 1e-2}.get(dtype, 1e-5)


# ---- memory ------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the lifetime peak is all there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak host RSS (sampled every 20 ms on a thread) and peak allocated GPU memory (torch's
    counters, reset at entry) over a `with` block, in GiB: summed over the GPUs, and each GPU's
    (a model split over GPUs fits only where every one of them stays within its memory)."""

    INTERVAL = 0.02

    def __init__(self):
        self.host_gib = 0.0
        self.gpu_gib: float | None = None
        self.gpu_gib_each: list[float] = []

    @contextlib.contextmanager
    def __call__(self):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i in range(torch.cuda.device_count()):  # the peak reported is over every GPU
                torch.cuda.reset_peak_memory_stats(i)
        peak = [_rss_bytes()]
        done = threading.Event()

        def sample():
            while not done.wait(self.INTERVAL):
                peak[0] = max(peak[0], _rss_bytes())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            done.set()
            thread.join()
            peak[0] = max(peak[0], _rss_bytes())
            self.host_gib = round(peak[0] / 2 ** 30, 3)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self.gpu_gib_each = [round(torch.cuda.max_memory_allocated(i) / 2 ** 30, 3)
                                     for i in range(torch.cuda.device_count())]
                self.gpu_gib = round(sum(self.gpu_gib_each), 3)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings of CUDA work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

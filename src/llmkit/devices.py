"""Where a model runs: `--device auto|cpu|cuda|cuda:N|mps` of every command that runs one, and what follows from it.

    resolve("auto")     CUDA if present, then Apple's MPS, then the CPU; a device that is not there is refused in one
                        line that says what is there instead
    default_dtype(dev)  the weights' dtype a command uses when --dtype is auto: bf16 on GPUs that have it, fp16 on
                        those that do not (training scales its loss), float32 on a CPU (its answers stay the reference's)
    free_bytes(dev)     what a model may still take there: the GPU's free memory, or the machine's available RAM

PyTorch names the devices; this module only chooses among them and explains a refusal.
"""

from __future__ import annotations

import os

import torch

from llmkit.errors import LlmkitError

CHOICES = "auto, cpu, cuda, cuda:N or mps"


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available() -> list[str]:
    """The devices this machine has, as --device spells them."""
    out = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return out + (["mps"] if mps_available() else []) + ["cpu"]


def resolve(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch.device for a --device value (None and "auto": the best one present)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise LlmkitError(f"--device {spec!r} is not a device", f"use one of {CHOICES} (this machine: {', '.join(available())})") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of PyTorch" if torch.version.cuda is None else "no visible CUDA GPU"
            raise LlmkitError(
                f"--device {spec}: this machine has {build}", f"use --device cpu (or auto); this machine: {', '.join(available())}"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            raise LlmkitError(
                f"--device {spec}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}",
                "pick one of those (or set CUDA_VISIBLE_DEVICES)",
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not mps_available():
            raise LlmkitError("--device mps: no Apple GPU (MPS) here", f"use --device auto or cpu; this machine: {', '.join(available())}")
        return torch.device("mps")
    raise LlmkitError(f"--device {spec}: llmkit runs on {CHOICES}", f"this machine: {', '.join(available())}")


def default_dtype(device: torch.device) -> torch.dtype:
    """The weights' dtype when --dtype is auto: bf16 on a GPU with bf16, fp16 on an older one, float32 elsewhere."""
    if device.type == "cuda":  # bf16 in hardware from Ampere (compute capability 8) on; older cards emulate it slowly
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_for(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype auto|fp32|bf16|fp16 on `device`."""
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in DTYPES:
        raise LlmkitError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}", "use --dtype auto")
    return DTYPES[name]


def free_bytes(device: torch.device) -> int:
    """Memory a model may still take on `device`: a GPU's free memory, or the RAM the kernel says is available."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def describe(device: torch.device) -> str:
    """A device in words: 'cuda:0 (NVIDIA H100 80GB HBM3)', 'mps', 'cpu (2 cores)'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({os.cpu_count()} cores)"
    return str(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()

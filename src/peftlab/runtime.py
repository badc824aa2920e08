"""Facts about where a run happens: device, dtype handling, versions, hardware (memory.py: peaks;
compiling.py: torch.compile)."""

import os
import platform
import sys
from importlib import metadata

import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "auto": None}


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu, cuda or auto, got '{name}'")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def check_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """fp32 | bf16 | auto: bf16 where `device` (default: the auto device) computes it natively,
    else fp32."""
    if name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got '{name}'")
    if name == "auto":
        return torch.bfloat16 if native_bf16(device or pick_device("auto")) else torch.float32
    return DTYPES[name]


def native_bf16(device: torch.device) -> bool:
    """Does `device` multiply bf16 matrices natively? A CPU needs AVX-512 BF16 or AMX; without
    them (AVX2-only x86) torch emulates bf16 GEMMs, on the order of 100× slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return True  # not Linux: unknown, assume it does
    if not flags:
        return platform.machine() in ("arm64", "aarch64")  # Apple silicon / Arm: bf16 dot products
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_note(dtype: torch.dtype, device: torch.device) -> str | None:
    """One line for a user who asked for bf16 where it is emulated, else None."""
    if dtype == torch.bfloat16 and not native_bf16(device):
        return (f"note: this {device.type.upper()} has no native bf16 (AVX-512 BF16 / AMX), so bf16 runs far slower "
                "than fp32 here; --dtype auto picks the faster one")
    return None


def store_frozen(model: torch.nn.Module, dtype: torch.dtype, trained: torch.dtype = torch.float32) -> None:
    """Keep frozen floating-point weights in `dtype`; trainable ones in `trained` (fp32 master
    copies, or bf16 for compensated updates: optim.py).

    A loaded model's weights live in its memory-mapped safetensors file until they are
    replaced, and one tensor still in the file keeps the whole mapping, with every page read
    from it, resident. So on the CPU, when no frozen weight stays in the file (each gets a new
    dtype), trained weights that keep theirs are copied out too and the mapping goes: training
    only SmolLM2's MLPs in bf16 would otherwise keep the 220 MB of fp32 attention and embedding
    weights it no longer reads. (Where a frozen weight stays, copying would hold both; where
    nothing is frozen, trained pages are copied on their first update anyway.)"""
    params = [p for p in model.parameters() if p.is_floating_point()]
    frozen = [p for p in params if not p.requires_grad]
    # copy only where it frees something: some frozen weight leaves the file, and none stays
    copy_out = frozen and all(p.dtype != dtype for p in frozen)
    for p in params:
        target = trained if p.requires_grad else dtype
        if p.dtype != target:
            p.data = p.data.to(target)
        elif p.requires_grad and copy_out and p.device.type == "cpu":
            p.data = p.data.clone()


def for_inference(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Generation: every weight frozen, on `device`, stored in `dtype`."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)
    store_frozen(model, dtype)
    model.eval()


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 compute where asked; a no-op context in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("peftlab", "torch", "transformers", "safetensors", "peft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def hardware(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info



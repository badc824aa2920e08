"""Memory: the peak a run reached (GPU allocator, or this process's resident high-water mark),
how freed tensors go back to the system on the CPU, and activation recomputation, which trades
compute for it."""

import ctypes
import os
import resource
import sys

import torch


def peak_memory(device: torch.device) -> int:
    """Peak bytes: allocated on the GPU, or this process's own peak resident set on the CPU.

    On Linux that is VmHWM, the high-water mark of this address space: it starts over when a
    process execs, so a worker started by a large parent reports its own peak. (ru_maxrss
    does not: Linux carries the parent's peak over fork and exec, so every worker of a
    comparison would report at least the parent's size.)"""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _proc_kb("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak over from the current size (GPU allocator stats; on Linux, clear_refs
    5 resets VmHWM to the current resident set)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def available(device: torch.device) -> int | None:
    """Bytes a run could still take: free GPU memory, or on Linux the kernel's MemAvailable
    (free pages plus the page cache it can reclaim, which holds a memory-mapped weight file),
    less where this process's container (cgroup v2) allows less; None where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = _proc_kb("/proc/meminfo", "MemAvailable")
    found = [n for n in (free * 1024 if free is not None else None, _cgroup_room()) if n is not None]
    return min(found) if found else None


def _cgroup_room(root: str = "/sys/fs/cgroup") -> int | None:
    """memory.max − memory.current of this process's cgroup (v2), None without a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((line.strip().split(":", 2)[2] for line in f if line.startswith("0::")), None)
        if path is None:
            return None
        folder = os.path.join(root, path.lstrip("/"))
        with open(os.path.join(folder, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(folder, "memory.current")) as f:
            return max(0, int(limit) - int(f.read().strip()))
    except (OSError, ValueError, IndexError):
        return None


def _proc_kb(path: str, field: str) -> int | None:
    """The kB figure of `field` in a /proc file of "Field:  N kB" lines (None where unreadable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


MMAP_FROM = 1 << 20  # bytes: CPU tensors this large or larger get their own mapping once `unmap_freed` ran
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)


def unmap_freed() -> bool:
    """Give every CPU allocation of MMAP_FROM bytes or more its own memory mapping, returned to
    the system the moment the tensor is freed (glibc; False where the C library is another).

    glibc otherwise raises its mapping threshold to the largest block freed so far (up to
    32 MB) and serves smaller blocks from one heap, which returns memory only from its top. A
    training step's activations (1–6 MB each for SmolLM2 at 4 × 256) and short-lived
    temporaries interleave there, and freed ones stay resident as holes later sizes do not
    fit: with the int8 base, about as much as its smaller weights saved (measured in
    bench/README.md, with the speed each fresh, page-faulted block costs).
    Process-wide and kept for the process's life (glibc has no way back to its moving
    threshold), so only the int8 base, which exists to save memory, asks for it."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.gnu_get_libc_version and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_FROM))
    except (OSError, AttributeError, TypeError):  # no glibc (TypeError: Windows has no CDLL(None))
        return False


def enable_checkpointing(model) -> None:
    """Recompute each block's activations in backward (non-reentrant, so frozen inputs work)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Some models (GPT-2) also withhold the KV cache from every block at the model level
    # under checkpointing. Blocks already decide that themselves (prefix tuning's read-only
    # cache may stay), so only the blocks keep the flag.
    from transformers.modeling_layers import GradientCheckpointingLayer

    for m in model.modules():
        if not isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False):
            m.gradient_checkpointing = False

"""Facts about where a run happens: device, dtype handling, memory, versions, hardware."""

import os
import platform
import resource
import shutil
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
    copies, or bf16 for compensated updates: optim.py)."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(trained if p.requires_grad else dtype)


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


def peak_memory(device: torch.device) -> int:
    """Peak bytes: allocated on the GPU, or this process's own peak resident set on the CPU.

    On Linux that is VmHWM, the high-water mark of this address space: it starts over when a
    process execs, so a worker started by a large parent reports its own peak. (ru_maxrss
    does not: Linux carries the parent's peak over fork and exec, so every worker of a
    comparison would report at least the parent's size.)"""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _status_kb("VmHWM")
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


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


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


AUTO_COMPILE_FLOPS = 6e13  # ~1-2 min of compiling pays off for runs this long (≈ 70 steps of 4 × 256 on SmolLM2)


def has_compiler(device: torch.device) -> bool:
    """torch inductor builds C++ kernels on the CPU (and Triton ones on CUDA)."""
    if device.type == "cuda":
        return True
    return any(c and shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++"))


def compile_plan(requested: bool | None, device: torch.device, model, tokens: int) -> tuple[bool, str | None]:
    """Compile the blocks? `requested` True/False is the user's word (--compile / --no-compile);
    None decides: yes when a compiler is present and the run's training work (≈ 6 FLOPs per
    parameter per token over `tokens`) is large enough for the compile time to pay off.
    Returns the choice and the line that says so (None when there is nothing to say)."""
    if requested is not None:
        return requested, None
    work = 6 * sum(p.numel() for p in model.parameters()) * tokens
    if work < AUTO_COMPILE_FLOPS:
        return False, None
    if not has_compiler(device):
        return False, "note: a long run, but no C++ compiler to compile it with (install g++); running eager"
    return True, (f"compiling the decoder blocks: this run is long enough for it to pay (~{work / 1e12:,.0f} TFLOP); "
                  "the first step is slower; --no-compile to skip")


def compile_blocks(model):
    """torch.compile each decoder block in place (its hooks, so every method's modules, included).

    Blocks are where the elementwise work is (norms, rotary, gated MLP, residual adds); fused,
    it runs faster and keeps fewer intermediates for backward. Parameter names do not change.
    Attention switches to attention.py's fused-backward version where it applies. Returns a
    function that undoes both (generation after training should not recompile per cache length).
    """
    from . import attention
    from .components import arch_of

    device = next(model.parameters()).device
    if not has_compiler(device):
        raise UserError("--compile needs a C++ compiler on the CPU (torch inductor builds kernels); install g++ or drop --compile")
    blocks = list(model.get_submodule(arch_of(model).layers))
    # Graphs compiled earlier in this process (another model, other adapters) would be reused:
    # dynamo does not guard on the hooks of modules inside a block, which is where added
    # modules live. Start from an empty cache, so each run traces its own hooks.
    torch._dynamo.reset()
    for block in blocks:
        block.compile()
    previous = attention.use(model)

    def undo():
        attention.restore(model, previous)
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set

    return undo

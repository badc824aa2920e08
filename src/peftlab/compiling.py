"""torch.compile for training: whether a run is long enough to pay for compiling, and the
decoder blocks compiled in place (attention.py's fused-backward attention with them)."""

import os
import shutil

import torch

from . import compat
from .errors import UserError


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


def compile_blocks(model, rows: int = 0, dtype: torch.dtype = torch.float32):
    """torch.compile each decoder block in place (its hooks, so every method's modules, included).

    Blocks are where the elementwise work is (norms, rotary, gated MLP, residual adds); fused,
    it runs faster and keeps fewer intermediates for backward. Parameter names do not change.
    Attention switches to attention.py's fused-backward version where it applies, and linear
    layers whose products torch runs on one thread at the run's `rows` (batch × sequence per
    process) in `dtype` split them by rows (gemm.py). Returns a function that undoes all of it
    (generation after training should not recompile per cache length).
    """
    from . import attention, gemm
    from .components import arch_of

    device = next(model.parameters()).device
    if not has_compiler(device):
        raise UserError("--compile needs a C++ compiler on the CPU (torch inductor builds kernels); install g++ or drop --compile")
    blocks = list(model.get_submodule(arch_of(model).layers))
    # Graphs compiled earlier in this process (another model, other adapters) would be reused:
    # dynamo does not guard on the hooks of modules inside a block, which is where added
    # modules live. Start from an empty cache, so each run traces its own hooks.
    torch.compiler.reset()
    unsplit = gemm.use(blocks, rows, dtype)
    try:
        for block in blocks:
            block.compile()
        previous = attention.use(model)
    except BaseException:
        unsplit()
        raise

    def undo():
        attention.restore(model, previous)
        unsplit()
        for block in blocks:
            compat.uncompile(block)

    return undo

"""Everything peftlab reaches for inside torch, transformers and typer that is not their
public API, in one place. Each entry says why no public hook serves and the versions it was
checked against (CHECKED); tests/test_compat.py exercises every one, so a release that moves
one fails there, by name, rather than somewhere inside training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the command line's error boundary imports this file
    import torch
    import torch.nn as nn

CHECKED = {"torch": "2.13.0", "transformers": "5.24.0", "typer": "0.29.2"}


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(m, k) int8 @ (k, n) int8 -> (m, n) int32. torch's only int8 GEMM with int32
    accumulation (VNNI / AMX on the CPU, tensor cores on CUDA); no public op does this."""
    import torch

    return torch._int_mm(a, b)


def uncompile(module: nn.Module) -> None:
    """Undo `nn.Module.compile()`: it stores the compiled call in `_compiled_call_impl`, and
    there is no public way back to the eager call (generation after training must not
    recompile for every cache length)."""
    module._compiled_call_impl = None


def drop_forward_hooks(module: nn.Module) -> None:
    """Remove every forward (pre-)hook of a module that has no handles for them: a deep copy
    of a hooked module carries copies of the hooks, whose handles point at the original."""
    module._forward_hooks.clear()
    module._forward_pre_hooks.clear()


def attention_implementation(model) -> str | None:
    """The attention a transformers model runs ("sdpa", "eager", ...). transformers keeps it
    in `config._attn_implementation`; `set_attn_implementation` is public, the getter is not."""
    return getattr(model.config, "_attn_implementation", None)


def keep_cache_under_checkpointing(block: nn.Module) -> None:
    """A GradientCheckpointingLayer drops the KV cache under activation checkpointing unless
    it declares (class attribute `_can_checkpoint_with_cache`) that it only reads the cache,
    as prefix tuning's blocks do."""
    block._can_checkpoint_with_cache = True


def click_exceptions():
    """The exception classes of the click that typer runs: typer ships its own copy
    (`typer._click`), and the plain click package where it does not."""
    try:
        from typer._click import exceptions
    except ImportError:  # pragma: no cover
        from click import exceptions
    return exceptions

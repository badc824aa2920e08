"""Every foreign internal peftlab uses (compat.py) still does what peftlab relies on. A new torch,
transformers or typer that moves one fails here, naming it, instead of deep inside a run."""

import copy
from importlib import metadata

import pytest
import torch
import torch.nn as nn

from peftlab import compat


def test_versions_checked_are_named():
    """Another installed version is not a failure (the tests below are the check); it is said."""
    import warnings

    for package in ("torch", "transformers", "typer"):
        assert package in compat.CHECKED
        installed = metadata.version(package).split("+")[0]
        if installed != compat.CHECKED[package]:
            warnings.warn(f"{package} {installed} is not the {compat.CHECKED[package]} compat.py names: if this file's "
                          f"tests pass, update CHECKED")


def test_int_mm_multiplies_int8_exactly():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (32, 64), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (64, 16), dtype=torch.int8, generator=g)
    out = compat.int_mm(a, b)
    assert out.dtype == torch.int32
    assert torch.equal(out, a.int() @ b.int())


def test_uncompile_returns_a_module_to_its_eager_call():
    layer = nn.Linear(4, 4)
    layer.compile()
    assert layer._compiled_call_impl is not None  # where nn.Module.compile keeps the compiled call
    compat.uncompile(layer)
    assert layer._compiled_call_impl is None
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_drop_forward_hooks_silences_a_copied_modules_hooks():
    calls = []
    layer = nn.Linear(2, 2)
    layer.register_forward_hook(lambda *a: calls.append("post"))
    layer.register_forward_pre_hook(lambda *a: calls.append("pre"))
    clone = copy.deepcopy(layer)
    compat.drop_forward_hooks(clone)
    clone(torch.randn(1, 2))
    assert calls == []
    layer(torch.randn(1, 2))
    assert calls == ["pre", "post"]  # the original keeps its own


def test_attention_implementation_reads_what_transformers_runs():
    from peftlab import load_model

    model = load_model("tiny-llama").model
    assert compat.attention_implementation(model) == "sdpa"
    model.set_attn_implementation("eager")
    assert compat.attention_implementation(model) == "eager"


def test_checkpointing_keeps_the_cache_of_a_block_that_opts_in():
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert GradientCheckpointingLayer._can_checkpoint_with_cache is False  # the flag transformers reads
    block = GradientCheckpointingLayer()
    compat.keep_cache_under_checkpointing(block)
    assert block._can_checkpoint_with_cache is True


def test_click_exceptions_are_the_ones_typer_raises():
    exceptions = compat.click_exceptions()
    assert issubclass(exceptions.NoArgsIsHelpError, exceptions.UsageError)
    import typer

    app = typer.Typer()

    @app.command()
    def one(n: int):
        pass

    with pytest.raises(exceptions.UsageError):
        app(["--n", "x"], standalone_mode=False)

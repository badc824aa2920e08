"""--compile: the same training, step for step, as eager; blocks are eager again afterwards."""

import pytest
import torch

from peftlab import compiling, data, models
from peftlab.errors import UserError
from peftlab.methods import prepare, trainable_parameters
from peftlab import TrainConfig, train


def _run(spec, text_file, compile, dtype="fp32"):
    loaded = models.load("tiny-llama", seed=0)
    blocks = data.load_blocks(loaded, str(text_file), 32)
    prepared = prepare(loaded.model, spec, loaded.tokenizer)
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=32, lr=1e-2, warmup=0, eval_every=3, device="cpu", compile=compile,
                      dtype=dtype)
    records = train(loaded.model, blocks, prepared, cfg, show=False)
    return loaded.model, records


@pytest.mark.parametrize("spec", ["lora:r=4,targets=all-linear", "dora:r=4", "adapter:r=4/bitfit:norms=true"])
def test_compiled_training_matches_eager(spec, text_file):
    eager, eager_records = _run(spec, text_file, False)
    fused, fused_records = _run(spec, text_file, True)
    for a, b in zip(eager_records, fused_records):
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a["step"])
    theirs = trainable_parameters(fused)
    for name, p in trainable_parameters(eager).items():
        torch.testing.assert_close(theirs[name], p, atol=1e-4, rtol=1e-3, msg=name)
    assert all(block._compiled_call_impl is None for block in fused.model.layers)  # eager again


def test_compile_without_a_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        compiling.compile_blocks(models.load("tiny-llama").model)


def test_compiled_bf16_training_matches_eager(text_file):
    """bf16 also swaps in the fused-backward attention; bf16 rounding differs, so the bar is looser."""
    _, eager = _run("lora:r=4,targets=all-linear", text_file, False, "bf16")
    fused_model, fused = _run("lora:r=4,targets=all-linear", text_file, True, "bf16")
    for a, b in zip(eager, fused):
        for key in ("loss", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-2), (key, a["step"])
    assert fused_model.config._attn_implementation == "sdpa"  # restored after training


def test_cli_train_with_compile(cli, text_file, tmp_path):
    import json

    code, _, err = cli("train", "-m", "tiny-llama", "-d", str(text_file), "-s", "lora:r=4", "--steps", "2",
                       "--seq-len", "32", "--batch-size", "2", "--compile", "--quiet", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["compile"] is True
    assert (tmp_path / "run" / "adapter").is_dir()


def test_a_second_compiled_run_in_one_process_sees_its_own_hooks(text_file):
    """dynamo does not guard on hooks inside a block: a graph traced for a model without added
    modules must not be reused for one with them (compile_blocks starts from an empty cache)."""
    _run("tokens:ids=5+17", text_file, True)  # blocks traced with no hooks inside them
    _, eager = _run("lora:r=4,targets=all-linear", text_file, False)
    _, fused = _run("lora:r=4,targets=all-linear", text_file, True)
    for a, b in zip(eager, fused):
        if "loss" in a:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5), a["step"]


def test_compile_is_automatic_for_runs_long_enough_to_pay(monkeypatch):
    """Without --compile/--no-compile, the blocks are compiled when the run's work is large
    (and a compiler exists); the user's word always wins."""
    model = models.load("tiny-llama").model
    cpu = torch.device("cpu")
    n = sum(p.numel() for p in model.parameters())
    short, long = 1000, int(compiling.AUTO_COMPILE_FLOPS / (6 * n)) + 1
    assert compiling.compile_plan(None, cpu, model, short) == (False, None)
    on, why = compiling.compile_plan(None, cpu, model, long)
    assert on and "--no-compile" in why
    assert compiling.compile_plan(False, cpu, model, long) == (False, None)
    assert compiling.compile_plan(True, cpu, model, short) == (True, None)
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    on, why = compiling.compile_plan(None, cpu, model, long)
    assert not on and "no C++ compiler" in why


def test_cli_no_compile(cli, text_file, tmp_path):
    import json

    code, _, err = cli("train", "-m", "tiny-llama", "-d", str(text_file), "-s", "lora:r=4", "--steps", "2",
                       "--seq-len", "32", "--batch-size", "2", "--no-compile", "--quiet", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["compile"] is False

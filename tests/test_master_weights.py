"""fp32 master weights held by the optimizer (optim.MasterAdamW): in a bf16 run the trained
Linear weights are bf16 and their fp32 masters live in the optimizer, computing exactly what
fp32 weights under autocast compute."""

import importlib
import shutil

import pytest
import torch

from peftlab import TrainConfig, checkpoint, data, models, optim, train
from peftlab.methods import prepare, trainable_parameters

train_module = importlib.import_module("peftlab.loop")


def _run(text_file, strategy="full", held=True, monkeypatch=None, out=None, steps=4, resume=False, seen=None, **extra):
    if not held:
        monkeypatch.setattr(train_module, "_masters", lambda *a: {})
    loaded = models.load("tiny-llama", seed=0)
    blocks = data.load_blocks(loaded, str(text_file), 32)
    prepared = prepare(loaded.model, strategy, loaded.tokenizer)
    cfg = TrainConfig(steps=steps, batch_size=2, seq_len=32, lr=1e-3, warmup=0, eval_every=steps, device="cpu",
                      dtype="bf16", **({"compile": False} | extra))

    def on_step(step, record, opt):
        if seen is not None:
            seen[step] = {n: (p.dtype, "master" in opt.state.get(p, {})) for n, p in trainable_parameters(loaded.model).items()}

    records = train(loaded.model, blocks, prepared, cfg, out=out, show=False, resume=resume, on_step=on_step)
    if not held:
        monkeypatch.undo()
    return loaded.model, records


def _same(a, b):
    for name, p in trainable_parameters(a).items():
        q = trainable_parameters(b)[name]
        assert p.dtype == q.dtype == torch.float32, name
        assert torch.equal(p, q), name


@pytest.mark.parametrize("strategy,clip", [("full", 1.0), ("freeze-attention", 0.02)])
def test_held_masters_train_bit_for_bit_as_fp32_weights_under_autocast(text_file, monkeypatch, strategy, clip):
    seen = {}
    model, records = _run(text_file, strategy, seen=seen, clip=clip)
    ref, want = _run(text_file, strategy, held=False, monkeypatch=monkeypatch, clip=clip)
    _same(model, ref)
    for key in ("loss", "grad_norm", "eval_loss"):
        assert [r.get(key) for r in records] == [r.get(key) for r in want], key
    if clip < 1:
        assert all(r["grad_norm"] > clip for r in records if "grad_norm" in r)  # the clipping factor was applied
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    during = seen[2]
    held = {n for n, (dtype, master) in during.items() if master}
    assert held == {n for n in during if n.rsplit(".", 1)[0] in linear}  # every trained Linear weight, nothing else
    assert all(during[n][0] == torch.bfloat16 for n in held) and all(during[n][0] == torch.float32 for n in during if n not in held)


def test_held_masters_train_as_fp32_weights_when_compiled(text_file, monkeypatch):
    """Compiled blocks read the bf16 weights instead of casting fp32 ones inside the graph."""
    model, records = _run(text_file, "freeze-attention", compile=True)
    ref, want = _run(text_file, "freeze-attention", held=False, monkeypatch=monkeypatch, compile=True)
    _same(model, ref)
    for key in ("loss", "grad_norm", "eval_loss"):
        assert [r.get(key) for r in records] == [r.get(key) for r in want], key


def test_held_masters_resume_bit_for_bit(text_file, tmp_path):
    whole, _ = _run(text_file, "freeze-attention", out=tmp_path / "a", checkpoint_every=2)
    _run(text_file, "freeze-attention", out=tmp_path / "b", checkpoint_every=2)
    shutil.rmtree(checkpoint.folder_of(tmp_path / "b", 4), ignore_errors=True)  # as if killed after step 2's checkpoint
    assert checkpoint.latest(tmp_path / "b").name.endswith("2")
    resumed, _ = _run(text_file, "freeze-attention", out=tmp_path / "b", checkpoint_every=2, resume=True)
    _same(resumed, whole)


def test_a_checkpoint_of_fp32_weights_resumes_into_held_masters(text_file, tmp_path, monkeypatch):
    """A checkpoint written where weights were fp32 (no masters saved) resumes exactly."""
    whole, _ = _run(text_file, "full", out=tmp_path / "a", checkpoint_every=2)
    _run(text_file, "full", held=False, monkeypatch=monkeypatch, out=tmp_path / "b", checkpoint_every=2)
    shutil.rmtree(checkpoint.folder_of(tmp_path / "b", 4), ignore_errors=True)
    resumed, _ = _run(text_file, "full", out=tmp_path / "b", checkpoint_every=2, resume=True)
    _same(resumed, whole)


def test_no_masters_where_gradients_sum_in_their_own_dtype(text_file):
    """Micro-batches add their gradients into .grad: bf16 there would round each sum."""
    seen = {}
    _run(text_file, "full", seen=seen, grad_accum=2)
    assert all(dtype == torch.float32 and not master for dtype, master in seen[1].values())


def test_candidates_are_untied_linear_weights_only():
    loaded = models.load("tiny-llama", seed=0)
    model = loaded.model
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: read by the embedding in fp32
    names = optim.master_candidates(model)
    assert names and all(n.endswith("proj.weight") for n in names)
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in names)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    assert "model.layers.0.mlp.up_proj.weight" not in optim.master_candidates(model)

"""bitfit, schedule and qlora."""

import pytest
import torch

from conftest import n_trainable
from peftlab import TrainConfig, load_blocks, load_model, prepare, train
from peftlab.errors import UserError
from peftlab.params import storage_bytes


@pytest.mark.parametrize("arch", ["tiny-gptneo", "tiny-gpt2"])
def test_bitfit_counts_bias_sizes(arch):
    model = load_model(arch).model
    want = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    prepare(model, "bitfit")
    assert n_trainable(model) == want > 0


def test_bitfit_on_bias_free_llama_says_so_and_offers_norms():
    with pytest.raises(UserError, match="has no bias parameters; use bitfit:norms=true"):
        prepare(load_model("tiny-llama").model, "bitfit")
    model = load_model("tiny-llama").model
    prepare(model, "bitfit:norms=true")
    assert n_trainable(model) == (2 * 2 + 1) * 64


def test_schedule_unfreezes_attention_at_its_step(text_file):
    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "schedule:mlp=0,attention=3")
    q = dict(loaded.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    seen = []

    def watch(step, record, optimizer):
        seen.append((step, q.requires_grad, q.detach().clone()))

    start = q.detach().clone()
    blocks = load_blocks(loaded, str(text_file), 32)
    train(loaded.model, blocks, prepared, TrainConfig(steps=6, lr=1e-2, warmup=0, batch_size=2), on_step=watch, show=False)
    for step, trainable, value in seen:
        assert trainable == (step > 3)
        assert torch.equal(value, start) == (step <= 3)


def test_schedule_errors():
    with pytest.raises(UserError, match="give each component its start step"):
        prepare(load_model("tiny-llama").model, "schedule")
    with pytest.raises(UserError, match="no 'bias' parameters"):
        prepare(load_model("tiny-llama").model, "schedule:bias=0")


@pytest.mark.parametrize("bits, at_most", [(4, 0.2), (8, 0.3)])
def test_qlora_stores_the_base_in_few_bits_and_trains(bits, at_most, text_file):
    loaded = load_model("tiny-llama")
    linear_fp32 = sum(p.numel() * 4 for n, p in loaded.model.named_parameters() if "layers" in n and "proj" in n)
    prepared = prepare(loaded.model, f"qlora:bits={bits},r=4,targets=all-linear")
    linear_now = storage_bytes(loaded.model.model.layers) - sum(
        p.numel() * 4 for n, p in loaded.model.model.layers.named_parameters() if p.requires_grad or "norm" in n)
    assert linear_now <= at_most * linear_fp32 * (2 if bits == 8 else 1)
    assert n_trainable(loaded.model) == sum(4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]) * 2
    blocks = load_blocks(loaded, str(text_file), 64)
    floats = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if p.dtype.is_floating_point}
    records = train(loaded.model, blocks, prepared, TrainConfig(steps=15, lr=3e-3, dtype="bf16"), show=False)
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    # only LoRA's tensors train; the float frozen ones (norms, embeddings) are untouched but for
    # their storage in bf16 (the quantized ones change layout when bitsandbytes repacks them for CPU)
    assert all(".lora." in n for n, p in loaded.model.named_parameters() if p.requires_grad)
    params = dict(loaded.model.named_parameters())
    moved = {n for n, p in floats.items() if not torch.equal(params[n], p.to(params[n].dtype))}
    assert moved and all(".lora." in n for n in moved), moved


def test_qlora_refuses_conv1d():
    with pytest.raises(UserError, match="Conv1D"):
        prepare(load_model("tiny-gpt2").model, "qlora")


def test_qlora_generates_deterministically():
    from conftest import perturb
    from peftlab.generate import generate

    loaded = load_model("tiny-llama")
    prepare(loaded.model, "qlora:bits=4,r=4")
    perturb(loaded.model, 0.05)
    assert generate(loaded, "Call me", max_new_tokens=6) == generate(loaded, "Call me", max_new_tokens=6)


def test_a_schedule_refuses_more_than_one_process(monkeypatch):
    """Its set of trained tensors changes mid-run: one process only (its Training says so)."""
    from peftlab import distributed
    from peftlab.config import TrainConfig
    from peftlab.loop import check_processes

    prepared = prepare(load_model("tiny-llama").model, "schedule:mlp=0,attention=2")
    check_processes(prepared, TrainConfig())
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(UserError, match="schedule trains in one process only; drop --nproc / torchrun"):
        check_processes(prepared, TrainConfig())

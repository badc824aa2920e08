"""The fused-backward causal attention equals sdpa: outputs and all three gradients."""

import pytest
import torch
import torch.nn.functional as F

from peftlab import attention, models


@pytest.mark.parametrize("heads,kv_heads,T", [(4, 4, 33), (9, 3, 64), (6, 2, 7), (9, 3, 300), (4, 2, 1030)])
def test_causal_attention_equals_sdpa(heads, kv_heads, T):
    """One block (T ≤ 128), three blocks with a short last one (300), four uneven ones (1030)."""
    g = torch.Generator().manual_seed(heads * T)
    q, k, v = (torch.randn(2, h, T, 16, generator=g, requires_grad=True) for h in (heads, kv_heads, kv_heads))
    d_out = torch.randn(2, heads, T, 16, generator=g)
    ours = attention.CausalAttention.apply(q, k, v, 0.3)
    mine = torch.autograd.grad(ours, (q, k, v), d_out)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    theirs = torch.autograd.grad(ref, (q, k, v), d_out)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip("qkv", mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"d{name}")


def test_only_plain_causal_training_calls_are_taken():
    module = torch.nn.Module()
    q = torch.zeros(1, 4, 8, 16, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 8, 16, dtype=torch.bfloat16)
    assert attention.covers(module, q, k, None, 0.0, {})
    assert not attention.covers(module, q, k, torch.zeros(1, 1, 8, 8, dtype=torch.bool), 0.0, {})  # a mask
    assert attention.covers(module, q.float(), k.float(), None, 0.0, {})  # fp32 runs in fp32
    assert not attention.covers(module, q.half(), k.half(), None, 0.0, {})  # fp16 keeps sdpa
    with torch.autocast("cpu", dtype=torch.float16):
        assert not attention.covers(module, q.float(), k.float(), None, 0.0, {})
    assert not attention.covers(module, q, k[:, :, :5], None, 0.0, {})  # a cache: keys ≠ queries
    assert not attention.covers(module, q, k, None, 0.0, {"softcap": 50.0})
    with torch.no_grad():
        assert not attention.covers(module, q, k, None, 0.0, {})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3", "tiny-gpt2"])
def test_model_with_fast_attention_gives_sdpa_loss_and_gradients(arch, dtype, monkeypatch):
    taken = []
    covers = attention.covers
    monkeypatch.setattr(attention, "covers", lambda *a: taken.append(covers(*a)) or taken[-1])
    model = models.load(arch).model.to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = loss_and_grads()
    previous = attention.use(model)
    assert previous == "sdpa" and model.config._attn_implementation == attention.NAME
    loss, grads = loss_and_grads()
    attention.restore(model, previous)
    assert model.config._attn_implementation == "sdpa"
    assert len(taken) == model.config.num_hidden_layers and all(taken)  # every layer took the fused path
    if dtype == torch.float32:  # the same arithmetic up to the order of sums
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        for n, g in ref.items():
            torch.testing.assert_close(grads[n], g, atol=1e-5, rtol=1e-4, msg=n)
        return
    torch.testing.assert_close(loss, ref_loss, atol=2e-3, rtol=0)
    for n, g in ref.items():  # bf16: compare against the gradient's own scale
        assert (grads[n] - g).norm() <= 0.02 * g.norm() + 1e-6, n


def test_models_without_sdpa_are_left_alone():
    model = models.load("tiny-gptneo").model  # eager attention
    assert attention.use(model) is None and model.config._attn_implementation == "eager"

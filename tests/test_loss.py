"""The chunked loss equals transformers' loss, and so do its gradients (hidden states and head)."""

import pytest
import torch

from peftlab import models
from peftlab.loss import causal_lm_loss


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gptneo", "tiny-gpt2", "tiny-gemma3"])
@pytest.mark.parametrize("train_head", [False, True])
def test_loss_and_gradients_equal_transformers(arch, train_head):
    model = models.load(arch).model.float()
    if arch == "tiny-gemma3":  # also cover soft-capped logits (Gemma 2/3 option)
        model.config.final_logit_softcapping = 3.0
    for n, p in model.named_parameters():
        p.requires_grad_(train_head or "embed" not in n and "wte" not in n and "lm_head" not in n)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=g)
    labels = ids.clone()
    labels[0, :10] = -100  # masked prompt positions do not count
    ours = causal_lm_loss(model, ids, labels, chunk=16)  # several chunks, the last one short
    ours.backward()
    mine = _grads(model)
    model.zero_grad(set_to_none=True)
    theirs = model(input_ids=ids, labels=labels).loss
    theirs.backward()
    ref = _grads(model)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert mine.keys() == ref.keys() and len(mine) > 0
    for n in ref:
        torch.testing.assert_close(mine[n], ref[n], atol=1e-5, rtol=1e-4, msg=n)


def test_loss_without_grad_and_all_masked():
    model = models.load("tiny-llama").model.float()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(model, ids, ids), model(input_ids=ids, labels=ids).loss)
    masked = torch.full_like(ids, -100)
    assert float(causal_lm_loss(model, ids, masked).detach()) == 0.0


def test_head_runs_in_the_autocast_dtype_even_after_an_fp32_norm(monkeypatch):
    """A trainable final norm keeps an fp32 weight; the head must still run in bf16 under autocast."""
    import peftlab.loss as loss_mod
    from peftlab import runtime
    from peftlab.methods import prepare

    loaded = models.load("tiny-llama")
    prepare(loaded.model, "bitfit:norms=true")
    runtime.store_frozen(loaded.model, torch.bfloat16)
    seen = []
    apply = loss_mod.LinearCrossEntropy.apply
    monkeypatch.setattr(loss_mod.LinearCrossEntropy, "apply", lambda h, *a: seen.append(h.dtype) or apply(h, *a))
    ids = torch.randint(0, loaded.model.config.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = causal_lm_loss(loaded.model, ids, ids)
        theirs = loaded.model(input_ids=ids, labels=ids).loss
    ours.backward()
    assert seen == [torch.bfloat16]
    assert float(ours) == pytest.approx(float(theirs), rel=1e-2)
    assert loaded.model.model.norm.weight.grad.dtype == torch.float32


def test_evaluation_of_a_trained_head_builds_no_gradients(monkeypatch):
    """Under no_grad the chunked loss asks for no logit gradients, even when the head trains."""
    from peftlab import load_model, prepare
    from peftlab import loss as loss_mod

    loaded = load_model("tiny-llama")
    prepare(loaded.model, "full")  # the head requires grad
    asked = []
    real = loss_mod._chunk
    monkeypatch.setattr(loss_mod, "_chunk", lambda *a: asked.append(a[4]) or real(*a))
    ids = torch.tensor([loaded.encode("Call me Ishmael. Some years ago")])
    with torch.no_grad():
        loss_mod.causal_lm_loss(loaded.model, ids, ids)
    assert asked and not any(asked)
    asked.clear()
    loss_mod.causal_lm_loss(loaded.model, ids, ids).backward()
    assert asked and all(asked)

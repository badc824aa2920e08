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


def _kernel_or_skip(dtype):
    from peftlab import kernels

    if kernels.compiler() is None:
        pytest.skip("no C++ compiler: the torch chunks run instead")
    assert kernels.load() is not None, "a C++ compiler is present but the kernels did not build"
    if not kernels.has_vectorized_loss(dtype):
        assert dtype == torch.bfloat16, "the fp32 kernel is plain C: it runs wherever the library builds"
        pytest.skip("bf16 without AVX-512: the torch chunks run instead")
    return kernels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,vocab", [(5, 37), (64, 1000), (3, 4099)])
def test_softmax_xent_kernel_equals_torch(rows, vocab, dtype):
    """The in-place kernel: per-row losses as an fp64 reference, the gradient as `_chunk`'s
    (bf16: its vector exp may differ from torch's in the last bit of a rare element; fp32: to
    the polynomial's accuracy)."""
    from peftlab.loss import _chunk

    kernels = _kernel_or_skip(dtype)
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 16, generator=g).to(dtype)
    w = (3 * torch.randn(vocab, 16, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    logits = (h @ w.t()).contiguous()
    exact = torch.logsumexp(logits.double(), -1) - logits.double()[torch.arange(rows), targets]
    _, ref_grad = _chunk(h, w, targets, None)
    losses = kernels.softmax_xent(logits, targets)
    torch.testing.assert_close(losses.double(), exact, atol=1e-5, rtol=1e-5)
    if dtype == torch.bfloat16:
        ulps = (logits.view(torch.int16).int() - ref_grad.view(torch.int16).int()).abs()
        assert ulps.max() <= 1 and (ulps > 0).float().mean() < 1e-3
    else:
        torch.testing.assert_close(logits, ref_grad, atol=1e-7, rtol=1e-5)
        assert torch.allclose(logits.sum(-1), torch.zeros(rows), atol=1e-5)  # softmax − one-hot sums to 0


def test_softmax_xent_fp32_underflows_gradually():
    """Probabilities below fp32's normal range come out as subnormals, as torch's softmax."""
    kernels = _kernel_or_skip(torch.float32)
    row = [0.0, -200.0, -90.0, -100.0, 5.0]
    logits = torch.tensor([row])
    expected = torch.softmax(logits, -1)
    expected[0, 4] -= 1
    losses = kernels.softmax_xent(logits, torch.tensor([4]))
    torch.testing.assert_close(logits, expected, atol=0, rtol=1e-5)
    assert 0 < float(logits[0, 2]) < torch.finfo(torch.float32).tiny  # a subnormal, not zero
    torch.testing.assert_close(losses, (torch.logsumexp(torch.tensor(row), 0) - 5).reshape(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_softmax_xent_kernel_marks_non_finite_rows_and_leaves_bad_targets_to_torch(dtype):
    kernels = _kernel_or_skip(dtype)
    logits = torch.randn(3, 50).to(dtype)
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    losses = kernels.softmax_xent(logits, torch.zeros(3, dtype=torch.long))
    assert losses[0].isfinite() and losses[1:].isnan().all()
    assert logits[1:].float().isnan().all() and logits[0].float().isfinite().all()
    before = torch.randn(2, 50).to(dtype)
    kept = before.clone()
    assert kernels.softmax_xent(before, torch.tensor([0, 50])) is None  # out of the vocabulary: torch's error
    assert torch.equal(before, kept)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_loss_takes_the_kernel_and_equals_the_torch_chunks(train_head, dtype, monkeypatch):
    """The compiled path (fused) runs the kernel on every chunk, the last short one included,
    and gives the loss and gradients of the uncompiled chunks."""
    kernels = _kernel_or_skip(dtype)
    calls = []
    real = kernels.softmax_xent
    monkeypatch.setattr(kernels, "softmax_xent", lambda z, t: calls.append(len(t)) or real(z, t))
    model = models.load("tiny-llama").model.to(dtype)
    for n, p in model.named_parameters():
        p.requires_grad_(train_head or "embed" not in n and "lm_head" not in n)
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model, ids, ids, chunk=16, fused=fused)
        loss.backward()
        results.append((loss.float(), _grads(model)))
    assert calls == [16] * 7 + [5]  # 3 · 39 positions in chunks of 16
    (ref_loss, ref), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref.keys() and any("embed" in n for n in grads) == train_head
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for n in ref:
        assert (grads[n].float() - ref[n].float()).norm() <= tolerance * ref[n].float().norm() + 1e-6, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_product_equals_the_fp64_product(dtype, monkeypatch):
    """The chunk's logits (fp32: through oneDNN where torch has it) are h · Wᵀ to the dtype's
    rounding, with the head weight as the loss gets it (a strided view included)."""
    from peftlab import loss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 64, generator=g).to(dtype)
    w = torch.randn(64, 1001, generator=g).to(dtype).t()  # (V, d), not contiguous
    exact = h.double() @ w.double().t()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    calls = []
    if loss._LINEAR is not None:
        monkeypatch.setattr(loss, "_LINEAR", lambda *a: calls.append(a) or torch.ops.mkldnn._linear_pointwise(*a))
    out = torch.full((37, 1001), float("nan"), dtype=dtype)
    loss._logits_into(h, w, out)
    assert torch.allclose(out.double(), exact, rtol=tol, atol=tol * exact.abs().max().item())
    assert len(calls) == (dtype == torch.float32 and loss._LINEAR is not None)

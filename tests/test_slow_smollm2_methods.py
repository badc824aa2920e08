"""Every method on the real SmolLM2-135M: exact counts from the closed forms, and a training step."""

import pytest
import torch

from conftest import n_trainable, need_assets
from peftlab import load_model, prepare

pytestmark = pytest.mark.slow

D, L, KV, FF, V = 576, 30, 192, 1536, 49152  # hidden, layers, k/v width, MLP width, vocabulary
QV = L * ((D + D) + (D + KV))  # (n + m) summed over q and v per layer
ALL = L * (2 * (D + D) + 2 * (D + KV) + 2 * (D + FF) + (FF + D))  # q, o, k, v, gate, up, down

EXPECTED = {
    "full": 134_515_008,
    "freeze-attention": L * 3 * D * FF + (2 * L + 1) * D,
    "targeted-qkv": (L - 6) * (D * D + 2 * D * KV),
    "bitfit:norms=true": (2 * L + 1) * D,
    "lora:r=8": 8 * QV,
    "lora:r=16,targets=all-linear": 16 * ALL,
    "dora:r=8": 8 * QV + L * (D + KV),
    "adapter:r=32": L * 2 * (2 * D * 32 + 32 + D),
    "prefix:tokens=20": 2 * 20 * KV * L,
    "prompt:tokens=20": 20 * D,
    "targeted-qkv/lora:r=4": (L - 6) * (D * D + 2 * D * KV) + 4 * QV,
}


@pytest.fixture(scope="module")
def smollm2():
    need_assets("smollm2-135m")
    return load_model("smollm2-135m")


@pytest.mark.parametrize("spec", list(EXPECTED))
def test_counts_and_one_step(smollm2, spec):
    import copy

    model = copy.deepcopy(smollm2.model)
    prepare(model, spec, smollm2.tokenizer)
    assert n_trainable(model) == EXPECTED[spec]
    if spec in ("lora:r=8", "prefix:tokens=20", "adapter:r=32", "prompt:tokens=20"):
        ids = torch.tensor([smollm2.encode("Call me Ishmael. Some years ago, never mind how long precisely")])
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)

"""Merge and unmerge, merge-and-unload, `peftlab merge` -> plain transformers."""

import copy
import subprocess
import sys

import pytest
import torch

from conftest import ARCHS, perturb, sample_ids
from peftlab import load_model, prepare
from peftlab.artifacts import load, save
from peftlab.errors import UserError
from peftlab.merge import merge, merge_and_unload, unmerge


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", ["lora:r=4,targets=all-linear", "dora:r=4,targets=all-linear", "lora:r=4,rslora=true"])
def test_merge_keeps_logits_and_unmerge_restores_weights(arch, spec):
    loaded = load_model(arch)
    start = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    prepare(loaded.model, spec)
    perturb(loaded.model, 0.1)
    ids = sample_ids(loaded)
    want = loaded.model(input_ids=ids).logits
    merge(loaded.model)
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    moved = [n for n, p in loaded.model.named_parameters() if n in start and not torch.equal(p, start[n])]
    assert moved  # the base weights really changed
    unmerge(loaded.model)
    for n, p in loaded.model.named_parameters():
        if n in start:
            assert (p - start[n]).abs().max() <= 1e-6, n
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, want, atol=1e-5, rtol=0)


def test_freeze_delta_unmerge_restores_the_base(tmp_path):
    trained = load_model("tiny-llama")
    prepared = prepare(trained.model, "freeze:train=mlp")
    perturb(trained.model)
    save(trained.model, prepared, tmp_path / "a")
    base = load_model("tiny-llama")
    start = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    load(base.model, tmp_path / "a")
    assert not torch.equal(dict(base.model.named_parameters())["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    unmerge(base.model)
    assert all(torch.equal(p, start[n]) for n, p in base.model.named_parameters())


def test_merge_and_unload_leaves_a_plain_model():
    loaded = load_model("tiny-gpt2")
    prepare(loaded.model, "lora:r=4")
    perturb(loaded.model, 0.1)
    ids = sample_ids(loaded)
    want = loaded.model(input_ids=ids).logits
    plain = merge_and_unload(loaded.model)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert not any(getattr(m, "_peftlab_hooks", None) for m in plain.modules())
    torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=1e-5, rtol=0)


def test_nan_is_refused_before_merging():
    loaded = load_model("tiny-llama")
    prepare(loaded.model, "lora:r=4")
    delta = loaded.model.model.layers[0].self_attn.q_proj.lora["default"]
    delta.B.data[0, 0] = float("nan")
    before = loaded.model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(UserError, match="NaN or Inf"):
        merge(loaded.model)
    assert torch.equal(loaded.model.model.layers[0].self_attn.q_proj.weight, before)


def test_nonlinear_methods_are_not_merged():
    for spec in ("adapter:r=4", "prefix:tokens=3", "prompt:tokens=3"):
        loaded = load_model("tiny-llama")
        prepare(loaded.model, spec)
        with pytest.raises(UserError, match="cannot be folded"):
            merge_and_unload(loaded.model)


def test_quantized_base_needs_dequantize():
    loaded = load_model("tiny-llama")
    prepare(loaded.model, "qlora:bits=4,r=4")
    perturb(loaded.model, 0.05)
    ids = sample_ids(loaded)
    want = loaded.model(input_ids=ids).logits
    with pytest.raises(UserError, match="stored quantized"):
        merge_and_unload(copy.deepcopy(loaded.model))
    with pytest.warns(UserWarning, match="de-quantizing"):
        plain = merge_and_unload(loaded.model, dequantize=True)
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    # 4-bit matmuls ran in bf16 before; the merged fp32 model agrees to bf16 precision
    torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=0.05, rtol=0)


def test_cli_merge_writes_a_folder_transformers_loads_without_peftlab(cli, tmp_path):
    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "dora:r=4,targets=all-linear")
    perturb(loaded.model, 0.1)
    save(loaded.model, prepared, tmp_path / "adapter")
    ids = sample_ids(loaded)
    want = loaded.model(input_ids=ids).logits
    code, out, err = cli("merge", "--model", "tiny-llama", "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged")
    assert code == 0, err
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys; sys.modules['peftlab'] = None\n"  # any import of peftlab would fail
        "import torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"torch.save(m(input_ids=ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, atol=1e-5, rtol=0)


def test_cli_merge_errors(cli, tmp_path):
    code, _, err = cli("merge", "-m", "tiny-llama", "-a", tmp_path / "nothing", "-o", tmp_path / "m")
    assert code == 2 and "adapter folder not found" in err and not (tmp_path / "m").exists()

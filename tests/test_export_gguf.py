"""GGUF export: the merged model loads back through transformers with the same logits, the
LoRA GGUF holds exactly the adapter's ΔW in llama.cpp's layout, and (when llama-cpp-python is
installed) llama.cpp itself generates what transformers generates."""

import numpy as np
import pytest
import torch

from peftlab import load_model, prepare
from peftlab.export import _permute, export_lora, export_model
from peftlab.merge import merge_and_unload

from conftest import need_assets, perturb

# measured on the tiny models: f32 0, f16 ~3e-4 (llama) / 6e-4 (gemma3), bf16 ~2e-3 / 5e-3, q8_0 ~6e-3 / 1.5e-2
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2, "q8_0": 4e-2}


def trained(name, spec="lora:r=4,targets=all-linear"):
    loaded = load_model(name)
    prepare(loaded.model, spec)
    perturb(loaded.model, scale=0.05)
    return loaded


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_merged_gguf_loads_back_with_the_merged_logits(name, dtype, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded = trained(name)
    merged = merge_and_unload(loaded.model)
    export_model(merged, loaded.tokenizer, tmp_path / "m.gguf", dtype=dtype)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([loaded.encode("Call me Ishmael. Some years ago")])
    with torch.no_grad():
        want, got = merged(input_ids=ids).logits, back(input_ids=ids).logits
    assert (got - want).abs().max() <= TOLERANCE[dtype]
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("spec", ["lora:r=4,targets=all-linear", "lora:r=8,alpha=3,rslora=true,targets=q_proj+k_proj+o_proj"])
def test_lora_gguf_holds_the_adapters_delta(spec, tmp_path):
    import gguf

    loaded = trained("tiny-llama", spec)
    base = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if not p.requires_grad}
    export_lora(loaded.model, tmp_path / "lora.gguf", dtype="f32")
    reader = gguf.GGUFReader(str(tmp_path / "lora.gguf"))
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    alpha = field("adapter.lora.alpha")
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    merged = {n: p.detach() for n, p in merge_and_unload(loaded.model).named_parameters()}
    c = loaded.model.config
    checked = 0
    for name, w in merged.items():
        m = name.split(".")
        if "layers" not in m or name not in base or not torch.is_tensor(w) or w.dim() != 2:
            continue
        layer, proj = m[2], m[-2]
        gg = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
              "up_proj": "ffn_up", "down_proj": "ffn_down"}[proj]
        key = f"blk.{layer}.{gg}.weight"
        delta = (w - base[name]).float()
        if f"{key}.lora_a" not in tensors:
            assert delta.abs().max() == 0, name
            continue
        A, B = torch.from_numpy(tensors[f"{key}.lora_a"]), torch.from_numpy(tensors[f"{key}.lora_b"])
        heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(proj)
        want = _permute(delta, heads) if heads else delta
        torch.testing.assert_close(alpha / A.shape[0] * (B @ A), want, atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked == len({h for h in tensors if h.endswith(".lora_a")}) > 0


def test_dora_is_refused_with_one_line(cli, text_file, tmp_path):
    assert cli("train", "-m", "tiny-llama", "-d", text_file, "-s", "dora:r=2", "--steps", 1, "--seq-len", 32, "--quiet",
               "-o", tmp_path / "run")[0] == 0
    code, _, err = cli("export", "-m", "tiny-llama", "-a", tmp_path / "run" / "adapter", "--lora-only", "-o", tmp_path / "x.gguf")
    assert code == 2 and "DoRA cannot be a llama.cpp LoRA GGUF" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()
    code, _, err = cli("export", "-m", "tiny-gpt2", "-o", tmp_path / "x.gguf")
    assert code == 2 and "GGUF export knows" in err


@pytest.mark.slow
def test_llama_cpp_runs_the_exports_like_transformers(tmp_path):
    """Greedy text from llama.cpp — the exported merged model, and the packaged base GGUF plus
    the exported LoRA GGUF — equals transformers' with the adapter, on SmolLM2."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'peftlab[llama]')")
    from peftlab import assets
    from peftlab.generate import generate

    need_assets("smollm2-135m")
    loaded = load_model("smollm2-135m")
    prepare(loaded.model, "lora:r=8,targets=all-linear")
    perturb(loaded.model, scale=0.04)
    prompt = "The capital of France is"
    want = generate(loaded, prompt, max_new_tokens=8)
    from peftlab.adapters import disabled

    with disabled(loaded.model):
        assert generate(loaded, prompt, max_new_tokens=8) != want, "the adapter must change the output to be seen"
    export_lora(loaded.model, tmp_path / "lora.gguf", dtype="f32")
    export_model(merge_and_unload(loaded.model), loaded.tokenizer, tmp_path / "merged.gguf", dtype="f32")

    def greedy(**kw):
        llm = llama_cpp.Llama(n_ctx=64, verbose=False, seed=0, **kw)
        return llm(prompt, max_tokens=8, temperature=0.0, top_k=1)["choices"][0]["text"]

    assert greedy(model_path=str(tmp_path / "merged.gguf")) == want
    assert greedy(model_path=str(assets.asset_path("smollm2-135m")), lora_path=str(tmp_path / "lora.gguf")) == want


@pytest.mark.slow
def test_smollm2_gguf_round_trips_weights_and_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    need_assets("smollm2-135m")
    loaded = trained("smollm2-135m", "lora:r=8,targets=q_proj+v_proj")
    merged = merge_and_unload(loaded.model)
    export_model(merged, loaded.tokenizer, tmp_path / "m.gguf", dtype="f16")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "The capital of France is Paris. Call me Ishmael."
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (back(input_ids=x).logits - merged(input_ids=x).logits).abs().max()
    assert diff < 0.1, diff  # f16 weights; logits of magnitude ~28 (measured: 0.05)

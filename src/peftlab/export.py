"""GGUF files for llama.cpp and Ollama: a merged model, or a LoRA as llama.cpp's LoRA GGUF.

    model:  general.architecture + <arch>.* hyperparameters, the tokenizer (tokenizer.ggml.*),
            tensors under llama.cpp's names (blk.N.attn_q.weight, ...)
    LoRA:   general.type = adapter, adapter.type = lora, adapter.lora.alpha;
            blk.N.attn_q.weight.lora_a (r × in) and .lora_b (out × r) for every adapted layer

Written with the `gguf` package (llama.cpp's own writer), following llama.cpp's converter:
- Llama: W_Q and W_K rows are permuted from Hugging Face's rotary layout (two halves) to
  llama.cpp's (interleaved pairs); for a LoRA, B is permuted the same way (ΔW = B·A).
- Gemma 3: RMSNorm weights are stored as 1 + w (llama.cpp multiplies by the weight itself).
- 1-D tensors (norms, biases) stay f32, as llama.cpp's converter keeps them.
A LoRA's per-layer scale is folded into B, so one `adapter.lora.alpha` (= r) holds for all
layers: rsLoRA and mixed ranks export exactly. DoRA rescales the merged rows by a magnitude
llama.cpp's LoRA cannot express: refused.
"""

import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

ARCHES = {"llama": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}
TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}


def _arch(model) -> str:
    kind = model.config.model_type
    if kind not in ARCHES:
        raise UserError(f"GGUF export knows {', '.join(sorted(set(ARCHES)))} models, not {kind}")
    return ARCHES[kind]


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotary row order (first halves, then second halves, per head) to
    llama.cpp's (pairs side by side). w: (heads·head_dim, ...)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(names, hf_name: str) -> str:
    found = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise UserError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
    return found


def _prepared(arch: str, model, hf_name: str, w: torch.Tensor) -> torch.Tensor:
    c = model.config
    if arch == "llama" and hf_name.endswith("q_proj.weight"):
        w = _permute(w, c.num_attention_heads)
    elif arch == "llama" and hf_name.endswith("k_proj.weight"):
        w = _permute(w, c.num_key_value_heads)
    if arch == "gemma3" and hf_name.endswith("norm.weight"):
        w = w + 1
    return w


def _add(writer, name: str, w: torch.Tensor, dtype: str) -> None:
    import gguf

    data = w.detach().float().contiguous().numpy()
    kind = TYPES[dtype] if data.ndim > 1 else "F32"
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    if kind == "F32":
        writer.add_tensor(name, data.astype(np.float32))
    elif kind == "F16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)


def _header(writer, model, arch: str, name: str) -> None:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(c, "rope_parameters", None) or {}
    theta = (rope.get("rope_theta") if isinstance(rope, dict) and "rope_theta" in rope
             else (rope.get("full_attention", {}) or {}).get("rope_theta") if isinstance(rope, dict) else None)
    writer.add_rope_freq_base(float(theta or getattr(c, "rope_theta", 10000.0)))
    writer.add_vocab_size(c.vocab_size)
    if arch == "gemma3" and getattr(c, "sliding_window", None):
        writer.add_sliding_window(c.sliding_window)


def _tokenizer(writer, tokenizer, n_vocab: int) -> None:
    """llama.cpp's tokenizer keys, read from the tokenizer saved the Hugging Face way."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab = gguf.vocab.BpeVocab(Path(tmp))
            model_kind = "gpt2"
        except Exception:  # a SentencePiece-style tokenizer (Gemma)
            vocab = gguf.vocab.LlamaHfVocab(Path(tmp))
            model_kind = "llama"
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        while len(tokens) < n_vocab:  # embedding rows beyond the tokenizer (padding)
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(model_kind)
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(tmp, load_merges=model_kind == "gpt2", n_vocab=n_vocab).add_to_gguf(writer)


def _write(writer, tmp: Path, out: Path) -> Path:
    """Write the GGUF to its temporary sibling `tmp`, then rename: never a half-written file."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export_model(model, tokenizer, out, dtype: str = "f16", name: str = "peftlab") -> Path:
    """The (merged, plain transformers) `model` as one GGUF file."""
    import gguf

    if dtype not in TYPES:
        raise UserError(f"--dtype for GGUF must be one of {', '.join(TYPES)}, got '{dtype}'")
    arch = _arch(model)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    _header(writer, model, arch, name)
    writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[dtype])
    _tokenizer(writer, tokenizer, model.config.vocab_size)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), model.config.num_hidden_layers)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for hf_name, w in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if "rotary_emb" in hf_name:
            continue
        _add(writer, _gguf_name(names, hf_name), _prepared(arch, model, hf_name, w), dtype)
    return _write(writer, tmp, out)


def export_lora(model, out, name: str = "default", dtype: str = "f32") -> Path:
    """The LoRA adapter `name` attached to `model` as llama.cpp's LoRA GGUF."""
    import gguf

    from .methods.attach import attached

    arch = _arch(model)
    children = [(host, slot[name]) for host, _, slot in attached(model) if name in slot]
    if not children:
        raise UserError(f"no adapter '{name}' on this model to export")
    if any(c.low_rank() is None for _, c in children):
        what = next(c.label or c.method for _, c in children if c.low_rank() is None)
        raise UserError(f"{what} cannot be a llama.cpp LoRA GGUF (it is not a low-rank update B·A); "
                        "export the merged model instead: peftlab export --model M --adapter A --format gguf")
    hosts = [(host, c.low_rank()) for host, c in children]  # (s, B (out, r), A (r, in))
    r = max(A.shape[0] for _, (_, _, A) in hosts)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(r))  # llama.cpp's scale is alpha / rank(tensor)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), model.config.num_hidden_layers)
    for host, (scaling, B, A) in hosts:
        hf_name = f"{host}.weight"
        base = _gguf_name(names, hf_name)
        rank = A.shape[0]
        # llama.cpp computes (alpha / rank) · B A with alpha = r; our scale s becomes part of B.
        B = B.detach().float() * (scaling * rank / r)
        _add(writer, f"{base}.lora_a", A.detach().float(), dtype)
        _add(writer, f"{base}.lora_b", _prepared(arch, model, hf_name, B), dtype)
    return _write(writer, tmp, out)

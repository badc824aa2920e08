"""Tiny random-init models and a byte-level tokenizer, built with no download.

The tokenizer is a real one: byte-level BPE with no merges (every UTF-8 byte is a token),
lossless on any text, plus BOS/EOS/PAD and ChatML markers so chat data works too.
Every tiny model is seeded, so the same alias always gives byte-identical weights.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoConfig,
    LlamaConfig,
    MixtralConfig,
    PreTrainedTokenizerFast,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# 256 byte tokens + 5 special tokens, rounded up so the vocabulary is a multiple of 8.
VOCAB = 264


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A lossless byte-level tokenizer (vocabulary 261, padded to 264 in the models)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHATML
    return tok


def _configs():
    common = dict(bos_token_id=256, eos_token_id=257, pad_token_id=258)
    return {
        "tiny-llama": LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=False, **common,
        ),
        "tiny-gptneo": GPTNeoConfig(
            vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
            attention_types=[[["global", "local"], 1]], window_size=32, max_position_embeddings=512,
            **common,
        ),
        "tiny-gpt2": GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=512,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        ),
        "tiny-gemma3": Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32,
            max_position_embeddings=512, **common,
        ),
        # A mixture of experts: 4 experts, 2 per token, stacked as (E, 2f, d) and (E, d, f) parameters.
        "tiny-mixtral": MixtralConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=512, tie_word_embeddings=False, **common,
        ),
        # The exact shape of EleutherAI/gpt-neo-125M, for parameter counting only.
        "gptneo-125m-shape": GPTNeoConfig(
            vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
            attention_types=[[["global", "local"], 6]], window_size=256, max_position_embeddings=2048,
        ),
    }


TINY = tuple(_configs())


def tiny_model(name: str, seed: int = 0):
    """Build the tiny model `name` with seeded random weights (or empty weights for *-shape)."""
    config = _configs()[name]
    if name.endswith("-shape"):
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()

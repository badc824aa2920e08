"""What a practitioner reads off generated text and an unrelated text.

- style adoption: S_100 = the 100 most frequent tokens of the training corpus;
  p = (1/M) Σ 1(g_i ∈ S_100) over M sampled tokens, for several seeds (mean ± std);
- forgetting: mean token loss on an unrelated text, before and after training;
- samples: greedy continuations of a fixed prompt, before and after.
"""

import statistics

import torch


def top_tokens(train_ids: torch.Tensor, k: int = 100) -> set:
    """The k most frequent token ids of the training blocks."""
    counts = torch.bincount(train_ids.reshape(-1))
    return set(torch.topk(counts, min(k, int((counts > 0).sum()))).indices.tolist())


@torch.no_grad()
def sample_ids(model, prompt: torch.Tensor, new_tokens: int, seed: int, pad_id: int) -> list:
    """`new_tokens` sampled tokens (temperature 1, top-k 50) after `prompt` (1, T)."""
    torch.manual_seed(seed)
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=50, top_p=None,
                         pad_token_id=pad_id)
    return out[0, prompt.shape[1]:].tolist()


def style_share(model, prompt, top: set, new_tokens: int, seeds: int, pad_id: int) -> dict:
    """p over `seeds` seeded samples: mean, std and the individual values."""
    shares = []
    for seed in range(seeds):
        ids = sample_ids(model, prompt, new_tokens, seed, pad_id)
        shares.append(sum(t in top for t in ids) / max(1, len(ids)))
    return {"mean": statistics.fmean(shares), "std": statistics.pstdev(shares), "samples": shares}


@torch.no_grad()
def greedy_text(loaded, prompt: torch.Tensor, new_tokens: int) -> str:
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.tokenizer.eos_token_id
    out = loaded.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=pad)
    return loaded.tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)

"""Text generation with whatever strategy or adapter the model carries."""

import torch

from .errors import UserError


def prompt_ids(loaded, prompt: str, chat: bool = False) -> list[int]:
    """The token ids the model is given: the prompt, in the chat template with `chat`."""
    if chat:
        prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
    return loaded.encode(prompt)


def check_length(loaded, prompt: str, max_new_tokens: int, chat: bool = False) -> None:
    """The prompt and the tokens to generate must fit the model's positions (GPT-2 and GPT-Neo
    have no position past their last one: generating there fails deep inside the model)."""
    from .models import max_positions

    n = len(prompt_ids(loaded, prompt, chat))
    limit = max_positions(loaded.model)
    if limit is not None and n >= limit:
        raise UserError(f"the prompt is {n} tokens, and {loaded.name} takes {limit:,} positions in all; shorten it")
    if limit is not None and n + max_new_tokens > limit:
        raise UserError(f"the prompt ({n} tokens) and --max-new-tokens {max_new_tokens} are more than {loaded.name}'s "
                        f"{limit:,} positions; use --max-new-tokens {limit - n} or less")


@torch.no_grad()
def generate(loaded, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0,
             chat: bool = False) -> str:
    """Continue `prompt` (greedy when temperature is 0); return only the new text."""
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor([prompt_ids(loaded, prompt, chat)], device=next(model.parameters()).device)
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=None,
        top_k=None,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

"""Text generation with whatever strategy or adapter the model carries."""

import torch


@torch.no_grad()
def generate(loaded, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0,
             chat: bool = False) -> str:
    """Continue `prompt` (greedy when temperature is 0); return only the new text."""
    model, tok = loaded.model, loaded.tokenizer
    if chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([loaded.encode(prompt)], device=next(model.parameters()).device)
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

"""Scoring a model on task items, in batched teacher-forced forwards (no token-by-token decoding).

Generation: the prompt and the gold answer, rendered as the training data is (the chat
template with the answer as the assistant turn; plain text where there is no template), form
one row. Greedy decoding reproduces the answer exactly when, at every answer position, the
argmax of the logits at the position before equals the gold token — and at the end-of-answer
position too (the first special token of the assistant turn, e.g. <|im_end|>, or EOS), so a
model that runs on past the answer is wrong. One forward pass per batch instead of one per
generated token; a test checks it equals `model.generate` item by item.

Multiple choice, as lm-evaluation-harness computes it: for each choice the row is
prompt + " " + choice; its log-likelihood is the sum of log p(token) over the choice's
tokens (those of encode(prompt + " " + choice) past encode(prompt)). acc: the argmax of the
sums is the label; acc_norm: the argmax of sum / len(choice) in characters.
"""

from dataclasses import dataclass

import torch

from ..data import IGNORE, render_chat
from ..errors import UserError
from ..loss import hidden_states
from .items import Choice, Generation


@dataclass
class Rows:
    """A task encoded once: token rows and, per row, the span of scored tokens."""

    ids: list  # [row] -> token ids
    start: list  # [row] -> index of the first scored token
    item: list  # [row] -> index of its item
    chars: list  # [row] -> characters of the choice (multiple choice), 1 otherwise


def encode(loaded, items: list, seq_len: int | None = None) -> Rows:
    rows = Rows([], [], [], [])
    for i, it in enumerate(items):
        for ids, start, chars in (_generation(loaded, it) if isinstance(it, Generation) else _choices(loaded, it)):
            if seq_len is not None and len(ids) > seq_len:
                raise UserError(f"{it.where}: prompt and answer take {len(ids)} tokens, more than --seq-len {seq_len}; "
                                f"shorten the item or raise --seq-len")
            rows.ids.append(ids)
            rows.start.append(start)
            rows.item.append(i)
            rows.chars.append(chars)
    return rows


def _generation(loaded, it: Generation):
    tok = loaded.tokenizer
    if getattr(tok, "chat_template", None):
        ids, labels = render_chat(loaded, list(it.prompt) + [{"role": "assistant", "content": it.answer}])
        start = next(k for k, lab in enumerate(labels) if lab != IGNORE)
        span = ids[start:]
        special = set(tok.all_special_ids)
        end = next((k for k, t in enumerate(span) if t in special), len(span) - 1)
        ids = ids[: start + end + 1]
    else:
        prompt = loaded.encode("\n".join(m["content"] for m in it.prompt) + "\n")
        ids = prompt + tok(it.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        start = len(prompt)
    return [(ids, start, 1)]


def _choices(loaded, it: Choice):
    out = []
    for choice in it.choices:
        context, continuation = it.prompt, " " + choice
        spaces = len(context) - len(context.rstrip())
        if spaces:  # as lm-eval: trailing spaces of the prompt belong to the continuation
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = loaded.encode(context + continuation)
        head = loaded.encode(context) if context else []
        if not head:  # nothing to condition on: lm-eval uses the end-of-text token as the context
            head = [loaded.tokenizer.eos_token_id]
            whole = head + whole
        out.append((whole, len(head), len(choice)))
    return out


def shared_prefix(rows: Rows) -> int:
    """Tokens every row begins with, short of the first position a row is scored from (a chat
    template's system prompt is often half of every item: computed once, not once per row)."""
    first = rows.ids[0]
    n = min(min(rows.start) - 1, min(len(r) for r in rows.ids))
    for r in rows.ids[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return max(0, n)


def _cache_name(model) -> str:
    """The forward argument that takes a KV cache: `cache` from transformers 5.24, before it
    `past_key_values` (still accepted, with a deprecation warning)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _hidden(model, ids, mask, cache):
    """(B, T, d) last hidden states of `ids` after the cached prefix (the head runs on no position)."""
    extra = {_cache_name(model): cache, "use_cache": True} if cache is not None else {}
    h = hidden_states(model, ids, attention_mask=mask, **extra)
    return h[:, -ids.shape[1]:]  # methods that prepend virtual tokens (prompt tuning) add positions


@torch.no_grad()
def row_scores(model, rows: Rows, device, budget: int = 1 << 11, chunk: int = 256) -> tuple[list, list]:
    """Per row: (all scored tokens are the argmax, summed log-likelihood of the scored tokens).

    The shared prefix runs once per batch and its KV cache serves every row (as generation
    would use it); rows are batched by length and right-padded (causal attention: padding after
    a row cannot change it); the output layer runs only on the positions that predict scored
    tokens. `budget` bounds batch × length, `chunk` the positions whose logits exist at once, so
    scoring never raises a run's peak memory much above training's."""
    from transformers import DynamicCache

    p = shared_prefix(rows) if len(rows.ids) > 1 else 0
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    order = sorted(range(len(rows.ids)), key=lambda r: len(rows.ids[r]))
    exact, loglik = [False] * len(order), [0.0] * len(order)
    i = 0
    while i < len(order):
        n = max(1, budget // max(1, len(rows.ids[order[min(len(order) - 1, i + 7)]]) - p))
        batch = order[i : i + n]
        length = max(len(rows.ids[r]) for r in batch) - p
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), p + length, dtype=torch.long)
        for j, r in enumerate(batch):
            ids[j, : len(rows.ids[r]) - p] = torch.tensor(rows.ids[r][p:])
            mask[j, : len(rows.ids[r])] = 1
        cache = None
        if p:
            cache = DynamicCache()
            model(input_ids=torch.tensor([rows.ids[batch[0]][:p]], device=device), use_cache=True,
                  logits_to_keep=torch.zeros(0, dtype=torch.long, device=device), **{_cache_name(model): cache})
            cache.batch_repeat_interleave(len(batch))
        h = _hidden(model, ids.to(device), mask.to(device), cache)
        # (row, position in the suffix) of every scored token's predecessor, and the token
        where = [(j, t - 1 - p) for j, r in enumerate(batch) for t in range(rows.start[r], len(rows.ids[r]))]
        gold = torch.tensor([rows.ids[r][t] for r in batch for t in range(rows.start[r], len(rows.ids[r]))], device=device)
        sel = h[[j for j, _ in where], [t for _, t in where]]
        hit, logp = [], []
        for c in range(0, len(sel), chunk):  # (chunk, vocab) logits at a time: the head's output is the big one
            logits = head(sel[c : c + chunk]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            hit.append(logits.argmax(-1) == gold[c : c + chunk])
            logp.append(torch.log_softmax(logits, -1).gather(-1, gold[c : c + chunk, None])[:, 0])
        hit, logp = torch.cat(hit), torch.cat(logp)
        k = 0
        for j, r in enumerate(batch):
            m = len(rows.ids[r]) - rows.start[r]
            exact[r] = bool(hit[k : k + m].all())
            loglik[r] = float(logp[k : k + m].sum())
            k += m
        i += len(batch)
    return exact, loglik


def last_number(text: str) -> str | None:
    from . import NUMBER

    found = NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


@torch.no_grad()
def generated_last_numbers(model, loaded, items: list, rows: Rows, device, batch: int = 32) -> list[bool]:
    """match=last-number: greedy decoding for real (left-padded batches, stopping at the end of
    the turn), right when the last number of what it wrote is the answer's last number."""
    tok = loaded.tokenizer
    stop = sorted(set(tok.all_special_ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    right = [False] * len(items)
    for i in range(0, len(rows.ids), batch):
        chunk = range(i, min(len(rows.ids), i + batch))
        prompts = [rows.ids[r][: rows.start[r]] for r in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(q)) + q for q in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts], device=device)
        longest = max(len(rows.ids[r]) - rows.start[r] for r in chunk)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest + 16, do_sample=False,
                             eos_token_id=stop, pad_token_id=pad)
        for k, r in enumerate(chunk):
            said = tok.decode(out[k, width:], skip_special_tokens=True)
            gold = last_number(items[rows.item[r]].answer)
            right[rows.item[r]] = gold is not None and last_number(said) == gold
    return right


def score(model, items: list, rows: Rows, device, loaded=None, match: str = "exact") -> dict:
    """{"accuracy", "correct": [bool per item]} (+ "acc_norm", "correct_norm" for multiple choice)."""
    if match == "last-number":
        correct = generated_last_numbers(model, loaded, items, rows, device)
        return {"accuracy": sum(correct) / len(items), "correct": correct}
    exact, loglik = row_scores(model, rows, device)
    if isinstance(items[0], Generation):
        correct = [False] * len(items)
        for r, i in enumerate(rows.item):
            correct[i] = exact[r]
        return {"accuracy": sum(correct) / len(items), "correct": correct}
    per_item = [[] for _ in items]
    for r, i in enumerate(rows.item):
        per_item[i].append((loglik[r], rows.chars[r]))
    correct = [max(range(len(c)), key=lambda k: c[k][0]) == it.label for c, it in zip(per_item, items)]
    norm = [max(range(len(c)), key=lambda k: c[k][0] / c[k][1]) == it.label for c, it in zip(per_item, items)]
    return {"accuracy": sum(correct) / len(items), "correct": correct,
            "acc_norm": sum(norm) / len(items), "correct_norm": norm}

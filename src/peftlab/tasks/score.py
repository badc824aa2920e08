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


@torch.no_grad()
def row_scores(model, rows: Rows, device, budget: int = 1 << 27) -> tuple[list, list]:
    """Per row: (all scored tokens are the argmax, summed log-likelihood of the scored tokens).

    Rows are batched by length, right-padded (causal attention: padding after a row cannot
    change its logits); `budget` bounds batch × length × vocab, the logits' size."""
    vocab = model.get_output_embeddings().weight.shape[0]
    order = sorted(range(len(rows.ids)), key=lambda r: len(rows.ids[r]))
    exact, loglik = [False] * len(order), [0.0] * len(order)
    i = 0
    while i < len(order):
        length = len(rows.ids[order[min(len(order) - 1, i)]])
        n = max(1, budget // max(1, length * vocab))
        batch = order[i : i + n]
        length = max(len(rows.ids[r]) for r in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for j, r in enumerate(batch):
            ids[j, : len(rows.ids[r])] = torch.tensor(rows.ids[r])
            mask[j, : len(rows.ids[r])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logits = logits[:, -length:].float()  # methods that prepend virtual tokens (prompt tuning) add positions
        logp = torch.log_softmax(logits, dim=-1)
        for j, r in enumerate(batch):
            s, e = rows.start[r], len(rows.ids[r])
            gold = ids[j, s:e].to(device)
            pred = logits[j, s - 1 : e - 1]
            exact[r] = bool((pred.argmax(-1) == gold).all())
            loglik[r] = float(logp[j, s - 1 : e - 1].gather(-1, gold[:, None]).sum())
        i += len(batch)
    return exact, loglik


def score(model, items: list, rows: Rows, device) -> dict:
    """{"accuracy", "correct": [bool per item]} (+ "acc_norm", "correct_norm" for multiple choice)."""
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

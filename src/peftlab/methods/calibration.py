"""Calibration batches: what an initialisation from data (LoRA's init=eva, init=corda) runs
the model on before anything trains, and the one hooked forward pass they share.

A batch is a (b, t) tensor of token ids, an (ids, labels) pair as `data.Blocks.batches`
yields, or a dict with input_ids and optionally attention_mask and labels (a tokenizer's
output, a DataLoader's batch). `prepare(model, spec, calibration=...)` passes them through;
the command line gives the run's own training batches, in the order it trains on them.
"""

import itertools

import torch
import torch.nn as nn

from ..errors import UserError


def as_inputs(batch, method: str) -> dict:
    """{"input_ids": (b, t), "attention_mask": (b, t), "labels": (b, t) or absent} from one batch."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    elif isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(x, torch.Tensor) for x in batch):
        batch = {"input_ids": batch[0], "labels": batch[1]}
    if not hasattr(batch, "get") or not isinstance(batch.get("input_ids"), torch.Tensor):
        raise UserError(f"{method}: a calibration batch should be a (batch, tokens) id tensor, an (ids, labels) pair "
                        f"or a dict with input_ids; got {type(batch).__name__}")
    ids = batch["input_ids"]
    ids = ids[None] if ids.dim() == 1 else ids
    found = {"input_ids": ids, "attention_mask": batch.get("attention_mask")}
    if found["attention_mask"] is None:
        found["attention_mask"] = torch.ones_like(ids)
    if batch.get("labels") is not None:
        found["labels"] = batch["labels"]
    return found


def take(calibration, count: int, method: str):
    """The first `count` batches of `calibration` (an iterable, endless or not), as `as_inputs`
    dicts, refusing none at all with what to give."""
    if calibration is None:
        raise UserError(f"{method} initialises from the model's activations on data: give calibration batches "
                        f"(Python: prepare(model, spec, calibration=batches); train, compare and bench use the training data)")
    batches = [as_inputs(b, method) for b in itertools.islice(iter(calibration), count)]
    if not batches:
        raise UserError(f"{method}: the calibration data holds no batch")
    return batches


@torch.no_grad()
def run_hooked(model: nn.Module, layers: dict, batch: dict, seen, run: nn.Module | None = None) -> None:
    """One forward pass of `batch` with `seen(path, x, keep)` called with the input of each
    layer in `layers` ({path: module}): x (b, t, n), keep (b, t) bool = the tokens that count
    (attention mask, and labels ≠ -100 where labels are given, as peft's EVA). The model runs
    in eval mode (no dropout) and goes back to its mode after. `run`: the module called (the
    model; the int8 base runs `model.base_model`, the decoder without the output layer)."""
    device = next(model.parameters()).device
    mask = batch["attention_mask"].to(device).bool()
    keep = mask & (batch["labels"].to(device) != -100) if "labels" in batch else mask

    def hook_for(path):
        def pre(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            extra = x.shape[1] - keep.shape[1]  # virtual tokens an earlier step put in front (prompt tuning)
            seen(path, x, torch.cat([keep.new_ones(keep.shape[0], extra), keep], 1) if extra > 0 else keep)
        return pre

    handles = [layer.register_forward_pre_hook(hook_for(path), with_kwargs=True) for path, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        (run or model)(input_ids=batch["input_ids"].to(device), attention_mask=mask.long())
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

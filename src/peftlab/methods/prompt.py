"""Prompt tuning: k trainable input embeddings P ∈ R^{k×d} in front of every sequence.

    X' = [P; E(x)]   (labels get -100 for the k virtual positions; logits keep them)

Trainable: k·d. `init=random | vocabulary | text` (text: the embeddings of `text`, cycled).
"""

import torch
import torch.nn as nn

from ..errors import UserError
from ..spec import Option, Step
from .registry import PeftCodec, peft_fields, register
from .attach import attach
from .protocol import Added
from .virtual import MARK, cache_of, call_inputs, check_room, check_tokens, is_fresh, shift, the_active


class PromptEmbedding(Added):
    """k virtual token embeddings, (k, d)."""

    slot = "prompt"
    label = "prompt tuning"
    peft_keys = {"weight": "prompt_embeddings"}

    def __init__(self, k: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(k, d))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch, -1, -1)  # (B, k, d)


def prompt_hook(model, args, kwargs):
    prompt = the_active(model, PromptEmbedding.slot)
    if prompt is None:
        return args, kwargs
    k = prompt.weight.shape[0]
    args, batch, length, device = call_inputs(args, kwargs)
    cache = cache_of(kwargs)
    if is_fresh(kwargs):
        check_room(model, "prompt", k, length)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = model.get_input_embeddings()(kwargs["input_ids"])
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = torch.cat([prompt(batch).to(embeds.dtype), embeds], dim=1)
        labels = kwargs.get("labels")
        if labels is not None:
            kwargs["labels"] = torch.cat([labels.new_full((batch, k), -100), labels], dim=1)
        shift(kwargs, k, batch, length, device, prepend_positions=True)
        if cache is not None:
            setattr(cache, MARK, k)
    elif getattr(cache, MARK, 0):
        shift(kwargs, k, batch, length, device, prepend_positions=False)
    return args, kwargs


def to_peft(model, step: Step, hosts: dict) -> dict:
    weight = next(iter(hosts.values())).weight
    c = model.config
    return {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": weight.shape[0], "token_dim": weight.shape[1],
            "num_transformer_submodules": 1, "num_attention_heads": c.num_attention_heads,
            "num_layers": c.num_hidden_layers, "prompt_tuning_init": "RANDOM"}


def from_peft(config: dict, where) -> Step:
    return Step("prompt", {"tokens": config["num_virtual_tokens"], "init": "random"})


@register(
    "prompt", examples=("prompt:tokens=4",), peft=PeftCodec("PROMPT_TUNING", to_peft, from_peft, fields=peft_fields(
        "num_virtual_tokens token_dim num_transformer_submodules num_attention_heads num_layers modules_to_save",
        "prompt_tuning_init prompt_tuning_init_text tokenizer_name_or_path tokenizer_kwargs")),
    tokens=Option(20, "int", help="number of virtual tokens k", low=1),
    init=Option("vocabulary", "choice", ("random", "vocabulary", "text")),
    text=Option("Write in the style of the training text.", help="init text for init=text"),
    name=Option("default"),
    seed=Option(0, "int", low=0),
)
def prompt(model, tokens, init, text, name, seed, tokenizer=None):
    """k trainable input embeddings prepended to every sequence."""
    if tokens <= 0:
        raise UserError(f"prompt: tokens must be positive, got {tokens}")
    check_tokens(model, "prompt", tokens)
    table = model.get_input_embeddings().weight  # (V, d)
    p = PromptEmbedding(tokens, table.shape[1]).to(table.device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if init == "random":
            p.weight.normal_(0, float(table.float().std()), generator=gen)
        elif init == "vocabulary":  # embeddings of random real tokens (vocabulary init)
            p.weight.copy_(table[torch.randint(0, table.shape[0], (tokens,), generator=gen)].float())
        else:
            if tokenizer is None:
                raise UserError("prompt: init=text needs the model's tokenizer; use init=vocabulary here")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise UserError("prompt: init=text needs a non-empty text")
            ids = (ids * (tokens // len(ids) + 1))[:tokens]
            p.weight.copy_(table[torch.tensor(ids)].float())
    attach(model, name, p, prompt_hook, pre=True)

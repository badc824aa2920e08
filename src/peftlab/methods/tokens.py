"""Trainable tokens: only chosen rows of an embedding train (peft's TrainableTokens).

    E'[v] = T[j]  when v = ids[j],  else E[v]        T ∈ R^{n×d}, n = len(ids), init T = E[ids]

The layer's output for a chosen id is the trained row (times the layer's `embed_scale`, as
Gemma's scaled embedding does): a replacement, not an addition, as in peft. Init copies the
current rows, so the model starts exactly at its base. Trainable: n·d.

Tied output layer (GPT-2, GPT-Neo, Gemma 3: lm_head.weight *is* the embedding's weight): as
peft does, the output layer follows the same rows. Its logits for the chosen ids become
h·T[j]ᵀ (+ bias), through a `TiedRows` module on lm_head that holds no tensor of its own.

Merging writes T into E's rows (so into a tied lm_head too) and keeps the replaced rows for
`unmerge`. The effective ΔW (tracking) is (V, d), zero except rows ids: T − E[ids].

peft's format: alone, peft_type TRAINABLE_TOKENS with `token_indices` and `target_modules`,
tensor base_model.model.<embedding>.trainable_tokens_delta (and the same tensor again under
lm_head when tied); inside a LoRA config as `trainable_token_indices` (a list: the input
embedding; a dict: {layer: ids}), tensor <embedding>.token_adapter.trainable_tokens_delta.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..spec import Option, Step, user_regex
from .attach import attach, base_modules
from .protocol import Added
from .registry import PeftCodec, peft_fields, register

SUFFIX = "trainable_tokens_delta"
TIED = "tied:"  # peft_tensors() key prefix of the copy saved under a tied output layer


class TokenRows(Added):
    """The trained rows T (n, d) of one embedding, for token ids `ids` (n,)."""

    slot = "tokens"
    label = "trainable tokens"
    peft_keys = {"delta": SUFFIX}

    def __init__(self, ids: list, rows: torch.Tensor, vocab: int):
        super().__init__()
        self.delta = nn.Parameter(rows.detach().clone().float())  # (n, d), init E[ids]
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)  # (n,)
        position = torch.full((vocab,), -1, dtype=torch.long)  # (V,) id -> row of T, or -1
        position[self.ids] = torch.arange(len(ids))
        self.register_buffer("position", position, persistent=False)
        self.tied_paths = []  # output layers that follow these rows (set by `tokens`)
        self._replaced = None  # E[ids] while merged

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        # x: (...) token ids; base_out: (..., d) = E[x] (· embed_scale)
        j = self.position[x]  # (...)
        rows = self.delta[j.clamp(min=0)].to(base_out.dtype)  # (..., d)
        scale = getattr(layer, "embed_scale", None)  # Gemma's scaled embedding multiplies its output
        if scale is not None:
            rows = rows * scale.to(base_out.dtype)
        return torch.where((j >= 0)[..., None], rows, base_out)

    def delta_weight(self, layer: nn.Module) -> torch.Tensor:
        """(V, d): T − E[ids] on rows ids, zero elsewhere (read against the unmerged weight)."""
        w = layer.weight.float()
        return torch.zeros_like(w).index_copy(0, self.ids, self.delta.float() - w[self.ids])

    def merge(self, layer: nn.Module) -> None:
        self._replaced = layer.weight[self.ids].detach().clone()
        layer.weight.data.index_copy_(0, self.ids, self.delta.detach().to(layer.weight.dtype))

    def unmerge(self, layer: nn.Module) -> None:
        layer.weight.data.index_copy_(0, self.ids, self._replaced)
        self._replaced = None

    def peft_tensors(self) -> dict:
        # peft saves a standalone adapter's rows a second time under each tied output layer
        # (inside LoRA it does not: `tensor_name` drops those keys there).
        return {SUFFIX: self.delta} | {TIED + path: self.delta for path in self.tied_paths}


class TiedRows(Added):
    """The output layer tied to an embedding: logits of the chosen ids use the trained rows,
    h·T[j]ᵀ (+ b). Holds no tensor: it reads its `TokenRows` (kept out of the module tree so
    that T is counted, saved and tracked once)."""

    slot = "tokens"
    label = "trainable tokens"

    def __init__(self, source: TokenRows):
        super().__init__()
        self._source = [source]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        # x: (..., d) hidden states; base_out: (..., V) logits
        src = self._source[0]
        chosen = F.linear(x, src.delta.to(x.dtype))  # (..., n)
        if getattr(layer, "bias", None) is not None:
            chosen = chosen + layer.bias[src.ids].to(x.dtype)
        return base_out.index_copy(-1, src.ids, chosen.to(base_out.dtype))

    def head_weight(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (V, d) with rows ids replaced by T: the head as a loss that multiplies
        hidden states by the weight itself sees it (loss.py's chunked head skips hooks)."""
        return weight.index_copy(0, self._source[0].ids, self._source[0].delta.to(weight.dtype))

    def merge(self, layer: nn.Module) -> None:
        pass  # the weight is the embedding's: its TokenRows writes the rows

    def unmerge(self, layer: nn.Module) -> None:
        pass


def _embedding(model, layer: str) -> tuple[str, nn.Embedding]:
    """(path, module) of the embedding `layer` names: 'embed' (the input embedding), a leaf
    name or path (peft's rule: the path ends with it after a dot), or a regex over paths."""
    modules = base_modules(model)
    if layer == "embed":
        emb = model.get_input_embeddings()
        return next(p for p, m in modules.items() if m is emb), emb
    hits = [p for p in modules if p == layer or p.endswith("." + layer)]
    if not hits:
        try:  # not a name: a regex over paths, matched in full (peft's rule for a string)
            rx = user_regex(layer, "tokens: layer")
        except UserError:
            rx = None  # not a usable regex either: it names no module (said below)
        hits = [p for p in modules if rx is not None and rx.fullmatch(p)]
    embeddings = sorted(p for p, m in modules.items() if isinstance(m, nn.Embedding))
    if len(hits) != 1 or not isinstance(modules[hits[0]], nn.Embedding):
        what = "names no module" if not hits else (f"names {len(hits)} modules" if len(hits) > 1 else "is not an embedding")
        raise UserError(f"tokens: layer={layer} {what}; embeddings here: embed (the input embedding), {', '.join(embeddings)}")
    return hits[0], modules[hits[0]]


def _ids(values, vocab: int) -> list:
    try:
        ids = [int(v) for v in values]
    except ValueError:
        raise UserError(f"tokens: ids must be token ids (integers) joined with +, got {'+'.join(map(str, values))}") from None
    if not ids:
        raise UserError("tokens: give the token ids to train, e.g. tokens:ids=5+17+200")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise UserError(f"tokens: id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    if len(set(ids)) != len(ids):
        raise UserError(f"tokens: id {next(i for i in ids if ids.count(i) > 1)} is given twice")
    return ids


# ---- peft's TrainableTokensConfig, and trainable_token_indices inside a LoraConfig ----------

def _rows_of(hosts: dict) -> tuple[str, TokenRows]:
    return next((h, c) for h, c in hosts.items() if isinstance(c, TokenRows))


def to_peft(model, step: Step, hosts: dict) -> dict:
    path, rows = _rows_of(hosts)
    return {"peft_type": "TRAINABLE_TOKENS", "token_indices": rows.ids.tolist(), "target_modules": [path],
            "init_weights": True}


def inside(model, step: Step, hosts: dict) -> dict:
    path, rows = _rows_of(hosts)
    ids = rows.ids.tolist()
    is_input = model.get_submodule(path) is model.get_input_embeddings()
    return {"trainable_token_indices": ids if is_input else {path: ids}}


def _step(ids, layer, where) -> Step:
    if not ids:
        raise UserError(f"{where}: trainable token indices are empty")
    try:
        ids = tuple(int(i) for i in ids)
    except (TypeError, ValueError):
        raise UserError(f"{where}: trainable token indices must be integers, got {ids!r}") from None
    return Step("tokens", {"ids": ids} | ({} if layer == "embed" else {"layer": layer}))


def _layer(name, where) -> str:
    if "," in name or "+" in name or "/" in name:
        raise UserError(f"{where}: layer {name!r} holds ',', '+' or '/', which a peftlab strategy cannot carry")
    return name


def from_peft(config: dict, where) -> Step:
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):
        if len(targets) != 1:
            raise UserError(f"{where}: target_modules {targets!r}: peftlab trains the tokens of one embedding per step")
        targets = targets[0]
    return _step(config.get("token_indices") or [], "embed" if targets is None else _layer(targets, where), where)


def read_inside(config: dict, where):
    chosen = config.get("trainable_token_indices")
    if chosen is None:
        return None
    if isinstance(chosen, dict):
        if len(chosen) != 1:
            raise UserError(f"{where}: trainable_token_indices names {len(chosen)} layers; peftlab reads one "
                            "(a tied lm_head follows the input embedding by itself)")
        layer, ids = next(iter(chosen.items()))
        return _step(ids, _layer(layer, where), where)
    return _step(chosen, "embed", where)


def tensor_name(host: str, suffix: str, alone: bool) -> str:
    """peft's key: <host>.trainable_tokens_delta alone, <host>.token_adapter.… inside LoRA,
    where a tied layer has no key of its own (see TokenRows.peft_tensors)."""
    if suffix.startswith(TIED):
        return f"base_model.model.{suffix[len(TIED):]}.{SUFFIX}" if alone else None
    return f"base_model.model.{host}.{suffix}" if alone else f"base_model.model.{host}.token_adapter.{suffix}"


@register(
    "tokens", examples=("tokens:ids=68+220+83", "lora:r=2/tokens:ids=68"), peft=PeftCodec("TRAINABLE_TOKENS", to_peft, from_peft, inside=inside, read_inside=read_inside,
                             tensor_name=tensor_name,
                             fields=peft_fields("token_indices target_modules init_weights trainable_token_indices")),
    ids=Option((), "list", help="token ids whose embedding rows train, joined with +"),
    layer=Option("embed", help="embed (the input embedding), or an embedding's name or path"),
    name=Option("default", help="adapter name"),
    seed=Option(0, "int", low=0),
)
def tokens(model, ids, layer, name, seed):
    """Train only chosen rows of an embedding (a tied lm_head follows them)."""
    path, emb = _embedding(model, layer)
    ids = _ids(ids, emb.num_embeddings)
    rows = TokenRows(ids, emb.weight[torch.tensor(ids)], emb.num_embeddings).to(emb.weight.device)
    attach(emb, name, rows)
    out = model.get_output_embeddings()
    if emb is model.get_input_embeddings() and out is not None and out.weight is emb.weight:
        out_path = next(p for p, m in model.named_modules() if m is out)
        rows.tied_paths.append(out_path)
        attach(out, name, TiedRows(rows))

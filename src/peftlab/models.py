"""One loader for every way of naming a model.

`M` may be a built-in alias (`smollm2-135m`, `gemma3-270m`, `tiny-*`, `gptneo-125m-shape`),
a `.gguf` file, a local Hugging Face folder, or a hub id (where the Hub is reachable).
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import assets, tiny
from .errors import UserError
from .files import atomic_dir

REAL = {"smollm2-135m": False, "gemma3-270m": True}  # alias -> tokenizer lacks <bos>
# The same weights upstream, for artifacts that other tools must resolve (peft's
# AutoPeftModelForCausalLM reads base_model_name_or_path).
UPSTREAM = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}
ALIASES = tuple(REAL) + tiny.TINY


@dataclass
class Loaded:
    """A model, its tokenizer, and how to feed it."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    add_bos: bool = False  # prepend the BOS token ourselves (Gemma's GGUF tokenizer does not)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        return [bos] + ids if self.add_bos and bos is not None else ids


def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _from_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(path.parent, **kw)
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"could not load GGUF file {path}: {str(e).splitlines()[0][:200]}") from None
    # transformers de-quantises GGUF tensors to fp32 on load but still marks the model as
    # quantized, which blocks save_pretrained; the weights are plain fp32, so drop the mark.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def _from_folder(folder, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, **kw)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model '{folder}': {first}") from None
    return model, tok


def _real(name: str):
    """Load a registry-shipped GGUF model; the first load also keeps a dequantized HF copy.

    GGUF de-quantisation takes ~20 s on two cores; the safetensors copy loads in ~1 s.
    """
    gguf = assets.asset_path(name)
    converted = gguf.parent / "hf"
    if (converted / "config.json").exists():
        return _from_folder(converted)
    model, tok = _from_gguf(gguf)
    with atomic_dir(converted) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return model, tok


def load(spec: str, seed: int = 0) -> Loaded:
    """Load model `spec` in fp32 on the CPU; see the module docstring for what `spec` may be."""
    _quiet()
    spec = str(spec)
    if spec in tiny.TINY:
        return Loaded(tiny.tiny_model(spec, seed), tiny.byte_tokenizer(), spec)
    if spec in REAL:
        model, tok = _real(spec)
        return Loaded(model.eval(), tok, spec, add_bos=REAL[spec])
    path = Path(os.path.expanduser(spec))
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        model, tok = _from_gguf(path)
        return Loaded(model.eval(), tok, spec)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path} is a folder but not a Hugging Face model (no config.json)")
        model, tok = _from_folder(path)
        return Loaded(model.eval(), tok, spec)
    if spec.count("/") == 1 and not path.exists() and not spec.startswith((".", "/", "~")):
        model, tok = _from_folder(spec)  # a hub id
        return Loaded(model.eval(), tok, spec)
    raise UserError(
        f"unknown model '{spec}': give a built-in alias ({', '.join(ALIASES)}), "
        "a .gguf file, a local Hugging Face folder, or a hub id"
    )


def reference(spec: str) -> str:
    """The name by which tools outside peftlab find the base `spec`: the upstream hub id of a
    packaged alias, the absolute path of a local folder or file, a hub id as given. (Tiny
    test models have no such name; their alias is kept.)"""
    spec = str(spec)
    if spec in UPSTREAM:
        return UPSTREAM[spec]
    path = Path(os.path.expanduser(spec))
    return str(path.resolve()) if spec not in tiny.TINY and path.exists() else spec

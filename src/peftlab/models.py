"""One loader for every way of naming a model.

`M` may be a built-in alias (`smollm2-135m`, `gemma3-270m`, `tiny-*`, `gptneo-125m-shape`),
a `.gguf` file, a local Hugging Face folder, or a hub id (where the Hub is reachable).

Files are checked before transformers reads them, so a damaged or foreign file is one line
(UserError) rather than the reader's struct or header error: a GGUF file's header is walked and
every tensor must lie inside the file; a folder's config.json must name a causal model_type
that transformers knows, its tokenizer files must be there, and each safetensors file must hold
as many bytes as its header promises.
"""

import json
import logging
import mmap
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from . import assets, tiny
from .records import json_kind, shown
from .errors import UserError, close_matches, warn
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _from_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    kw = dict(gguf_file=path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(path.parent, **kw)
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"could not load GGUF file {path}: {_first_line(e)}") from None
    # transformers de-quantises GGUF tensors to fp32 on load but still marks the model as
    # quantized, which blocks save_pretrained; the weights are plain fp32, so drop the mark.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


# GGUF metadata value types of fixed width (u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64); 8 is a
# string, 9 an array.
_GGUF_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
# ggml tensor types: (elements per block, bytes per block), to check that every tensor fits the file.
_GGML_BLOCK = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
               10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
               16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
               22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
               29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66)}
_AGAIN = "download or copy it again"


class _Cut(Exception):
    """The GGUF header runs past the end of the file (args[0]: the bytes it needs)."""


def check_gguf(path: Path) -> None:
    """Walk a GGUF file's header (magic, version, metadata, tensor table) and check that every
    tensor's bytes lie inside the file; a foreign, cut or damaged file is one UserError."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            what = "it is empty" if size == 0 else "it does not start with the bytes 'GGUF'"
            raise UserError(f"{path} is not a GGUF file ({what}); give a .gguf model file, a Hugging Face folder "
                            "or a built-in alias")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            try:
                data, tensors = _gguf_table(path, blob, size)
            except _Cut as cut:
                if cut.args[0] > 2 * size + (1 << 20):  # a count or length no GGUF writer would give
                    raise UserError(f"{path} is damaged or truncated: its GGUF header runs past the end of the file "
                                    f"({size:,} bytes); {_AGAIN}") from None
                raise UserError(f"{path} is truncated: its GGUF header needs at least {cut.args[0]:,} bytes but the "
                                f"file has {size:,}; {_AGAIN}") from None
    for name, shape, kind, offset in tensors:
        per, nbytes = _GGML_BLOCK.get(kind, (1, 0))  # a type not listed here: only its start is checked
        end = data + offset + prod(shape) // per * nbytes
        if end > size:
            raise UserError(f"{path} is truncated: tensor '{shown(name)}' ends at byte {end:,} but the file has {size:,} "
                            f"bytes; {_AGAIN}")


def _gguf_table(path: Path, blob, size: int):
    """(start of the tensor data, [(name, shape, ggml type, offset)]) of a GGUF file whose first
    four bytes are 'GGUF'; _Cut where the header runs past the end of the file."""
    pos = 4

    def take(fmt):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise _Cut(pos + n)
        pos += n
        return struct.unpack_from(fmt, blob, pos - n)

    def skip(n):
        nonlocal pos
        if pos + n > size:
            raise _Cut(pos + n)
        pos += n

    def string() -> str:
        (n,) = take("<Q")
        skip(n)
        return blob[pos - n : pos].decode("utf-8", errors="replace")

    (version,) = take("<I")
    if version not in (2, 3):
        raise UserError(f"{path}: GGUF version {version}; peftlab reads versions 2 and 3 "
                        f"(a damaged file can show any number: {_AGAIN})")
    n_tensors, n_kv = take("<QQ")
    alignment = 32
    for _ in range(n_kv):
        key = string()
        (kind,) = take("<I")
        if kind == 9:  # an array
            element, count = take("<IQ")
            if element == 8:
                for _ in range(count):
                    string()
            elif element in _GGUF_WIDTH:
                skip(count * _GGUF_WIDTH[element])
            else:
                raise UserError(f"{path} is damaged: metadata '{shown(key)}' is an array of unknown type {element}; {_AGAIN}")
        elif kind == 8:
            string()
        elif kind in _GGUF_WIDTH:
            skip(_GGUF_WIDTH[kind])
            if key == "general.alignment" and kind == 4:
                (alignment,) = struct.unpack_from("<I", blob, pos - 4)
        else:
            raise UserError(f"{path} is damaged: metadata '{shown(key)}' has unknown type {kind}; {_AGAIN}")
    if alignment <= 0:
        raise UserError(f"{path} is damaged: general.alignment is {alignment}; {_AGAIN}")
    tensors = []
    for _ in range(n_tensors):
        name = string()
        (dims,) = take("<I")
        if dims > 8:
            raise UserError(f"{path} is damaged: tensor '{shown(name)}' has {dims} dimensions; {_AGAIN}")
        shape = take(f"<{dims}Q")
        kind, offset = take("<IQ")
        tensors.append((name, shape, kind, offset))
    return (pos + alignment - 1) // alignment * alignment, tensors


# Files a Hugging Face tokenizer is read from; a model folder needs at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken", "tiktoken.model", "vocab.model")


def check_folder(path: Path) -> None:
    """A local model folder, checked before transformers reads it: config.json names a causal
    model_type transformers knows, tokenizer files are there, safetensors files are whole."""
    from transformers import __version__ as version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise UserError(f"{config_file} is not UTF-8 text; a model's config.json is the JSON save_pretrained writes") from None
    except RecursionError:
        raise UserError(f"{config_file} is JSON nested too deeply to read; save the model again") from None
    except ValueError as e:
        raise UserError(f"{config_file} is not valid JSON ({getattr(e, 'msg', None) or _first_line(e)}); "
                        "save the model again") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not model_type:
        held = ("an empty object" if config == {} else f"keys {', '.join(map(shown, list(config)[:6]))}"
                if isinstance(config, dict) else f"{json_kind(config)}, not an object")
        raise UserError(f"{config_file} names no model_type (it holds {held}); a model's config.json names its "
                        "architecture, e.g. \"model_type\": \"llama\"")
    if model_type not in CONFIG_MAPPING_NAMES:
        near = close_matches(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        raise UserError(f"{config_file}: unknown model_type '{shown(model_type)}'{near}; "
                        f"transformers {version} does not know this architecture")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{config_file}: model_type '{shown(model_type)}' is not a causal language model; peftlab fine-tunes "
                        "causal LMs (e.g. llama, gemma3_text, gpt2, gpt_neo)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); save the tokenizer "
                        "into the folder too (tokenizer.save_pretrained)")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights)


def check_safetensors(path: Path) -> None:
    """A safetensors file holds its 8-byte header length, the JSON header, and every tensor the
    header lists; one UserError when it is cut short or its header is damaged."""
    size = path.stat().st_size
    again = "save or copy the model again"
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else size
        if n > size - 8:
            raise UserError(f"{path} is truncated: {size:,} bytes, fewer than its safetensors header needs; {again}")
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            end = int(end)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
            raise UserError(f"{path} is not a readable safetensors file (its header is damaged); {again}") from None
    if 8 + n + end > size:
        raise UserError(f"{path} is truncated: its header lists {8 + n + end:,} bytes but the file has {size:,}; {again}")


def _from_folder(folder, **kw):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(folder).is_dir()
    if local:
        check_folder(Path(folder))
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kw)
    except OSError as e:
        raise UserError(f"could not load model '{folder}': {_first_line(e)}") from None
    except ValueError as e:  # a local folder whose tokenizer files transformers cannot build a tokenizer from
        if not local:
            raise
        raise UserError(f"could not load the tokenizer in {folder}: {_first_line(e)}") from None
    try:  # mismatched sizes are reported below, as one line, instead of transformers' RuntimeError
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **kw)
    except OSError as e:
        raise UserError(f"could not load model '{folder}': {_first_line(e)}") from None
    except SafetensorError as e:
        raise UserError(f"could not read the weights in {folder} ({_first_line(e)}); save or copy the model again") from None
    # Weights that do not fit the config would be initialised at random: a model that runs and knows nothing.
    again = "save the model and its config.json together again"
    if info.get("mismatched_keys"):
        mismatched = sorted(info["mismatched_keys"], key=lambda m: m[0])
        name, stored, wanted = mismatched[0]
        raise UserError(f"{folder}: the weights do not fit config.json: {name} is {tuple(stored)} in the weights but "
                        f"{tuple(wanted)} by the config ({len(mismatched)} tensors differ); {again}")
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise UserError(f"{folder}: the weights lack {len(missing)} tensors config.json asks for (e.g. {missing[0]}); {again}")
    return model, tok


def _real(name: str):
    """Load a registry-shipped GGUF model; the first load also keeps a dequantized HF copy.

    GGUF de-quantisation takes ~20 s on two cores; the safetensors copy loads in ~1 s. A
    damaged copy is made again; where the cache cannot be written, the model still loads (from
    the GGUF file, every time) and one warning says so.
    """
    gguf = assets.asset_path(name)
    converted = gguf.parent / "hf"
    if (converted / "config.json").exists():
        try:
            return _from_folder(converted)
        except UserError:
            warn(f"the converted copy of {name} in {converted} is damaged; converting it again")
    model, tok = _from_gguf(gguf)
    try:
        with atomic_dir(converted) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except OSError as e:
        warn(f"could not keep a converted copy of {name} in {converted.parent} ({e.strerror or e}); "
             "it is converted from the GGUF file on every load")
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
        if not (path / "config.json").is_file():
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


def _rope_factor(config, limit: int) -> float:
    """How far the config's rope scaling stretches positions past `limit` (1.0: not at all).
    Linear, dynamic and YaRN scaling multiply the trained length by `factor` where the config's
    max_position_embeddings is still the original length; llama3 and longrope configs already
    give the stretched length as max_position_embeddings."""
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(scaling, dict):
        return 1.0
    ropes = [scaling] if ("rope_type" in scaling or "type" in scaling) else [v for v in scaling.values() if isinstance(v, dict)]
    factor = 1.0
    for rope in ropes:
        original, f = rope.get("original_max_position_embeddings"), rope.get("factor")
        if rope.get("rope_type", rope.get("type")) in ("linear", "dynamic", "yarn") and isinstance(f, (int, float)) \
                and (not isinstance(original, int) or original >= limit):
            factor = max(factor, float(f))
    return factor


def max_positions(model) -> int | None:
    """How many positions `model` (a Loaded, a module or a config) takes, from its config:
    max_position_embeddings / n_positions / n_ctx (times the rope scaling factor, see
    _rope_factor). None where the config names no bound (recurrent and state-space models).

    Learned position embeddings (GPT-2, GPT-Neo) have no row past the bound; rotary models
    (Llama, Gemma) run past it but were never trained there, so both are bounded."""
    module = getattr(model, "model", model)
    config = getattr(module, "config", module)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        limit = getattr(config, key, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return int(limit * _rope_factor(config, limit))
    return None


def check_positions(model, n: int, what: str, fix: str | None = None) -> None:
    """One UserError when `n` positions are more than `model` takes (max_positions), e.g.
    "--seq-len 1024 is more than tiny-gpt2's 512 positions; use --seq-len 512 or less";
    `fix` replaces the part after the semicolon."""
    limit = max_positions(model)
    if limit is None or n <= limit:
        return
    module = getattr(model, "model", model)
    config = getattr(module, "config", module)
    name = getattr(model, "name", None) or getattr(config, "name_or_path", None) or getattr(config, "model_type", None) \
        or "the model"
    raise UserError(f"{what} {n} is more than {name}'s {limit:,} positions; {fix or f'use {what} {limit} or less'}")


def reference(spec: str) -> str:
    """The name by which tools outside peftlab find the base `spec`: the upstream hub id of a
    packaged alias, the absolute path of a local folder or file, a hub id as given. (Tiny
    test models have no such name; their alias is kept.)"""
    spec = str(spec)
    if spec in UPSTREAM:
        return UPSTREAM[spec]
    path = Path(os.path.expanduser(spec))
    return str(path.resolve()) if spec not in tiny.TINY and path.exists() else spec

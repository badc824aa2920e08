"""Hugging Face PEFT's folder format, for the methods it can express: LoRA (rsLoRA, DoRA),
prompt tuning and prefix tuning.

    adapter_config.json         peft_type, task_type, r, lora_alpha, target_modules, ...
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight / lora_B.weight /
                                lora_magnitude_vector; prompt_embeddings for prompt and prefix

Folders written here load with `peft.PeftModel.from_pretrained`, and folders peft wrote load
here; both give the same logits.
"""

import re
from pathlib import Path

from ..errors import UserError
from ..methods import prepare
from ..methods.attach import attached
from ..methods.lora import linear_layers
from ..methods.prefix import kv_shape
from ..spec import Step
from .io import read_json, read_tensors, write_tensors

CONFIG = "adapter_config.json"
TENSORS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Keys peft 0.21 writes; anything else draws a warning and is ignored.
KNOWN = {
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path", "bias",
    "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config",
    "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core",
    "modules_to_save", "monteclora_config", "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern",
    "revision", "target_modules", "target_parameters", "task_type", "trainable_token_indices", "use_bdlora",
    "use_dora", "use_qalora", "use_rslora", "velora_config", "num_attention_heads", "num_layers",
    "num_transformer_submodules", "num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text",
    "tokenizer_kwargs", "tokenizer_name_or_path", "token_dim", "encoder_hidden_size", "init_weights",
    "prefix_projection",
}


def expressible(steps: list) -> str | None:
    """'lora' | 'prompt' | 'prefix' when peft's format holds this strategy exactly, else None."""
    if len(steps) != 1:
        return None
    s = steps[0]
    if s.method in ("lora", "dora") and s.options.get("init", "kaiming") != "pissa":
        return "lora"
    return s.method if s.method in ("prompt", "prefix") else None


def _lora_hosts(model, name):
    return {host_name: slot[name] for host_name, _, slot in attached(model, "lora") if name in slot}


def save(model, steps: list, folder: Path, name: str = "default", base_model: str = "") -> None:
    """Write `name`'s adapter in peft's layout into `folder` (the caller makes it atomic)."""
    kind = expressible(steps)
    from ..models import reference

    # Other tools resolve the base by this name; peftlab's own name for it rides in the
    # tensors file's metadata.
    common = {"base_model_name_or_path": reference(base_model) if base_model else None, "task_type": "CAUSAL_LM", "inference_mode": True,
              "revision": None, "modules_to_save": None, "auto_mapping": None}
    c = model.config
    if kind == "lora":
        hosts = _lora_hosts(model, name)
        first = next(iter(hosts.values()))
        leaves = sorted({h.rsplit(".", 1)[-1] for h in hosts})
        every = {n for n in linear_layers(model) if n.rsplit(".", 1)[-1] in leaves}
        targets = leaves if every == set(hosts) else "(" + "|".join(re.escape(h) for h in sorted(hosts)) + ")"
        rslora = steps[0].options.get("rslora", False)
        r = first.A.shape[0]
        config = common | {
            "peft_type": "LORA", "r": r, "lora_alpha": first.scaling * (r**0.5 if rslora else r),
            "target_modules": targets, "lora_dropout": first.dropout, "use_rslora": rslora,
            "use_dora": first.magnitude is not None, "fan_in_fan_out": c.model_type == "gpt2", "bias": "none",
            "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {},
        }
        tensors = {}
        for host, delta in hosts.items():
            tensors[f"{PREFIX}{host}.lora_A.weight"] = delta.A
            tensors[f"{PREFIX}{host}.lora_B.weight"] = delta.B
            if delta.magnitude is not None:
                tensors[f"{PREFIX}{host}.lora_magnitude_vector"] = delta.magnitude
    elif kind == "prompt":
        weight = model._modules["prompt"][name].weight
        config = common | {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": weight.shape[0], "token_dim": weight.shape[1],
                           "num_transformer_submodules": 1, "num_attention_heads": c.num_attention_heads,
                           "num_layers": c.num_hidden_layers, "prompt_tuning_init": "RANDOM"}
        tensors = {"prompt_embeddings": weight}
    elif kind == "prefix":
        prefix = model._modules["prefix"][name]
        kv_heads, head_dim = kv_shape(c)
        config = common | {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": prefix.k, "token_dim": kv_heads * head_dim,
                           "num_transformer_submodules": 1, "num_attention_heads": kv_heads,
                           "num_layers": c.num_hidden_layers, "encoder_hidden_size": kv_heads * head_dim,
                           "prefix_projection": False}
        tensors = {"prompt_embeddings": prefix.table()}
    else:
        raise ValueError("not expressible in peft's format")
    from ..files import write_json

    write_tensors(folder / TENSORS, {k: v.float() for k, v in tensors.items()},
                  metadata={"peftlab_base_model": base_model} if base_model else None)
    write_json(folder / CONFIG, config)


def spec_of(config: dict, where: Path) -> str:
    """The peftlab strategy equivalent to a peft adapter_config.json."""
    kind = config["peft_type"]
    if kind == "LORA":
        for key, default in (("bias", "none"), ("modules_to_save", None), ("rank_pattern", {}), ("alpha_pattern", {}),
                             ("use_qalora", False), ("lora_bias", False), ("trainable_token_indices", None),
                             ("layer_replication", None), ("target_parameters", None)):
            if config.get(key, default) not in (default, None, {}, False, "none"):
                raise UserError(f"{where}: peft option {key}={config[key]!r} is not supported by peftlab")
        options = {"r": config["r"], "alpha": config.get("lora_alpha", 8), "dropout": config.get("lora_dropout", 0.0),
                   "rslora": bool(config.get("use_rslora")), "dora": bool(config.get("use_dora"))}
        targets = config.get("target_modules")
        if isinstance(targets, str) and targets != "all-linear":
            options["target_regex"] = f"^({targets})$"
            options["targets"] = ()
        elif targets and any("." in t for t in targets):  # module paths: peft matches them as suffixes
            options["target_regex"] = r"(^|\.)(" + "|".join(re.escape(t) for t in targets) + ")$"
            options["targets"] = ()
        else:
            options["targets"] = ("all-linear",) if targets == "all-linear" else tuple(targets or ())
        layers = config.get("layers_to_transform")
        if layers is not None:
            layers = [layers] if isinstance(layers, int) else sorted(layers)
            if layers != list(range(layers[0], layers[-1] + 1)):
                raise UserError(f"{where}: layers_to_transform must be a contiguous range in peftlab, got {layers}")
            options["layers"] = f"{layers[0]}-{layers[-1]}"
        return str(Step("lora", options))
    if kind == "PROMPT_TUNING":
        return str(Step("prompt", {"tokens": config["num_virtual_tokens"], "init": "random"}))
    if kind == "PREFIX_TUNING":
        return str(Step("prefix", {"tokens": config["num_virtual_tokens"]}))
    raise UserError(f"{where}: peft_type {kind} is not supported; peftlab reads LORA, PROMPT_TUNING and PREFIX_TUNING")


def load(model, folder: Path, name: str = "default"):
    """Load a peft-format folder into `model` as adapter `name`; return `Prepared`."""
    folder = Path(folder)
    config = read_json(folder / CONFIG, required=("peft_type",), known=KNOWN)
    if config["peft_type"] == "LORA" and "r" not in config:
        raise UserError(f"{folder / CONFIG} lacks the required key 'r'")
    tensors = read_tensors(folder / TENSORS)
    spec = spec_of(config, folder / CONFIG)
    spec = spec.replace(":", f":name={name},", 1) if ":" in spec else f"{spec}:name={name}"
    prepared = prepare(model, spec)
    if config["peft_type"] == "LORA":
        wanted = {}
        for host, delta in _lora_hosts(model, name).items():
            wanted[f"{PREFIX}{host}.lora_A.weight"] = delta.A
            wanted[f"{PREFIX}{host}.lora_B.weight"] = delta.B
            if delta.magnitude is not None:
                wanted[f"{PREFIX}{host}.lora_magnitude_vector"] = delta.magnitude
        for key in list(tensors):  # older peft wrote the magnitude with a '.weight' suffix
            if key.endswith("lora_magnitude_vector.weight"):
                tensors[key[: -len(".weight")]] = tensors.pop(key)
    else:
        slot = "prompt" if config["peft_type"] == "PROMPT_TUNING" else "prefix"
        module = model._modules[slot][name]
        wanted = {"prompt_embeddings": module.weight if slot == "prompt" else module.prefix}
    for key, target in wanted.items():
        if key not in tensors:
            raise UserError(f"{folder / TENSORS} lacks tensor {key}")
        if tensors[key].shape != target.shape:
            raise UserError(f"{folder / TENSORS}: {key} has shape {tuple(tensors[key].shape)}, this base needs {tuple(target.shape)}")
        target.data.copy_(tensors[key].to(target.dtype))
    extra = sorted(set(tensors) - set(wanted))
    if extra:
        raise UserError(f"{folder / TENSORS}: tensor {extra[0]} has no place in this model; was it trained on another base?")
    return prepared

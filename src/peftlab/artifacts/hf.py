"""Hugging Face PEFT's folder format, for every method whose file declares a peft codec
(registry.PeftCodec): LoRA (rsLoRA, DoRA, rank/alpha patterns, lora_bias), prompt and
prefix tuning, and whatever other method files add.

    adapter_config.json         peft_type, task_type, and the method's own fields
    adapter_model.safetensors   base_model.model.<module>.<the added module's peft_keys>

Folders written here load with `peft.PeftModel.from_pretrained`, and folders peft wrote load
here; both give the same logits. This file never names a method: the codecs do.

The tensors file's metadata carries what peft has no field for: peftlab's name for the base
(`peftlab_base_model`) and the fingerprint of the base it was trained on
(`peftlab_base_fingerprint`, JSON; peft ignores it). Loading checks that fingerprint, refuses
NaN or Inf in the tensors or the config, and checks the type of every field the codecs read.
"""

import json
from pathlib import Path

from .. import fingerprint
from ..errors import UserError
from ..methods import REGISTRY, prepare
from ..methods.attach import attached
from ..methods.registry import companions, known_fields, peft_reader
from ..spec import Step
from .io import read_json, read_metadata, read_tensors, refuse_nonfinite, refuse_nonfinite_json, write_tensors

CONFIG = "adapter_config.json"
TENSORS = "adapter_model.safetensors"
PREFIX = "base_model.model."
FINGERPRINT = "peftlab_base_fingerprint"  # key in the tensors file's metadata
# Keys every peft config has; each codec declares its type's own (PeftCodec.fields), and any
# other key draws a warning and is ignored.
BASE_FIELDS = frozenset({"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                         "peft_version"})


def known() -> frozenset:
    return BASE_FIELDS | known_fields()


def _codec(step):
    return REGISTRY[step.method].peft


def expressible(steps: list, model) -> bool:
    """True when peft's format holds this strategy exactly: one method with a peft codec, or
    LoRA plus methods that ride inside its config (modules_to_save, trainable tokens)."""
    if any(_codec(s) is None for s in steps):
        return False
    if len(steps) == 1:
        return _codec(steps[0]).holds(steps[0], model)
    main = [s for s in steps if _codec(s).peft_type == "LORA" and _codec(s).holds(s, model)]
    return len(main) == 1 and all(_codec(s).holds(s, model, alone=False) for s in steps if s is not main[0])


def _main(steps: list):
    return steps[0] if len(steps) == 1 else next(s for s in steps if _codec(s).peft_type == "LORA")


def _hosts(model, name: str, step) -> dict:
    """{host path: added module} of adapter `name` that the step's method added."""
    return {host_name: slot[name] for host_name, _, slot in attached(model)
            if name in slot and slot[name].method == step.method}


def _tensor_name(codec, host: str, suffix: str, alone: bool) -> str:
    if codec.tensor_name is not None:
        return codec.tensor_name(host, suffix, alone)
    return f"{PREFIX}{host}.{suffix}" if host else suffix


def _tensors(model, steps, name) -> dict:
    """peft tensor name -> our tensor, for every step."""
    out = {}
    alone = len(steps) == 1
    for step in steps:
        codec = _codec(step)
        for host, child in _hosts(model, name, step).items():
            for suffix, t in child.peft_tensors().items():
                key = _tensor_name(codec, host, suffix, alone)
                if key is not None:
                    out[key] = t
    return out


def save(model, steps: list, folder: Path, name: str = "default", base_model: str = "") -> None:
    """Write `name`'s adapter in peft's layout into `folder` (the caller makes it atomic)."""
    if not expressible(steps, model):
        raise ValueError("not expressible in peft's format")
    from ..files import write_json
    from ..models import reference

    # Other tools resolve the base by this name; peftlab's own name for it rides in the
    # tensors file's metadata.
    config = {"base_model_name_or_path": reference(base_model) if base_model else None, "task_type": "CAUSAL_LM",
              "inference_mode": True, "revision": None, "modules_to_save": None, "auto_mapping": None}
    main = _main(steps)
    config |= _codec(main).write(model, main, _hosts(model, name, main))
    for step in steps:
        if step is not main:
            config = _merged(config, _codec(step).inside(model, step, _hosts(model, name, step)))
    tensors = _tensors(model, steps, name)
    metadata = {FINGERPRINT: json.dumps(fingerprint.of_base(model), separators=(",", ":"))}
    if base_model:
        metadata["peftlab_base_model"] = base_model
    # clones: one tensor may stand under two names (tied layers), which safetensors refuses
    write_tensors(folder / TENSORS, {k: v.detach().float().clone() for k, v in tensors.items()}, metadata=metadata)
    write_json(folder / CONFIG, config)


def _merged(config: dict, fields: dict) -> dict:
    """Fields of several companions (two `modules` steps...) join: lists add, dicts unite."""
    out = dict(config)
    for k, v in fields.items():
        old = out.get(k)
        if isinstance(old, list) and isinstance(v, list):
            out[k] = old + [x for x in v if x not in old]
        elif isinstance(old, dict) and isinstance(v, dict):
            out[k] = old | v
        else:
            out[k] = v
    return out


_INT = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
_NUMBER = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
# Fields the codecs read, with the type peft gives them: anything else is one error naming the key.
FIELDS = {
    "peft_type": (lambda v: isinstance(v, str), "a string such as \"LORA\""),
    "r": (lambda v: _INT(v) and v >= 0, "a non-negative integer"),
    "lora_alpha": (_NUMBER, "a number"),
    "alpha": (_NUMBER, "a number"),
    "lora_dropout": (_NUMBER, "a number"),
    "num_virtual_tokens": (lambda v: _INT(v) and v > 0, "a positive integer"),
    "target_modules": (lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v)),
                       "a regex string, \"all-linear\" or a list of module names"),
    "layers_to_transform": (lambda v: v is None or (_INT(v) and v >= 0) or (isinstance(v, list) and all(_INT(i) and i >= 0 for i in v)),
                            "a block index or a list of block indices"),
    "rank_pattern": (lambda v: v is None or (isinstance(v, dict) and all(_INT(r) and r > 0 for r in v.values())),
                     "an object mapping module patterns to positive integer ranks"),
    "alpha_pattern": (lambda v: v is None or (isinstance(v, dict) and all(_NUMBER(a) for a in v.values())),
                      "an object mapping module patterns to numbers"),
}


def check_fields(config: dict, where: Path, codec=None) -> None:
    """A field of the wrong type (target_modules: 5) is one error naming the file and the key
    (`codec`: the reading codec, whose `checks` replace these where its type differs)."""
    for key, (ok, expected) in (FIELDS | (codec.checks if codec else {})).items():
        if key in config and not ok(config[key]):
            raise UserError(f"{where}: {key} is {json.dumps(config[key])[:80]}; it should be {expected}")


def steps_of(config: dict, where: Path) -> list:
    """The peftlab steps equivalent to a peft adapter_config.json."""
    check_fields({"peft_type": config["peft_type"]}, where)
    kind = config["peft_type"]
    codec = peft_reader(kind)
    if codec is None:
        readable = sorted({m.peft.peft_type for m in REGISTRY.values() if m.peft and m.peft.read})
        raise UserError(f"{where}: peft_type {kind} is not supported; peftlab reads {', '.join(readable)}")
    check_fields(config, where, codec)
    steps = [codec.read(config, where)]
    for extra in companions():
        found = extra.read_inside(config, where)
        steps.extend([found] if isinstance(found, Step) else found or [])
    return steps


def base_fingerprint(path: Path) -> dict:
    """The base fingerprint in a tensors file's metadata ({} when it has none: peft wrote it)."""
    text = read_metadata(path).get(FINGERPRINT)
    if text is None:
        return {}
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: metadata {FINGERPRINT} is not valid JSON ({e})") from None
    refuse_nonfinite_json(path, saved, f"metadata {FINGERPRINT}")
    return fingerprint.checked(saved, path)


def load(model, folder: Path, name: str = "default", force_base: bool = False):
    """Load a peft-format folder into `model` as adapter `name`; return `Prepared`
    (`force_base`: a base other than the adapter's is a warning, not an error)."""
    folder = Path(folder)
    config = read_json(folder / CONFIG, required=("peft_type",), known=known())
    refuse_nonfinite_json(folder / CONFIG, config)
    tensors = read_tensors(folder / TENSORS)
    refuse_nonfinite(folder / TENSORS, tensors)
    try:
        steps = steps_of(config, folder / CONFIG)
    except KeyError as e:
        raise UserError(f"{folder / CONFIG} lacks the required key {e}") from None
    saved = base_fingerprint(folder / TENSORS)
    # a base of the same layout is checked before anything changes; one of another layout after
    # `prepare`, whose errors below say where the layouts part
    early = all(n in fingerprint.record(model) for n in saved)
    if early:
        fingerprint.check(model, saved, folder, force=force_base)
    steps = [Step(s.method, s.options | {"name": name}) if "name" in REGISTRY[s.method].options else s for s in steps]
    prepared = prepare(model, "/".join(map(str, steps)))
    for key in list(tensors):  # older peft wrote the magnitude with a '.weight' suffix
        if key.endswith("lora_magnitude_vector.weight"):
            tensors[key[: -len(".weight")]] = tensors.pop(key)
    wanted = _tensors(model, prepared.steps, name)
    for key, target in wanted.items():
        if key not in tensors:
            raise UserError(f"{folder / TENSORS} lacks tensor {key}")
        if tensors[key].shape != target.shape:
            raise UserError(f"{folder / TENSORS}: {key} has shape {tuple(tensors[key].shape)}, this base needs {tuple(target.shape)}")
    extra = sorted(set(tensors) - set(wanted))
    if extra:
        raise UserError(f"{folder / TENSORS}: tensor {extra[0]} has no place in this model; was it trained on another base?")
    if not early:
        fingerprint.check(model, saved, folder, force=force_base)  # taken before `prepare` changed anything
    for key, target in wanted.items():
        target.data.copy_(tensors[key].to(target.dtype))
    return prepared

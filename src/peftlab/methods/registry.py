"""The registry of methods. Each method file registers itself here by name with the options
it accepts (and, where HF peft has the method, its peft codec). `discover()` imports every
module of the `methods` package, so a new method is one new file: nothing lists it.
"""

import importlib
import pkgutil
from dataclasses import dataclass, field, replace

from ..spec import Option

REGISTRY: dict = {}


@dataclass(frozen=True)
class PeftCodec:
    """How a method's adapter reads and writes as HF peft's adapter_config.json.

    write(model, step, hosts) -> config fields   (hosts: {module path: added module}); None
                                                  when the method has no peft type of its own
    read(config, where) -> Step                  (None: this method only writes the type,
                                                  another reads it back, e.g. dora -> lora)
    accepts(step, model) -> bool                 (False: this variant, or this model, has no peft form)
    inside(model, step, hosts) -> config fields  riding inside a LoRA config (peft's
                                                  modules_to_save, trainable_token_indices)
    read_inside(config, where) -> [Step]         the same, read back ([] or None: not in this config)
    tensor_name(host, suffix, alone) -> str      (default: base_model.model.<host>.<suffix>;
                                                  None: this tensor is not in this layout)
    fields                                       the config keys peft's config class for this
                                                  type has (beyond every PeftConfig's own), so
                                                  a folder peft wrote reads without warnings
    checks                                       {key: (predicate, "what it should be")} for
                                                  keys whose type differs from hf.FIELDS'
    Tensors need no other code: each added module's `peft_keys` names them.
    """

    peft_type: str | None
    write: object = None
    read: object = None
    accepts: object = None
    inside: object = None
    read_inside: object = None
    tensor_name: object = None
    fields: frozenset = frozenset()
    checks: dict = field(default_factory=dict)

    def writer(self) -> "PeftCodec":
        return replace(self, read=None, read_inside=None)

    def holds(self, step, model, alone: bool = True) -> bool:
        able = self.write is not None if alone else self.inside is not None
        return able and (self.accepts is None or self.accepts(step, model))


@dataclass(frozen=True)
class Method:
    name: str
    apply: object
    options: dict
    doc: str
    peft: PeftCodec | None = None
    saved_as: dict | None = None  # options a saved adapter records instead (e.g. a folded prefix)
    examples: tuple = ()  # strategies that exercise it, the plainest first (`peftlab methods` shows it)
    exempt: dict = field(default_factory=dict)  # shared check or architecture -> why it does not apply


# What a method may be exempted from (the shared checks in tests/test_methods_common.py), or
# an architecture name: the method has no form there.
CHECKS = ("trains-its-own", "round-trip", "generation", "checkpointing")


def register(method_name: str, peft: PeftCodec | None = None, saved_as: dict | None = None, examples: tuple = (),
             exempt: dict | None = None, **options: Option):
    """Decorator: register `fn(model, **options)` as strategy `method_name`. `examples` are
    strategies using it (default: the method with its defaults); `exempt` names the shared
    checks (CHECKS) or architectures it opts out of, each with the reason."""

    def wrap(fn):
        REGISTRY[method_name] = Method(method_name, fn, options, (fn.__doc__ or "").strip().splitlines()[0], peft, saved_as,
                                       tuple(examples) or (method_name,), dict(exempt or {}))
        return fn

    return wrap


def resolved(step) -> dict:
    """The step's options with the method's defaults filled in."""
    return {k: o.default for k, o in REGISTRY[step.method].options.items()} | step.options


def discover() -> dict:
    """Import every module of the methods package once (each registers what it defines)."""
    from .. import methods

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"{methods.__name__}.{info.name}")
    return REGISTRY


def peft_reader(peft_type: str):
    """The codec that reads a peft_type, or None."""
    for m in discover().values():
        if m.peft is not None and m.peft.peft_type == peft_type and m.peft.read is not None:
            return m.peft
    return None


def peft_fields(*names: str) -> frozenset:
    """A codec's `fields` from space-separated lists of peft config keys."""
    return frozenset(k for n in names for k in n.split())


def known_fields() -> frozenset:
    """Every config key some codec declares."""
    return frozenset().union(*(m.peft.fields for m in discover().values() if m.peft is not None))


def companions() -> list:
    """Codecs that read what rides inside another method's peft config."""
    return [m.peft for m in discover().values() if m.peft is not None and m.peft.read_inside is not None]

"""The registry of methods: each method file registers itself here by name with the options it
accepts. A module of its own, so that method files import it and never the package that
imports them (no import cycle)."""

from dataclasses import dataclass

from ..spec import Option

REGISTRY: dict = {}


@dataclass(frozen=True)
class Method:
    name: str
    apply: object
    options: dict
    doc: str


def register(method_name: str, **options: Option):
    """Decorator: register `fn(model, **options)` as strategy `method_name`."""

    def wrap(fn):
        REGISTRY[method_name] = Method(method_name, fn, options, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return wrap

"""peftlab: parameter-efficient fine-tuning of causal language models.

    from peftlab import load_model, prepare, load_blocks, train, TrainConfig
    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "freeze:train=mlp+norm")
    blocks = load_blocks(loaded, "notes.txt", seq_len=64)
    train(loaded.model, blocks, prepared, TrainConfig(steps=30))
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each public name from its module, imported on first use: `peftlab --help`, `--version` and a
# command refused on its arguments then answer without loading torch and transformers.
_PUBLIC = {"load_model": ("models", "load"), "prepare": ("methods", "prepare"),
           "parse_strategy": ("methods", "parse_strategy"), "trainable_parameters": ("methods", "trainable_parameters"),
           "load_blocks": ("data", "load_blocks"), "train": ("loop", "train"), "TrainConfig": ("config", "TrainConfig"),
           "UserError": ("errors", "UserError")}
__all__ = ["load_model", "prepare", "parse_strategy", "trainable_parameters", "load_blocks", "train", "TrainConfig",
           "UserError"]  # = _PUBLIC's names


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
    module, attr = _PUBLIC[name]
    value = globals()[name] = getattr(import_module(f".{module}", __name__), attr)  # later lookups skip this
    return value


def __dir__():
    return sorted({*globals(), *_PUBLIC})


if TYPE_CHECKING:  # what editors and type checkers see
    from .config import TrainConfig
    from .data import load_blocks
    from .errors import UserError
    from .loop import train
    from .methods import parse_strategy, prepare, trainable_parameters
    from .models import load as load_model

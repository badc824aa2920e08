"""peftlab: parameter-efficient fine-tuning of causal language models.

    from peftlab import load_model, prepare, load_blocks, train, TrainConfig
    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "freeze:train=mlp+norm")
    blocks = load_blocks(loaded, "notes.txt", seq_len=64)
    train(loaded.model, blocks, prepared, TrainConfig(steps=30))
"""

from .data import load_blocks
from .errors import UserError
from .methods import parse_strategy, prepare, trainable_parameters
from .models import load as load_model
from .config import TrainConfig
from .train import train

__version__ = "0.1.0"
__all__ = ["load_model", "prepare", "parse_strategy", "trainable_parameters", "load_blocks", "train",
           "TrainConfig", "UserError"]

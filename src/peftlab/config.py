"""A training run's settings, in one dataclass that imports nothing heavy (the command line
reads its defaults before torch loads)."""

from dataclasses import asdict, dataclass


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 4  # rows per optimizer micro-batch, over all processes together
    seq_len: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of steps (or a step count if >= 1)
    grad_accum: int = 1
    clip: float = 1.0
    dtype: str = "fp32"
    device: str = "auto"
    seed: int = 0
    eval_every: int = 0  # 0: five evaluations over the run (every ceil(steps/5)); < 0: none (benchmarks)
    checkpoint_every: int = 0  # 0: checkpoints only when stopped by a signal
    keep_checkpoints: int = 2  # the newest K checkpoints are kept
    skip_nonfinite: bool = False  # skip a step whose loss or gradient is NaN/Inf instead of stopping
    fsdp: bool = False  # under torchrun: shard parameters with FSDP2 instead of replicating them (DDP)
    grad_checkpoint: bool = False  # recompute activations in backward: less memory, more time
    chunked_loss: bool = True  # never materialise the (B, T, V) fp32 logits (see loss.py)
    base_precision: str = "auto"  # float: frozen weights in `dtype`; int8: frozen linear layers in int8; auto: int8.choose
    master_weights: str = "fp32"  # fp32 | bf16-compensated: how trained weights and AdamW moments are kept (optim.py)
    compile: bool | None = None  # torch.compile each decoder block and the loss; None: when the run is long enough to pay


BASE_PRECISIONS = ("auto", "float", "int8")


def check_base_precision(name: str) -> None:
    from .errors import UserError

    if name not in BASE_PRECISIONS:
        raise UserError(f"--base-precision must be auto, float or int8, got '{name}'")


MASTER_WEIGHTS = ("fp32", "bf16-compensated")


def check_master_weights(name: str, bf16: bool) -> None:
    """`bf16`: does the run compute in bf16 (the only dtype compensated bf16 weights make sense with)?"""
    from .errors import UserError

    if name not in MASTER_WEIGHTS:
        raise UserError(f"--master-weights must be one of {', '.join(MASTER_WEIGHTS)}, got '{name}'")
    if name == "bf16-compensated" and not bf16:
        raise UserError("--master-weights bf16-compensated keeps trained weights in bf16: it needs --dtype bf16")


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)

"""One training run, step by step: load → prepare → fit → save. The command line, the
workbench's per-strategy worker and the benchmark all run through these four functions, so a
run means the same thing everywhere.

    r = run.load("smollm2-135m", "moby-dick", TrainConfig(steps=100, seq_len=256))
    run.prepare(r, "lora:r=8")
    records = run.fit(r, out="runs/a")
    run.save(r, "runs/a/adapter")
"""

from dataclasses import dataclass, field
from pathlib import Path

from . import artifacts, data, methods, models
from .errors import UserError
from .params import all_finite
from .progress import phase
from .config import TrainConfig
from .loop import train


@dataclass
class Run:
    """What a run holds: the loaded model and tokenizer, its data blocks, its strategy."""

    model_name: str
    data_name: str
    cfg: TrainConfig
    loaded: object  # models.Loaded
    blocks: object  # data.Blocks
    prepared: methods.Prepared | None = None
    records: list = field(default_factory=list)

    @property
    def model(self):
        return self.loaded.model


def load(model: str, data_name: str, cfg: TrainConfig, show: bool = True, **data_options) -> Run:
    """Load the base (seeded by cfg.seed) and cut `data_name` into cfg.seq_len blocks."""
    with phase(f"loading {model}", show):
        loaded = models.load(model, seed=cfg.seed)
    all_finite(loaded.model, f"model {model}")
    with phase(f"reading {data_name}", show):
        blocks = data.load_blocks(loaded, data_name, cfg.seq_len, **data_options)
    check_batch(blocks, cfg.batch_size, data_name)
    return Run(model, data_name, cfg, loaded, blocks)


def check_batch(blocks, batch_size: int, data_name: str) -> None:
    """A batch is drawn from the training blocks: more rows than there are blocks cannot be
    what the user meant (and would train smaller batches than run.json records)."""
    n = len(blocks.train_ids)
    if batch_size > n:
        raise UserError(f"--batch-size {batch_size} is more than the {n} training blocks of {data_name} at "
                        f"--seq-len {blocks.train_ids.shape[1]}; use --batch-size {n} or less, or give more data")


def prepare(r: Run, strategy: str) -> Run:
    """Apply strategy `strategy` to the run's model (freeze, add modules). An init from data
    (LoRA's init=eva|corda) reads the run's training batches, in the order training draws them."""
    calibration = r.blocks.batches(r.cfg.batch_size, r.cfg.seed)  # lazy: drawn only by a method that asks
    r.prepared = methods.prepare(r.loaded.model, strategy, r.loaded.tokenizer, calibration=calibration)
    return r


def fit(r: Run, out: Path | None = None, show: bool = True, **hooks) -> list:
    """Train; `hooks` go to train.train (resume, identity, on_step, on_record)."""
    r.records = train(r.loaded.model, r.blocks, r.prepared, r.cfg, out=out, show=show, **hooks)
    return r.records


def describe(r: Run, data_options: dict, tasks: dict, resumed: list | None = None) -> dict:
    """run.json as it is written before training: what ran, on what, with which settings and
    software, on which machine (`resumed`: the checkpoint steps earlier attempts stopped at)."""
    from . import distributed, runtime
    from .config import config_dict
    from .params import count

    trainable, total = count(r.model)["total"]
    described = {"command": "train", "model": r.model_name, "data": r.data_name, "data_options": data_options,
                 "strategy": r.prepared.spec, "trainable": trainable, "total": total, "config": config_dict(r.cfg),
                 "tasks": tasks, "processes": distributed.world_size(), "versions": runtime.versions(),
                 "hardware": runtime.hardware(runtime.pick_device(r.cfg.device)), "data_tokens": r.blocks.n_tokens,
                 "train_blocks": len(r.blocks.train_ids), "held_out_blocks": len(r.blocks.held_ids)}
    return described | ({"resumed": resumed} if resumed else {})


def result(records: list, seconds: float, adapter_bytes: int, base_bytes: int, tasks: dict | None = None,
           base_precision: str | None = None) -> dict:
    """run.json's "result", added when the run finished (`base_precision`: what the frozen base
    was kept in, --base-precision auto decided)."""
    evals = [x["eval_loss"] for x in records if "eval_loss" in x]
    found = {"seconds": seconds, "base_precision": base_precision, "first_eval_loss": evals[0] if evals else None,
             "final_eval_loss": evals[-1] if evals else None, "adapter_bytes": adapter_bytes, "base_fp32_bytes": base_bytes,
             "skipped_steps": sum(1 for x in records if x.get("skipped"))}
    return found | ({"tasks": tasks} if tasks else {})


def save(r: Run, folder: Path, show: bool = True) -> Path:
    """Write the adapter (peft's format where it can hold the strategy, else peftlab's)."""
    with phase("saving the adapter", show):
        return artifacts.save(r.loaded.model, r.prepared, folder, base_model=r.model_name)

"""The command line's vocabulary: every option that several commands take is defined once here
(flag, default, help), so `train`, `compare`, `bench`, `generate` and `merge` mean the same
thing by the same word. Also the checks every number gets, and `--config FILE.toml`, a run
config holding any option of a command (flags given on the command line win).
"""

import math
import sys
from pathlib import Path

import typer

from .errors import UserError, close_matches
from .config import TrainConfig, check_base_precision, check_master_weights  # noqa: F401  (the command line's checks)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

D = TrainConfig()  # the defaults every command shares

MODEL = typer.Option(..., "--model", "-m", help="alias (smollm2-135m, tiny-llama, ...), .gguf file, HF folder or hub id")
DATA = typer.Option(..., "--data", "-d", help="moby-dick, alice, a text file or folder, records (.jsonl .json .csv .tsv .parquet) or a datasets folder")
TEXT_COLUMN = typer.Option(None, "--text-column", help="record files: the column holding the text or the messages")
SYSTEM = typer.Option(None, "--system", help="chat records: the system prompt for conversations that have none")
STRATEGY = typer.Option("full", "--strategy", "-s",
                        help="NAME[:key=value,...], methods stacked with /, e.g. lora:r=8; S@LR trains S at learning rate LR")
STRATEGIES = typer.Option(..., "--strategy", "-s", help="repeat for each strategy; S@LR trains S at learning rate LR")
STEPS = typer.Option(D.steps, "--steps", help="optimizer steps")
BATCH_SIZE = typer.Option(D.batch_size, "--batch-size", help="rows per optimizer step, over all processes")
SEQ_LEN = typer.Option(D.seq_len, "--seq-len", help="tokens per row")
LR = typer.Option(D.lr, "--lr", help="peak learning rate (AdamW; warmup, then cosine to 10%)")
WARMUP = typer.Option(D.warmup, "--warmup", help="learning-rate warmup: a fraction of --steps, or a step count if >= 1")
SEED = typer.Option(D.seed, "--seed", help="seed of the weights' random parts, the batch order and sampling")
DTYPE = typer.Option(D.dtype, "--dtype", help="fp32 | bf16 | auto (bf16: frozen weights stored bf16, compute under autocast; auto: bf16 where the device computes it natively)")
DEVICE = typer.Option(D.device, "--device", help="auto | cpu | cuda")
GRAD_ACCUM = typer.Option(D.grad_accum, "--grad-accum", help="micro-batches per optimizer step")
EVAL_EVERY = typer.Option(D.eval_every, "--eval-every", help="held-out loss every N steps (0: five times over the run)")
CHECKPOINT_EVERY = typer.Option(D.checkpoint_every, "--checkpoint-every",
                                help="checkpoint the whole training state every N steps (0: only on SIGTERM/SIGINT)")
GRAD_CHECKPOINT = typer.Option(D.grad_checkpoint, "--grad-checkpoint", help="recompute activations in backward: less memory, more time")
BASE_PRECISION = typer.Option(D.base_precision, "--base-precision",
                              help="auto | float | int8: keep the frozen linear layers in --dtype, or in int8 (per-channel scales; "
                                   "int8 GEMMs with per-token scales; half the base memory); auto: int8 only when the "
                                   "frozen base in --dtype would take over half the free memory (it is not faster)")
MASTER_WEIGHTS = typer.Option(D.master_weights, "--master-weights",
                              help="fp32 | bf16-compensated: trained weights as fp32 masters, or bf16 with Kahan-compensated "
                                   "updates and bf16 moments (with --dtype bf16; leaner for full and freeze strategies)")
COMPILE = typer.Option(D.compile, "--compile/--no-compile",
                       help="torch.compile the decoder blocks: faster, leaner steps after a slow first one "
                            "(default: compile when the run is long enough to pay and a C++ compiler is present)")
REPORT_TO = typer.Option("none", "--report-to", help="none | tensorboard: also log every step to TensorBoard (in the output folder)")
TASKS = typer.Option(None, "--task", help="score task accuracy at every evaluation, repeatable: a task file (.jsonl .json .csv; "
                     "prompt+answer, or prompt+choices+label), NAME=FILE, or a built-in task (arith[:digits=3,op=mul], which-book)")
OVERWRITE = typer.Option(False, "--overwrite", help="replace an existing non-empty --out (never one that is, holds or is inside an input)")
FORCE_BASE = typer.Option(False, "--force-base", help="load an adapter even when its base fingerprint differs from --model (warned)")
QUIET = typer.Option(False, "--quiet", help="no progress output")
CONFIG = typer.Option(None, "--config", help="a TOML file holding any of this command's options (flags given here win)")


def positive(**values) -> None:
    for name, v in values.items():
        if not math.isfinite(v) or v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {v}")


def at_least_zero(**values) -> None:
    for name, v in values.items():
        if not math.isfinite(v) or v < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {v}")


SEED_MAX = 2**32 - 1  # what every generator peftlab seeds (torch, numpy, Python) accepts


def seed(value: int) -> None:
    if not 0 <= value <= SEED_MAX:
        raise UserError(f"--seed must be between 0 and {SEED_MAX}, got {value}")


def run_config(command, argv: list[str]) -> dict | None:
    """`default_map` for click from `--config FILE` in `argv`: {subcommand: {parameter: value}}.

    Keys are the option names without dashes (`batch-size` or `batch_size`, `out`, `strategy`
    as a list where the option repeats). An unknown key is a one-line error naming the valid ones."""
    if not argv or argv[0] not in getattr(command, "commands", {}):
        return None
    path = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config {file}: no such file")
    try:
        table = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--config {file} is not valid TOML ({e})") from None
    sub = command.commands[argv[0]]
    names = {}  # every spelling of an option -> its parameter name
    for p in sub.params:
        for flag in getattr(p, "opts", []):
            if flag.startswith("--"):
                names[flag[2:]] = names[flag[2:].replace("-", "_")] = p.name
    names.pop("config", None)
    values = {}
    for key, value in table.items():
        if key not in names:
            valid = sorted(k for k in names if "_" not in k)
            raise UserError(f"--config {file}: '{key}' is not an option of peftlab {argv[0]}{close_matches(key, valid)}; "
                            f"valid: {', '.join(valid)}")
        values[names[key]] = value
    return {argv[0]: values}

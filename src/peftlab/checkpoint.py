"""Training checkpoints: the whole state of a run, so a killed run resumes bit for bit.

    OUT/checkpoints/step-00000120/
      state.safetensors   param.<name>          every trainable tensor (fp32 master copies,
                                                or the bf16 weight whose master is master.<name>)
                          exp_avg.<name>, exp_avg_sq.<name>, step.<name>   AdamW's moments
                          rng.torch, rng.cuda.<i>                          generator states
                          training.<i>.<key>   step i's training-time state (AdaLoRA's scores)
      state.json          step, batches drawn, optimizer groups, the run's identity,
                          the metric records so far, each step's training state (JSON part)

A checkpoint folder is written under a temporary name and renamed into place, so a kill at
any moment leaves either the previous checkpoints or the new one, never half of one; the
newest `keep` are kept. The learning rate is a function of the step, the batch order a
function of (seed, batches drawn), and parameters a schedule unfreezes later are a function
of the step: with these and the tensors above, the remaining steps compute exactly what an
uninterrupted run computes.

The run's identity (model, data, strategy, batch shape, seed, dtype) is stored too; resuming
with a different one is refused, naming the first difference.
"""

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .errors import UserError
from .files import atomic_dir, write_json

FOLDER = "checkpoints"
PATTERN = re.compile(r"^step-(\d{8})$")
# Identity keys in the order a difference is reported, with the option that sets each.
IDENTITY = {"model": "--model", "data": "--data", "strategy": "--strategy", "batch_size": "--batch-size",
            "seq_len": "--seq-len", "grad_accum": "--grad-accum", "seed": "--seed", "dtype": "--dtype",
            "base_precision": "--base-precision", "master_weights": "--master-weights",
            "data_digest": "--data (its content)", "base_digest": "--model (its weights)"}


def folder_of(out: Path, step: int) -> Path:
    return Path(out) / FOLDER / f"step-{step:08d}"


def existing(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first (temporary folders of a killed write are not)."""
    root = Path(out) / FOLDER
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if PATTERN.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(out: Path) -> Path | None:
    found = existing(out)
    return found[-1] if found else None


def clear(out: Path) -> None:
    shutil.rmtree(Path(out) / FOLDER, ignore_errors=True)


def drop_partial(out: Path) -> None:
    """Remove what a write killed midway left behind (temporary folders never renamed)."""
    root = Path(out) / FOLDER
    for p in root.iterdir() if root.is_dir() else ():
        if p.name.startswith("."):
            shutil.rmtree(p, ignore_errors=True)


def step_of(folder: Path) -> int:
    return int(PATTERN.match(Path(folder).name).group(1))


def save(out: Path, step: int, model, opt, drawn: int, records: list, identity: dict, keep: int,
         training: list = ()) -> Path | None:
    """Write the checkpoint of `step` (every process takes part in gathering sharded tensors;
    only rank 0 writes). `training`: the strategy steps' `Training` objects, whose state is
    saved beside the optimizer's. Returns its folder on rank 0."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, groups = {}, []
    for group in (opt.param_groups if opt else []):
        groups.append([names[id(p)] for p in group["params"]])
        for p in group["params"]:
            n = names[id(p)]
            tensors[f"param.{n}"] = distributed.full(p)
            for key, value in opt.state.get(p, {}).items():
                tensors[f"{key}.{n}"] = distributed.full(value) if isinstance(value, torch.Tensor) else torch.tensor(value)
    if not distributed.is_main():
        return None
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    methods = []
    for i, t in enumerate(training):
        meta, own = t.state()
        methods.append(meta)
        tensors.update({f"training.{i}.{k}": v.detach().cpu() for k, v in own.items()})
    np_state = np.random.get_state()
    state = {"step": step, "drawn": drawn, "groups": groups, "identity": identity, "records": records,
             "training": methods,
             "rng_python": _jsonable(random.getstate()), "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    target = folder_of(out, step)
    from safetensors.torch import save_file

    with atomic_dir(target) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        _fault("checkpoint-write", step)
        write_json(tmp / "state.json", state)
    for old in existing(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read(folder: Path) -> tuple[dict, dict]:
    """(state.json, tensors) of a checkpoint folder; a damaged one is a one-line error."""
    from .artifacts.io import read_json, read_tensors

    return read_json(folder / "state.json", required=("step", "drawn", "groups", "identity", "records")), \
        read_tensors(folder / "state.safetensors")


def check_identity(saved: dict, now: dict, where: Path) -> None:
    for key, option in IDENTITY.items():
        if key in saved and key in now and saved[key] != now[key]:
            raise UserError(f"cannot resume {where}: it was trained with {option} {saved[key]}, this run has "
                            f"{now[key]}; use the run's own arguments or another --out")


def restore(state: dict, tensors: dict, model, opt, training: list = ()) -> None:
    """Put the saved trainable tensors, AdamW moments, the strategy steps' training state
    and generator states back."""
    params = dict(model.named_parameters())
    where = f"checkpoint step {state['step']}"
    moments: dict = {}  # parameter name -> {"exp_avg": t, "exp_avg_sq": t, "step": t}
    for key, t in tensors.items():
        head, _, name = key.partition(".")
        if head not in ("param", "rng", "training"):
            moments.setdefault(name, {})[head] = t
    with torch.no_grad():
        for group in state["groups"]:
            for n in group:
                if n not in params or f"param.{n}" not in tensors:
                    raise UserError(f"{where}: no tensor for parameter {n}; was it written by another strategy?")
                p, saved = params[n], tensors[f"param.{n}"]
                held = opt.state.get(p, {}).get("master")  # the fp32 master of a bf16 weight (optim.MasterAdamW)
                _copy_into(p, distributed.like(saved.to(p.dtype), p))
                if n in moments:  # counters and seeds stay plain tensors, the moments take p's layout
                    opt.state[p] = {k: t.to(p.device) if t.dim() == 0 else distributed.like(t, p) for k, t in moments[n].items()}
                if held is not None and "master" not in opt.state[p]:  # saved as an fp32 weight, without a master
                    opt.state[p]["master"] = held.copy_(saved)
    saved = state.get("training") or [{} for _ in training]  # older checkpoints: no such state
    if len(saved) != len(training):
        raise UserError(f"{where}: saved the training state of {len(saved)} strategy steps, this strategy has "
                        f"{len(training)}; was it written by another strategy?")
    for i, t in enumerate(training):
        prefix = f"training.{i}."
        t.restore(saved[i], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    if "rng_python" in state:
        random.setstate(_tuples(state["rng_python"]))
    if "rng_numpy" in state:
        kind, keys, *rest = state["rng_numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


def _copy_into(p, value) -> None:
    if distributed.is_sharded(p):
        p.to_local().copy_(value.to_local())
    else:
        p.copy_(value)


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _fault(point: str, step: int) -> None:
    """Fault injection for the resume tests: PEFTLAB_FAULT=checkpoint-write:3 kills this
    process (SIGKILL, as a preemption would) in the middle of writing the step-3 checkpoint."""
    import os
    import signal

    if os.environ.get("PEFTLAB_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)

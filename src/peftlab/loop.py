"""The training loop: AdamW over trainable parameters only, whatever method made them.

Per optimizer step: `grad_accum` micro-batches, gradient clipping, a warmup + cosine learning
rate, and one line of `metrics.jsonl`. Held-out loss every `eval_every` steps (and at step 0,
so every run shows where it started). Parameters that a schedule unfreezes later join the
optimizer as a new group at their step.

A run survives: every `checkpoint_every` steps, and when SIGTERM/SIGINT arrives, the whole
training state is checkpointed (checkpoint.py) and `resume=True` continues from it exactly.
A non-finite loss or gradient stops the run (or skips the step with `skip_nonfinite`).
Under torchrun the same loop trains data-parallel (distributed.py).

`train` is the loop; its phases are the functions below it, in the order it calls them:
check_run → resume_point → base_precision → ready_model → optimizer → Log → one_step (per step). The loss of
a batch and of the held-out set is loss.py's, the learning-rate schedule optim.py's, and what
a method does while training is its `Training` (methods/protocol.py).
"""

import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from . import checkpoint, compiling, distributed, int8, memory, optim, runtime
from .components import arch_of
from .config import TrainConfig, check_base_precision, check_master_weights
from .errors import RunFailed, UserError
from .interrupt import Interrupted, StopSignals
from .loss import LossModule, held_out_loss
from .methods import parameter_groups, trainable_parameters
from .progress import Progress


class NonFinite(UserError):
    """A NaN/Inf loss or gradient: the settings or the data made training diverge."""


def run_identity(model, blocks, prepared, cfg: TrainConfig, extra: dict | None = None) -> dict:
    """What a checkpoint may only be resumed with (extra: the CLI's model and data names)."""
    from .artifacts.io import fingerprint

    data = hashlib.sha256(blocks.train_ids.numpy().tobytes()).hexdigest()[:16]
    base = hashlib.sha256(json.dumps(fingerprint(model, set())).encode()).hexdigest()[:16]
    return (extra or {}) | {"strategy": prepared.spec, "batch_size": cfg.batch_size, "seq_len": int(blocks.train_ids.shape[1]),
                            "grad_accum": cfg.grad_accum, "seed": cfg.seed, "dtype": cfg.dtype,
                            "base_precision": cfg.base_precision, "master_weights": cfg.master_weights,
                            "data_digest": data, "base_digest": base}


def train(model, blocks, prepared, cfg: TrainConfig, out: Path | None = None, on_step=None, show=True,
          resume: bool = False, identity: dict | None = None, on_record=None, on_eval=None) -> list[dict]:
    """Train `model` (already prepared by a strategy) on `blocks`; return the metric records.

    `on_step(step, record, optimizer)` is called after every optimizer step (before the record
    is written), e.g. to measure weight change; it may add keys to `record`. `on_record(record)`
    sees every record as it is written (the step-0 evaluation too), e.g. for a tracker. With `resume`,
    training continues from the newest checkpoint in `out` (from the start if there is none).
    `identity` adds entries (e.g. the model's and data's names) to what a resume must match.
    `on_eval(model) -> dict` adds numbers to every evaluation record (task accuracy), beside eval_loss.
    """
    out = Path(out) if out is not None else None
    device, dtype = check_run(prepared, cfg, show)
    torch.manual_seed(cfg.seed)
    state, tensors = resume_point(out, resume)
    cfg = base_precision(model, cfg, device, dtype, show, state["identity"] if state else None, bool(prepared.unfreeze_at))
    ident = run_identity(model, blocks, prepared, cfg, identity)
    if state:
        checkpoint.check_identity(state["identity"], ident, out)
    first = state["step"] + 1 if state else 1
    work = (cfg.steps - first + 1) * cfg.batch_size * cfg.grad_accum * blocks.train_ids.shape[1]
    runner, loss_module, start, uncompile = ready_model(model, prepared, cfg, device, dtype, work, show, blocks.train_ids)
    later = prepared.unfreeze_at  # step -> [parameter names] that join the optimizer then
    try:
        opt = optimizer(model, prepared, cfg, start)
        if state:
            for at in sorted(later):
                if at < state["step"]:
                    opt = _unfreeze(model, later[at], opt, cfg)
            checkpoint.restore(state, tensors, model, opt, prepared.training)
    except BaseException:
        if uncompile:  # the model goes back as it came (its layers, uncompiled)
            uncompile()
        raise
    eval_every = cfg.eval_every or math.ceil(cfg.steps / 5)  # at most five evaluations, also in short runs
    drawn = state["drawn"] if state else 0
    batches = blocks.batches(cfg.batch_size, cfg.seed, start=drawn)
    log = Log(out, list(state["records"]) if state else [], on_record)

    def evaluate() -> dict:
        found = {"eval_loss": held_out_loss(model, blocks, device, dtype, cfg.batch_size, forward=loss_module)}
        return found | (on_eval(model) if on_eval else {})

    tokens_per_step = cfg.batch_size * cfg.grad_accum * blocks.train_ids.shape[1]
    skipped = sum(1 for r in log.records if r.get("skipped"))
    step = first - 1
    try:
        with StopSignals() as signals, Progress(cfg.steps, show=show and distributed.is_main(), done=first - 1) as bar:
            if eval_every > 0 and not state:
                bar.phase("evaluating before training")
                log.emit({"step": 0, **evaluate()})
                bar.phase(None)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for step in range(first, cfg.steps + 1):
                if step - 1 in later:
                    opt = _unfreeze(model, later[step - 1], opt, cfg)
                start = time.perf_counter()
                record, stop = one_step(step, model, prepared, cfg, opt, runner, batches, device, dtype, signals.signum)
                drawn += cfg.grad_accum
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - start
                record |= {"step_time": dt, "tokens_per_s": tokens_per_step / dt, "peak_mem": memory.peak_memory(device)}
                if record.get("skipped"):
                    skipped += 1
                    record["skipped_total"] = skipped
                if eval_every > 0 and (step % eval_every == 0 or step == cfg.steps):
                    bar.phase("evaluating", step)
                    record |= evaluate()
                if on_step:
                    on_step(step, record, opt)
                log.emit(record)
                bar.update(record)
                stop = int(stop) and (signals.signum or _signal_of(stop))
                periodic = cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps
                saved = None
                if out and (periodic or stop):
                    bar.phase("checkpointing", step)
                    saved = checkpoint.save(out, step, model, opt, drawn, log.records, ident, cfg.keep_checkpoints,
                                            prepared.training)
                if stop:
                    raise Interrupted(stop, step, saved or (checkpoint.folder_of(out, step) if out else None))
    except RuntimeError as e:
        if distributed.world_size() > 1 and ("Connection" in str(e) or "closed" in str(e) or "peer" in str(e).lower()):
            raise RunFailed(f"another training process stopped during step {step} ({str(e).splitlines()[0][:100]}); "
                            f"no adapter was written; continue with --resume") from None
        raise
    finally:
        log.close()
        optim.release_masters(opt)
        if uncompile:
            uncompile()
    model.eval()
    if skipped and skipped >= cfg.steps:  # a run that learned nothing is not a success
        raise NonFinite(f"every one of the {cfg.steps} steps had a non-finite loss or gradient and was skipped; "
                        "nothing was learned and no adapter was written. Lower --lr, check the model's weights and the data")
    return log.records


# ---- the phases, in the order train() runs them --------------------------------------------

def check_run(prepared, cfg: TrainConfig, show: bool) -> tuple[torch.device, torch.dtype]:
    """Every setting checked against the others and this machine, before anything changes;
    returns the device (the process group started under torchrun) and the compute dtype."""
    device = distributed.init(runtime.pick_device(cfg.device))
    dtype = runtime.check_dtype(cfg.dtype, device)
    say(runtime.bf16_note(dtype, device), show)
    distributed.check_batch(cfg.batch_size)
    check_base_precision(cfg.base_precision)
    check_master_weights(cfg.master_weights, dtype == torch.bfloat16)
    if cfg.base_precision == "int8" and cfg.fsdp:
        raise UserError("--base-precision int8 keeps the frozen base in buffers, which FSDP does not shard; use DDP (drop --fsdp)")
    if cfg.base_precision == "int8" and prepared.unfreeze_at:
        raise UserError("--base-precision int8 stores frozen layers in int8, and this strategy unfreezes some of them "
                        "later; use --base-precision float")
    check_processes(prepared, cfg)
    return device, dtype


def resume_point(out: Path | None, resume: bool) -> tuple[dict | None, dict | None]:
    """(state.json, tensors) of the checkpoint to continue from, or (None, None) for a fresh
    run, whose output folder loses any earlier run's checkpoints (they must not be resumed later)."""
    if not resume:
        if out is not None and distributed.is_main():
            checkpoint.clear(out)
        return None, None
    if out is None:
        raise UserError("resume needs the run's output folder (out)")
    if distributed.is_main():
        checkpoint.drop_partial(out)
    found = checkpoint.latest(out)
    if not found:
        return None, None
    return checkpoint.read(found)


def base_precision(model, cfg: TrainConfig, device, dtype, show: bool, resumed=None, unfreezes=False) -> TrainConfig:
    """`cfg` with --base-precision auto decided: the checkpoint's choice when resuming (`resumed`:
    its identity), float if the strategy `unfreezes` layers later (int8 ones cannot train), else int8.agreed."""
    if cfg.base_precision != "auto":
        return cfg
    if unfreezes:
        chosen, note = "float", None
    elif resumed and resumed.get("base_precision") in ("float", "int8"):
        chosen, note = resumed["base_precision"], None
    else:
        chosen, note = int8.agreed(model, device, dtype, cfg.fsdp)
    say(note, show)
    return dataclasses.replace(cfg, base_precision=chosen)


def ready_model(model, prepared, cfg: TrainConfig, device, dtype, work: int, show: bool, train_ids=None):
    """Put the model where and how it trains: on the device, the frozen base in its precision
    (int8, or `dtype`), activation recomputation, compiled blocks, wrapped for DDP/FSDP.
    `work`: the tokens left to train (compiling pays only for long runs); `train_ids` (rows, T):
    the training rows (an int8 base calibrates on their first tokens; compiled products are
    planned for batch × T rows, gemm.py). Returns (runner, loss module, by name what the
    optimizer's per-weight state starts from — bf16 rounding residuals (compensated masters)
    or fp32 masters of weights stored in bf16 — undo-compile or None)."""
    model.to(device)
    if cfg.base_precision == "int8":
        # from the fp32 weights, before they are stored in `dtype`; the first training rows (the
        # same in every process and on resume) pick each layer's fp32 outlier channels
        int8.quantize_frozen(model, device, train_ids)
        say(int8.int8_note(device), show)
    for t in prepared.training:  # before a resume restores their state: that state is planned for this run
        t.start(model, cfg.steps)
    start = _residuals(model, cfg)  # taken before the weights are stored in bf16
    runtime.store_frozen(model, dtype, trained=trained_dtype(cfg))
    start |= _masters(model, prepared, cfg, dtype)
    if cfg.grad_checkpoint:
        memory.enable_checkpointing(model)
    compiled, why = compiling.compile_plan(cfg.compile, device, model, work)
    say(why, show)
    rows = 0 if cfg.fsdp or train_ids is None else cfg.batch_size // distributed.world_size() * train_ids.shape[1]
    uncompile = compiling.compile_blocks(model, rows, dtype) if compiled else None
    model.train()
    loss_module = LossModule(model, cfg.chunked_loss, compiled)
    runner = distributed.wrap(loss_module, cfg.fsdp, list(model.get_submodule(arch_of(model).layers)), dtype)
    return runner, loss_module, start, uncompile


def optimizer(model, prepared, cfg: TrainConfig, start: dict):
    """AdamW over what trains now, one group per learning-rate multiplier (None: nothing trains
    until a schedule unfreezes it)."""
    named = trainable_parameters(model)  # after wrapping: a sharded run's parameters are new objects
    if not named:
        return None
    start = {named[n]: distributed.like(t, named[n]) for n, t in start.items() if n in named}
    return adamw(parameter_groups(prepared, model, list(named.values())), cfg, start)


class Log:
    """metrics.jsonl (rank 0 only): a resumed run's file holds each step exactly once; every
    record also goes to `on_record` (a tracker). JSON has no NaN or Infinity: a skipped step's
    non-finite numbers are written as null."""

    def __init__(self, out: Path | None, records: list, on_record=None):
        self.records, self.on_record = records, on_record if distributed.is_main() else None
        self.file = None
        if out and distributed.is_main():
            out.mkdir(parents=True, exist_ok=True)
            self.file = open(out / "metrics.jsonl", "w")
            for r in records:
                self.file.write(json.dumps(r) + "\n")
            self.file.flush()

    def emit(self, record: dict) -> None:
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.records.append(record)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.on_record:
            self.on_record(record)

    def close(self) -> None:
        if self.file:
            self.file.close()


def one_step(step: int, model, prepared, cfg: TrainConfig, opt, runner, batches, device, dtype, signum) -> tuple[dict, float]:
    """Optimizer step `step`: its micro-batches forward and backward (plus the strategy's loss
    term), the training hooks, clipping, the update (or a refusal of a non-finite one).
    Returns (record, the summed stop flags of all processes: non-zero when one was signalled)."""
    world = distributed.world_size()
    for group in opt.param_groups:  # a method may ask for its own multiplier (LoRA+)
        group["lr"] = cfg.lr * group.get("lr_scale", 1.0) * optim.lr_factor(step, cfg.steps, cfg.warmup)
    loss_sum, term_sum = 0.0, 0.0
    for _ in range(cfg.grad_accum):
        ids, labels = next(batches)
        ids, labels = distributed.shard_rows(ids).to(device), distributed.shard_rows(labels).to(device)
        with runtime.autocast(device, dtype):
            total, count = runner(ids, labels)
        if world > 1:  # weight by this process's share of the global batch's targets
            loss = total * world / distributed.all_sum_tensor(count).clamp_min(1) / cfg.grad_accum
            loss_sum += float(loss.detach()) / world
        else:
            loss = total / count.clamp_min(1) / cfg.grad_accum
            loss_sum += float(loss.detach())
        term = prepared.loss(model)  # a method's own term (AdaLoRA: orthogonality)
        if term is not None:
            loss = loss + term / cfg.grad_accum
            term_sum += float(term.detach()) / cfg.grad_accum
        loss.backward()
    for t in prepared.training:
        t.after_backward(model, step)
    trainable = [p for g in opt.param_groups for p in g["params"]]
    with torch.profiler.record_function("peftlab.clip"):  # a named range for bench/profile.py
        norm = optim.clip_gradients(opt, trainable, cfg.clip if cfg.clip > 0 else float("inf"))
    norm = float(norm.full_tensor() if distributed.is_sharded(norm) else norm)
    # One collective: the global loss, and whether any process was asked to stop.
    loss_sum, stop = distributed.all_sum([loss_sum, float(signum or 0)], device)
    finite = math.isfinite(loss_sum) and math.isfinite(norm)
    if finite:
        opt.step()
        for t in prepared.training:
            t.after_step(model, step)
    elif not cfg.skip_nonfinite:
        what = "loss" if not math.isfinite(loss_sum) else "gradient norm"
        raise NonFinite(f"step {step}: the {what} is {loss_sum if what == 'loss' else norm}; training "
                        f"stopped and no adapter was written. Lower --lr, check the strategy's numbers "
                        f"and the data, or pass --skip-nonfinite to skip such steps")
    opt.zero_grad(set_to_none=True)
    record = {"step": step, "loss": loss_sum, "lr": opt.param_groups[0]["lr"], "grad_norm": norm}
    if term_sum:  # the task's loss stays "loss", comparable across strategies
        record["method_loss"] = term_sum
    if not finite:
        record["skipped"] = True
    return record, stop


def say(line: str | None, show: bool) -> None:
    """A note on stderr from the main process (nothing when there is none to give)."""
    if line and show and distributed.is_main():
        print(line, file=sys.stderr, flush=True)


def check_processes(prepared, cfg: TrainConfig) -> None:
    """Refuse a process layout a strategy step's training-time work cannot follow."""
    for t in prepared.training:
        if t.processes == "one" and distributed.world_size() > 1:
            raise UserError(f"{t.method} trains in one process only; drop --nproc / torchrun")
        if t.processes == "ddp" and cfg.fsdp:
            raise UserError(f"{t.method} needs whole tensors in every process; train it with DDP (drop --fsdp)")


def trained_dtype(cfg: TrainConfig) -> torch.dtype:
    """Trained weights are fp32 master copies, or bf16 themselves (compensated updates)."""
    return torch.bfloat16 if cfg.master_weights == "bf16-compensated" else torch.float32


def _signal_of(total: float) -> int:
    """The signal another process received, from the summed flags (SIGTERM wins)."""
    import signal

    return int(signal.SIGTERM) if total >= signal.SIGTERM else int(signal.SIGINT)


def adamw(params, cfg: TrainConfig, start=None) -> torch.optim.Optimizer:
    return optim.adamw(params, cfg.lr, cfg.weight_decay, cfg.master_weights, start)


def _masters(model, prepared, cfg: TrainConfig, dtype) -> dict:
    """bf16 training with fp32 masters, one process: the trained Linear weights become bf16 and
    the optimizer holds their fp32 masters (optim.MasterAdamW: the same numbers, fewer passes).
    Not where gradients are summed in their own dtype (micro-batches, processes), nor where a
    strategy's training hooks touch weights between steps. Returns {name: fp32 master}."""
    if (dtype != torch.bfloat16 or cfg.master_weights != "fp32" or cfg.grad_accum > 1 or prepared.training
            or distributed.world_size() > 1):
        return {}
    params = dict(model.named_parameters())
    masters = {}
    for n in optim.master_candidates(model):
        masters[n] = params[n].data
        params[n].data = masters[n].to(torch.bfloat16)
    return masters


def _residuals(model, cfg: TrainConfig, names=None) -> dict:
    """Compensated bf16 masters: what rounding each fp32 trained weight to bf16 drops, by name
    (taken before the weights are stored in bf16), so compensation starts the run exact."""
    if cfg.master_weights != "bf16-compensated":
        return {}
    params = dict(model.named_parameters()) if names is not None else trainable_parameters(model)
    return {n: optim.rounding_residual(params[n]) for n in (names if names is not None else params)
            if params[n].dtype == torch.float32}


def _unfreeze(model, names, opt, cfg):
    """Make scheduled parameters trainable (fp32 master copies) and give them to the optimizer."""
    params = dict(model.named_parameters())
    residuals = {params[n]: r for n, r in _residuals(model, cfg, names).items()}
    new = []
    for n in names:
        p = params[n]
        p.data = p.data.to(trained_dtype(cfg))
        p.requires_grad_(True)
        new.append(p)
    if opt is None:
        return adamw(new, cfg, residuals)
    if residuals:
        opt.residuals.update(residuals)
    opt.add_param_group({"params": new, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    return opt

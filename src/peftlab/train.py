"""The training loop: AdamW over trainable parameters only, whatever method made them.

Per optimizer step: `grad_accum` micro-batches, gradient clipping, a warmup + cosine learning
rate, and one line of `metrics.jsonl`. Held-out loss every `eval_every` steps (and at step 0,
so every run shows where it started). Parameters that a schedule unfreezes later join the
optimizer as a new group at their step.

A run survives: every `checkpoint_every` steps, and when SIGTERM/SIGINT arrives, the whole
training state is checkpointed (checkpoint.py) and `resume=True` continues from it exactly.
A non-finite loss or gradient stops the run (or skips the step with `skip_nonfinite`).
Under torchrun the same loop trains data-parallel (distributed.py).
"""

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint, distributed, optim, runtime
from .config import TrainConfig, check_base_precision, check_master_weights
from .errors import RunFailed, UserError
from .interrupt import Interrupted, StopSignals
from .loss import IGNORE, causal_lm_loss_sum
from .methods import parameter_groups, trainable_parameters
from .progress import Progress


class NonFinite(UserError):
    """A NaN/Inf loss or gradient: the settings or the data made training diverge."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak, for optimizer step `step` (1-based)."""
    warm = int(cfg.warmup if cfg.warmup >= 1 else round(cfg.warmup * cfg.steps))
    if step <= warm:
        return step / max(1, warm)
    t = (step - warm) / max(1, cfg.steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class LossModule(nn.Module):
    """The model and its loss as one module, which is what DDP and FSDP wrap.

    forward(ids (B, T), labels (B, T)) -> (summed loss, number of target positions)."""

    def __init__(self, model, chunked: bool = True, fused: bool = False):
        super().__init__()
        self.model, self.chunked, self.fused = model, chunked, fused

    def forward(self, ids, labels):
        if self.chunked:
            return causal_lm_loss_sum(self.model, ids, labels, fused=self.fused)
        count = (labels[:, 1:] != IGNORE).sum()
        return self.model(input_ids=ids, labels=labels).loss * count, count


def batch_loss(model, ids, labels, chunked: bool = True, fused: bool = False) -> torch.Tensor:
    """Mean next-token loss of one batch, chunked (loss.py) or through transformers' own head."""
    total, count = LossModule(model, chunked, fused)(ids, labels)
    return total / count.clamp_min(1)


@torch.no_grad()
def held_out_loss(model, blocks, device, dtype, batch_size: int, chunked: bool = True, fused: bool = False,
                  forward=None) -> float:
    """Mean token loss over all held-out blocks (each process takes its share of every batch)."""
    forward = forward or LossModule(model, chunked, fused)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, len(blocks.held_ids), batch_size):
        ids = torch.tensor_split(blocks.held_ids[i : i + batch_size], distributed.world_size())[distributed.rank()]
        labels = torch.tensor_split(blocks.held_labels[i : i + batch_size], distributed.world_size())[distributed.rank()]
        weight = 1.0
        if len(ids) == 0:  # fewer rows than processes: every process must still run (FSDP gathers)
            ids, labels, weight = blocks.held_ids[i : i + 1], blocks.held_labels[i : i + 1], 0.0
        with runtime.autocast(device, dtype):
            loss, n = forward(ids.to(device), labels.to(device))
        total += float(loss) * weight
        count += int(n) * weight
    total, count = distributed.all_sum([total, count], device)
    model.train(was_training)
    return total / max(1.0, count)


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
    device = distributed.init(runtime.pick_device(cfg.device))
    dtype = runtime.check_dtype(cfg.dtype, device)
    note = runtime.bf16_note(dtype, device)
    if note and show and distributed.is_main():
        print(note, file=sys.stderr, flush=True)
    distributed.check_batch(cfg.batch_size)
    check_base_precision(cfg.base_precision)
    check_master_weights(cfg.master_weights, dtype == torch.bfloat16)
    if cfg.base_precision == "int8" and cfg.fsdp:
        raise UserError("--base-precision int8 keeps the frozen base in buffers, which FSDP does not shard; use DDP (drop --fsdp)")
    check_processes(prepared, cfg)
    torch.manual_seed(cfg.seed)
    ident = run_identity(model, blocks, prepared, cfg, identity)
    state, tensors = None, None
    if resume:
        if out is None:
            raise UserError("resume needs the run's output folder (out)")
        if distributed.is_main():
            checkpoint.drop_partial(out)
        found = checkpoint.latest(out)
        if found:
            state, tensors = checkpoint.read(found)
            checkpoint.check_identity(state["identity"], ident, out)
    elif out is not None and distributed.is_main():
        checkpoint.clear(out)  # a fresh run: checkpoints of an earlier run in `out` must not be resumed later
    first = state["step"] + 1 if state else 1
    model.to(device)
    if cfg.base_precision == "int8":
        from . import int8

        int8.quantize_frozen(model, device)  # from the fp32 weights, before they are stored in `dtype`
        note = int8.int8_note(device)
        if note and show and distributed.is_main():
            print(note, file=sys.stderr, flush=True)
    for t in prepared.training:  # before a resume restores their state: that state is planned for this run
        t.start(model, cfg.steps)
    residuals = _residuals(model, cfg)
    runtime.store_frozen(model, dtype, trained=trained_dtype(cfg))
    if cfg.grad_checkpoint:
        runtime.enable_checkpointing(model)
    tokens = (cfg.steps - first + 1) * cfg.batch_size * cfg.grad_accum * blocks.train_ids.shape[1]
    compiled, why = runtime.compile_plan(cfg.compile, device, model, tokens)
    if why and show and distributed.is_main():
        print(why, file=sys.stderr, flush=True)
    uncompile = runtime.compile_blocks(model) if compiled else None
    model.train()
    loss_module = LossModule(model, cfg.chunked_loss, compiled)
    from .components import arch_of

    runner = distributed.wrap(loss_module, cfg.fsdp, list(model.get_submodule(arch_of(model).layers)), dtype)
    params = list(trainable_parameters(model).values())
    named = trainable_parameters(model)  # after wrapping: a sharded run's parameters are new objects
    residuals = {named[n]: distributed.like(r, named[n]) for n, r in residuals.items() if n in named}
    opt = adamw(parameter_groups(prepared, model, params), cfg, residuals) if params else None
    del residuals
    later = prepared.unfreeze_at  # step -> [parameter names] that join the optimizer then
    if state:
        for at in sorted(later):
            if at < state["step"]:
                opt = _unfreeze(model, later[at], opt, cfg)
        checkpoint.restore(state, tensors, model, opt, prepared.training)
    eval_every = cfg.eval_every or math.ceil(cfg.steps / 5)  # at most five evaluations, also in short runs
    drawn = state["drawn"] if state else 0
    batches = blocks.batches(cfg.batch_size, cfg.seed, start=drawn)
    records = list(state["records"]) if state else []
    main = distributed.is_main()
    log = None
    if out and main:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "metrics.jsonl", "w")
        for r in records:  # a resumed run's file holds each step exactly once
            log.write(json.dumps(r) + "\n")
        log.flush()

    def emit(record):
        # JSON has no NaN or Infinity: a skipped step's non-finite numbers are written as null.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        records.append(record)
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if on_record and main:
            on_record(record)

    def evaluate() -> dict:
        found = {"eval_loss": held_out_loss(model, blocks, device, dtype, cfg.batch_size, forward=loss_module)}
        return found | (on_eval(model) if on_eval else {})

    world = distributed.world_size()
    tokens_per_step = cfg.batch_size * cfg.grad_accum * blocks.train_ids.shape[1]
    skipped = sum(1 for r in records if r.get("skipped"))
    step = first - 1
    try:
        with StopSignals() as signals, Progress(cfg.steps, show=show and main, done=first - 1) as bar:
            if eval_every > 0 and not state:
                bar.phase("evaluating before training")
                emit({"step": 0, **evaluate()})
                bar.phase(None)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for step in range(first, cfg.steps + 1):
                if step - 1 in later:
                    opt = _unfreeze(model, later[step - 1], opt, cfg)
                start = time.perf_counter()
                for group in opt.param_groups:  # a method may ask for its own multiplier (LoRA+)
                    group["lr"] = cfg.lr * group.get("lr_scale", 1.0) * lr_factor(step, cfg)
                loss_sum, term_sum = 0.0, None if not prepared.training else 0.0
                for _ in range(cfg.grad_accum):
                    ids, labels = next(batches)
                    drawn += 1
                    ids, labels = distributed.shard_rows(ids).to(device), distributed.shard_rows(labels).to(device)
                    with runtime.autocast(device, dtype):
                        total, count = runner(ids, labels)
                    if world > 1:  # weight by this process's share of the global batch's targets
                        loss = total * world / distributed.all_sum_tensor(count).clamp_min(1) / cfg.grad_accum
                        loss_sum += float(loss.detach()) / world
                    else:
                        loss = total / count.clamp_min(1) / cfg.grad_accum
                        loss_sum += float(loss.detach())
                    term = method_loss(prepared, model)  # a method's own term (AdaLoRA: orthogonality)
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
                loss_sum, stop = distributed.all_sum([loss_sum, float(signals.signum or 0)], device)
                finite = math.isfinite(loss_sum) and math.isfinite(norm)
                if finite:
                    opt.step()
                    for t in prepared.training:
                        t.after_step(model, step)
                elif cfg.skip_nonfinite:
                    skipped += 1
                else:
                    what = "loss" if not math.isfinite(loss_sum) else "gradient norm"
                    raise NonFinite(f"step {step}: the {what} is {loss_sum if what == 'loss' else norm}; training "
                                    f"stopped and no adapter was written. Lower --lr, check the strategy's numbers "
                                    f"and the data, or pass --skip-nonfinite to skip such steps")
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - start
                record = {
                    "step": step,
                    "loss": loss_sum,
                    "lr": opt.param_groups[0]["lr"],
                    "grad_norm": norm,
                    "step_time": dt,
                    "tokens_per_s": tokens_per_step / dt,
                    "peak_mem": runtime.peak_memory(device),
                }
                if term_sum:  # the task's loss stays "loss", comparable across strategies
                    record["method_loss"] = term_sum
                if not finite:
                    record |= {"skipped": True, "skipped_total": skipped}
                if eval_every > 0 and (step % eval_every == 0 or step == cfg.steps):
                    bar.phase("evaluating", step)
                    record |= evaluate()
                if on_step:
                    on_step(step, record, opt)
                emit(record)
                bar.update(record)
                stop = int(stop) and (signals.signum or _signal_of(stop))
                periodic = cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps
                saved = None
                if out and (periodic or stop):
                    bar.phase("checkpointing", step)
                    saved = checkpoint.save(out, step, model, opt, drawn, records, ident, cfg.keep_checkpoints,
                                            prepared.training)
                if stop:
                    raise Interrupted(stop, step, saved or (checkpoint.folder_of(out, step) if out else None))
    except RuntimeError as e:
        if distributed.world_size() > 1 and ("Connection" in str(e) or "closed" in str(e) or "peer" in str(e).lower()):
            raise RunFailed(f"another training process stopped during step {step} ({str(e).splitlines()[0][:100]}); "
                            f"no adapter was written; continue with --resume") from None
        raise
    finally:
        if log:
            log.close()
        if uncompile:
            uncompile()
    model.eval()
    if skipped and skipped >= cfg.steps:  # a run that learned nothing is not a success
        raise NonFinite(f"every one of the {cfg.steps} steps had a non-finite loss or gradient and was skipped; "
                        "nothing was learned and no adapter was written. Lower --lr, check the model's weights and the data")
    return records


def check_processes(prepared, cfg: TrainConfig) -> None:
    """Refuse a process layout a strategy step's training-time work cannot follow."""
    for t in prepared.training:
        if t.processes == "one" and distributed.world_size() > 1:
            raise UserError(f"{t.method} trains in one process only; drop --nproc / torchrun")
        if t.processes == "ddp" and cfg.fsdp:
            raise UserError(f"{t.method} needs whole tensors in every process; train it with DDP (drop --fsdp)")


def method_loss(prepared, model) -> torch.Tensor | None:
    """The sum of the loss terms the strategy's steps add, or None when none adds one."""
    terms = [t for t in (tr.loss(model) for tr in prepared.training) if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


def trained_dtype(cfg: TrainConfig) -> torch.dtype:
    """Trained weights are fp32 master copies, or bf16 themselves (compensated updates)."""
    return torch.bfloat16 if cfg.master_weights == "bf16-compensated" else torch.float32


def _signal_of(total: float) -> int:
    """The signal another process received, from the summed flags (SIGTERM wins)."""
    import signal

    return int(signal.SIGTERM) if total >= signal.SIGTERM else int(signal.SIGINT)


def adamw(params, cfg: TrainConfig, residuals=None) -> torch.optim.Optimizer:
    return optim.adamw(params, cfg.lr, cfg.weight_decay, cfg.master_weights, residuals)


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


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)

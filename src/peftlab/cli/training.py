"""`peftlab train`: one strategy, resumable, one output folder (run.json, metrics.jsonl, adapter/)."""

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import typer


from .. import outputs
from ..boundary import Exit
from ..errors import UserError

from .. import options as o

from . import app, out

@app.command()
def train(
    ctx: typer.Context,
    model: str = o.MODEL, data: str = o.DATA, strategy: str = o.STRATEGY,
    out_dir: Path = typer.Option(..., "--out", "-o", help="output folder: adapter/, metrics.jsonl, run.json, checkpoints/"),
    text_column: Optional[str] = o.TEXT_COLUMN, system: Optional[str] = o.SYSTEM,
    steps: int = o.STEPS, batch_size: int = o.BATCH_SIZE, seq_len: int = o.SEQ_LEN, lr: float = o.LR, warmup: float = o.WARMUP,
    seed: int = o.SEED, dtype: str = o.DTYPE, device: str = o.DEVICE, grad_accum: int = o.GRAD_ACCUM,
    eval_every: int = o.EVAL_EVERY, checkpoint_every: int = o.CHECKPOINT_EVERY,
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", help="keep the newest K checkpoints"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its newest checkpoint"),
    skip_nonfinite: bool = typer.Option(False, "--skip-nonfinite", help="skip a step whose loss or gradient is NaN/Inf instead of stopping"),
    nproc: int = typer.Option(1, "--nproc", help="train data-parallel in N processes (starts torchrun)"),
    fsdp: bool = typer.Option(False, "--fsdp", help="with several processes: shard the model (FSDP2) instead of replicating it (DDP)"),
    grad_checkpoint: bool = o.GRAD_CHECKPOINT, compile: Optional[bool] = o.COMPILE, base_precision: str = o.BASE_PRECISION,
    master_weights: str = o.MASTER_WEIGHTS, report_to: str = o.REPORT_TO, task: Optional[List[str]] = o.TASKS,
    overwrite: bool = o.OVERWRITE, quiet: bool = o.QUIET, config: Optional[Path] = o.CONFIG,
):
    """Train one strategy; write DIR/adapter/, DIR/metrics.jsonl and DIR/run.json."""
    from .. import checkpoint, distributed, methods, report_to as report_to_mod, runtime, tasks as tasks_mod
    from ..spec import split_lr

    strategy, lr = split_lr(strategy, lr)
    o.positive(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, grad_accum=grad_accum,
               keep_checkpoints=keep_checkpoints, nproc=nproc)
    o.at_least_zero(eval_every=eval_every, warmup=warmup, checkpoint_every=checkpoint_every)
    o.seed(seed)
    o.check_base_precision(base_precision)
    o.check_master_weights(master_weights, runtime.check_dtype(dtype) == runtime.DTYPES["bf16"])
    runtime.pick_device(device)
    methods.parse_strategy(strategy)
    report_to_mod.check(report_to)
    tasks = tasks_mod.load_all(task)  # every task item checked before a model loads
    if batch_size % max(nproc, distributed.world_size()):
        raise UserError(f"--batch-size {batch_size} must be a multiple of the {max(nproc, distributed.world_size())} "
                        "processes (each takes an equal share of every batch)")
    finished = _finished(out_dir)
    if resume and finished:
        out.print(f"the run in {out_dir} already finished; its adapter is {out_dir / 'adapter'}")
        return
    unfinished = checkpoint.latest(out_dir) if out_dir.is_dir() else None
    if not resume and unfinished and not finished and not overwrite:
        raise UserError(f"{out_dir} holds an unfinished run ({unfinished.name}); "
                        "add --resume to continue it, --overwrite to start it anew, or choose another --out")
    resume = resume and unfinished is not None  # --resume with nothing to resume starts the run (preemptible jobs always pass it)
    inputs = (model, data, config, strategy if strategy.endswith(".toml") else None, *(t.source for t in tasks))
    held = "a finished run, its adapter is " + str(out_dir / "adapter") if finished else ""
    policy = dict(inputs=inputs, overwrite=overwrite, continuing=resume, what_exists=held)
    ctx.obj["kept"] = lambda: (f"checkpoints in {out_dir} are kept: continue with --resume" if checkpoint.latest(out_dir)
                               else "nothing was written")
    if distributed.launched():
        # Under `peftlab train --nproc N` the launcher claimed --out and holds its lock; under a
        # torchrun started by hand, rank 0 claims it (the other ranks write nothing).
        if os.environ.get(CLAIMED) != str(outputs.real(out_dir)) and distributed.is_main():
            ctx.with_resource(outputs.claim(out_dir, **policy))
        return _train(ctx, out_dir, locals())
    with outputs.claim(out_dir, **policy):
        if nproc > 1:
            argv = _argv_without(ctx.obj["argv"], "--nproc")
            code, death = distributed.launch(nproc, argv, env={CLAIMED: str(outputs.real(out_dir))})
            if code:
                raise Exit(code, "" if code in (2, 130, 143) else
                            (death or f"a training process failed (exit {code}; its message is above)") + "; "
                            "no adapter was written"
                            + (f", checkpoints in {out_dir} are intact: continue with --resume" if checkpoint.latest(out_dir)
                               else ""))
            return
        return _train(ctx, out_dir, locals())


CLAIMED = "PEFTLAB_CLAIMED_OUT"  # set by the --nproc launcher for its workers: the --out it holds


def _train(ctx, out_dir: Path, a: dict):
    """The run itself, once --out is claimed: load and check everything, then write."""
    from .. import artifacts, checkpoint, distributed, int8, report_to as report_to_mod, run as run_mod, runtime
    from ..files import write_json
    from ..tasks.evaluate import Scorer, summary as task_summary
    from ..config import TrainConfig

    resume = a["resume"]
    cfg = TrainConfig(steps=a["steps"], batch_size=a["batch_size"], seq_len=a["seq_len"], lr=a["lr"], seed=a["seed"],
                      dtype=a["dtype"], device=a["device"], grad_accum=a["grad_accum"], eval_every=a["eval_every"],
                      warmup=a["warmup"], checkpoint_every=a["checkpoint_every"], keep_checkpoints=a["keep_checkpoints"],
                      skip_nonfinite=a["skip_nonfinite"], fsdp=a["fsdp"], grad_checkpoint=a["grad_checkpoint"],
                      compile=a["compile"], base_precision=a["base_precision"], master_weights=a["master_weights"])
    main_process = distributed.is_main()
    show = not a["quiet"] and main_process
    model, data, steps = a["model"], a["data"], a["steps"]
    # Everything that can fail on user input happens before the first byte is written.
    job = run_mod.load(model, data, cfg, show, text_column=a["text_column"], system=a["system"])
    base_bytes = sum(p.numel() * 4 for p in job.model.parameters())
    where = runtime.pick_device(cfg.device)
    scorer = Scorer(job.loaded, a["tasks"], cfg.seq_len, where, runtime.check_dtype(cfg.dtype, where))
    run_mod.prepare(job, a["strategy"])
    run_file = out_dir / "run.json"
    try:
        previous = json.loads(run_file.read_text()) if resume and run_file.is_file() else None
    except (ValueError, UnicodeDecodeError) as e:
        from ..errors import warn

        warn(f"{run_file} is damaged ({e}); it is written anew (the checkpoints are what resumes)")
        previous = None
    last = checkpoint.latest(out_dir) if resume else None
    resumed = previous.get("resumed", []) + [checkpoint.step_of(last) if last else 0] if previous else None
    run = run_mod.describe(job, {"text_column": a["text_column"], "system": a["system"]},
                           {t.name: t.source for t in a["tasks"]}, resumed)
    created = not out_dir.exists()
    # --overwrite: the old run moves aside in one rename and comes back if this one fails.
    aside = outputs.set_aside(out_dir) if main_process and a["overwrite"] and not resume else None
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_file, run)
    start = time.perf_counter()
    tracker = report_to_mod.Tracker(a["report_to"] if main_process else "none", out_dir / "tensorboard")
    try:
        records = run_mod.fit(job, out=out_dir, show=show, resume=resume, identity={"model": model, "data": data},
                              on_record=tracker.log, on_eval=scorer or None)
        folder = run_mod.save(job, out_dir / "adapter", show)
    except BaseException:
        if main_process and not resume and checkpoint.latest(out_dir) is None:
            _unwrite(out_dir, created or aside is not None)  # nothing to resume from: leave no trace of the failed run
            outputs.restore(aside, out_dir)
        else:
            outputs.drop(aside)  # the new run can be resumed: it replaces the old one, as --overwrite asked
        raise
    finally:
        tracker.close()
    outputs.drop(aside)
    if not main_process:
        return
    size = artifacts.size_on_disk(folder)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    int8_base = any(int8.is_int8(m) for m in job.loaded.model.modules())
    run["result"] = run_mod.result(records, time.perf_counter() - start, size, base_bytes,
                                   task_summary(scorer, records) if scorer else None, "int8" if int8_base else "float")
    run["finished_at"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    write_json(run_file, run)
    if evals:
        out.print(f"held-out loss {evals[0]:.4f} → {evals[-1]:.4f} in {steps} steps")
    for name, t in run["result"].get("tasks", {}).items():
        if "after" in t:
            out.print(f"task {name}: accuracy {t['before']:.3f} → {t['after']:.3f} ({t['n']} items)")
    out.print(f"adapter: {folder} ({size / 1e6:.2f} MB; the full model is {base_bytes / 1e6:.1f} MB in fp32)")


def _unwrite(folder: Path, created: bool) -> None:
    """Remove what a failed run wrote: the whole folder if the run made it, else its own files."""
    import shutil

    if created:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for name in ("run.json", "metrics.jsonl"):
        (folder / name).unlink(missing_ok=True)
    for name in ("tensorboard", "checkpoints", "adapter"):
        shutil.rmtree(folder / name, ignore_errors=True)


def _finished(folder: Path) -> bool:
    """True when `folder` holds a run that completed (its run.json has a result)."""
    try:
        return "result" in json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return False


def _argv_without(argv: list[str], option: str) -> list[str]:
    """`argv` with `option VALUE` / `option=VALUE` removed."""
    outv, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            outv.append(a)
    return outv

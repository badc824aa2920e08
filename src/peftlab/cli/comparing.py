"""`peftlab compare`, `bench` and `report`: strategies side by side, peftlab against peft, and the page."""

import json
from pathlib import Path
from typing import List, Optional

import typer


from .. import outputs
from ..errors import UserError

from .. import options as o

from . import app, out

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
    from .. import data as data_mod, models, report_to as report_to_mod, run as run_mod, runtime, tasks as tasks_mod
    from ..tasks.score import encode
    from ..config import TrainConfig
    from ..workbench import compare as run_compare

    o.positive(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, grad_accum=grad_accum, samples=samples,
               gen_tokens=gen_tokens)
    o.at_least_zero(eval_every=eval_every, warmup=warmup)
    o.seed(seed)
    o.check_base_precision(base_precision)
    o.check_master_weights(master_weights, runtime.check_dtype(dtype) == runtime.DTYPES["bf16"])
    runtime.pick_device(device)
    report_to_mod.check(report_to)
    from ..methods import parse_strategy
    from ..spec import split_lr

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
    from ..bench import CONFIGS, markdown, run_bench, write_results
    from ..bench.inference import inference_latency

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

    from .. import data as data_mod, models, runtime

    if not dtype:
        dtype = ["fp32", "bf16"] if runtime.native_bf16(torch.device("cpu")) else ["fp32"]
        if len(dtype) == 1:
            out.print("bf16 is emulated on this CPU (no AVX-512 BF16 / AMX): benchmarking fp32 only (--dtype bf16 forces it)")
    if curves:
        from ..bench.curves import MODELS, SEQ_LENS, markdown as curve_markdown, run_curves, write_curves

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
    from ..files import write_text
    from ..workbench.report import markdown_table, page, rows
    from ..workbench.runs import collect

    with outputs.claim(out_file, inputs=folders, overwrite=overwrite, kind="file"):
        summary = collect(folders, allow_mixed)
        write_text(out_file, page(summary, title))
    print(markdown_table(rows(summary)))
    out.print(f"report: {out_file.resolve()}")

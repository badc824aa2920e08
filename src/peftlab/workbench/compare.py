"""`compare`: several strategies from byte-identical weights on the same batches, side by side.

Each strategy runs in a fresh process (`worker.py`), so its peak memory is its own and not
the maximum of the whole comparison. Results land in DIR/strategies/<slug>/result.json; a
rerun skips strategies whose result matches the same job, so an interrupted comparison
resumes where it stopped.
"""

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from ..files import write_json
from ..boundary import Exit
from ..interrupt import Stop
from ..outputs import lock
from ..methods import parse_strategy
from ..report_to import replay
from ..spec import split_lr
from ..config import TrainConfig

FORGET = {"moby-dick": "alice", "alice": "moby-dick"}


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec).strip("_")[:80] or "strategy"


def compare(model: str, data: str, strategies: list, out: Path, config: TrainConfig, forget: str | None = "auto",
            samples: int = 3, gen_tokens: int = 48, prompt_tokens: int = 16, show: bool = True, log=print,
            data_options: dict | None = None, report_to: str = "none", overwrite: bool = False,
            tasks: list | None = None) -> dict:
    """Run every strategy (resuming finished ones), then write results.json, summary.md, report.html.

    A finished strategy run with other settings is replaced only with `overwrite`."""
    from .report import write_report

    if not strategies:
        raise UserError("give at least one --strategy")
    jobs = []
    for entry in strategies:
        spec, lr = split_lr(entry, config.lr)
        parse_strategy(spec)  # fail fast, before any process starts
        jobs.append((entry, spec, lr))
    if len({slug(e) for e, _, _ in jobs}) != len(jobs):
        raise UserError("the same strategy is listed twice")
    forget = FORGET.get(data) if forget == "auto" else forget
    out = Path(out)
    planned = []  # (entry, folder, job, reuse): every clash is found before anything trains
    for entry, spec, lr in jobs:
        folder = out / "strategies" / slug(entry)
        job = {"model": model, "data": data, "strategy": spec, "label": entry, "forget": forget,
               "config": asdict(config) | {"lr": lr}, "samples": samples, "gen_tokens": gen_tokens,
               "prompt_tokens": prompt_tokens, "show": show, "report_to": report_to,
               "tensorboard": str(out / "tensorboard" / slug(entry))}
        if data_options and any(v is not None for v in data_options.values()):
            job["data_options"] = data_options
        if tasks:
            job["tasks"] = list(tasks)
        done = folder / "result.json"
        saved = _read(folder / "job.json") if (folder / "job.json").is_file() else None
        reuse = done.exists() and saved is not None and _same_job(saved, job)
        if done.exists() and not reuse and not overwrite:
            raise UserError(f"{out} already holds strategy '{entry}' run with other settings; add --overwrite to "
                            "replace it, or choose another --out")
        planned.append((entry, folder, job, reuse))
    results = []
    for i, (entry, folder, job, reuse) in enumerate(planned, 1):
        done = folder / "result.json"
        if reuse:
            log(f"[{i}/{len(jobs)}] {entry}: already done, reusing {done}")
            results.append(_read(done))
            if report_to != "none" and not Path(job["tensorboard"]).exists():  # logged from its metrics instead
                replay(report_to, folder / "metrics.jsonl", Path(job["tensorboard"]))
            continue
        with lock(folder, flag=f"the strategy folder of '{entry}' in") as held:
            folder.mkdir(parents=True, exist_ok=True)
            done.unlink(missing_ok=True)
            write_json(folder / "job.json", job)
            log(f"[{i}/{len(jobs)}] {entry}")
            code, last = _work(folder / "job.json", held)
        if code in (130, 143):
            raise Stop(code - 128)
        if code == 1:  # the worker hit a bug: it named its traceback file
            raise Exit(1, f"strategy '{entry}': {last.removeprefix('peftlab: ')}")
        if code != 0:
            raise UserError(f"strategy '{entry}' failed: {last.removeprefix('peftlab: error: ')}")
        results.append(_read(done))
    digests = {r["initial_weights_sha256"] for r in results}
    summary = {"model": model, "data": data, "forget": forget, "strategies": results,
               "identical_initial_weights": len(digests) == 1, "config": asdict(config)}
    write_json(out / "results.json", summary)
    write_report(summary, out)
    return summary


def _read(path: Path):
    """A comparison's own JSON file; a damaged one is one line, not a traceback."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}); remove it to run that strategy again, or use --overwrite") from None


def _work(job: Path, lock_fd: int) -> tuple[int, str]:
    """Run one worker in its own process group, holding the strategy folder's lock with us;
    a signal to `compare` is passed on to it, and it dies with us (PR_SET_PDEATHSIG) rather
    than train on as an orphan. Returns (exit code, its last stderr line)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "peftlab.workbench.worker", str(job)], stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True, pass_fds=(lock_fd,), preexec_fn=_die_with_parent())
    try:
        _, err = proc.communicate()
    except BaseException as e:  # Stop (SIGTERM/SIGINT), KeyboardInterrupt: pass it on, wait for the checkpoint
        signum = getattr(e, "signum", signal.SIGINT)
        try:
            os.killpg(proc.pid, signum)
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()  # gone before the lock is released
        except ProcessLookupError:
            pass
        raise
    lines = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
    return proc.returncode, lines[-1] if lines else f"exit code {proc.returncode}"


def _die_with_parent():
    """A function for the child to run between fork and exec, asking Linux for SIGTERM when the
    parent dies (PR_SET_PDEATHSIG = 1); prctl is looked up here, in the parent, because the
    child must not import anything there. None where there is no such call."""
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)


DISPLAY_ONLY = {"show", "report_to", "tensorboard"}  # what changes the output shown, not what is measured


def _same_job(saved: dict, job: dict) -> bool:
    """Equal jobs, where a training option added since `saved` was written counts at its
    default and display-only options do not count."""
    if isinstance(saved.get("config"), dict):
        saved = saved | {"config": asdict(TrainConfig()) | saved["config"]}

    def key(j):
        return {k: v for k, v in j.items() if k not in DISPLAY_ONLY}

    return key(saved) == key(job)

"""Finished runs, gathered from their folders into one report: comparisons (results.json) and
single `train` runs (run.json + metrics.jsonl), made on any day.

Each entry keeps where it came from, when it finished, the versions and the configuration it
ran with. Runs of different models or data do not belong in one comparison: they are refused,
naming the difference, unless the caller allows a mixed report.
"""

import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserError


def _stamp(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e})") from None


def _jsonl(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a damaged line (a run killed mid-write, two writers, NUL
    bytes) is one error naming the line."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise UserError(f"{path} is damaged at line {n} (not a JSON object); this run's metrics cannot be reported")
        out.append(record)
    return out


def _comparison(folder: Path) -> tuple[dict, list[dict]]:
    summary = _read_json(folder / "results.json")
    entries = []
    for r in summary["strategies"]:
        entries.append(r | {"source": str(folder), "finished_at": r.get("finished_at") or _stamp(folder / "results.json")})
    return {"model": summary["model"], "data": summary["data"], "forget": summary.get("forget")}, entries


def _train_run(folder: Path) -> tuple[dict, list[dict]]:
    run = _read_json(folder / "run.json")
    if "result" not in run:
        raise UserError(f"{folder} holds an unfinished train run (no result in run.json); finish it with --resume first")
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing")
    records = _jsonl(path)
    steps = [r for r in records if "step_time" in r]
    times = [r["step_time"] for r in steps]
    entry = {
        "label": run["strategy"], "spec": run["strategy"], "source": str(folder),
        "finished_at": run.get("finished_at") or _stamp(folder / "run.json"),
        "config": run["config"], "versions": run.get("versions"), "hardware": run.get("hardware"),
        "trainable": run.get("trainable"), "total": run.get("total"),
        "train_loss": [[r["step"], r["loss"]] for r in steps], "eval_loss": [[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r],
        "lr": [[r["step"], r["lr"]] for r in steps], "grad_norm": [[r["step"], r["grad_norm"]] for r in steps],
        "step_time_s": times, "step_time_median_s": statistics.median(times) if times else None,
        "tokens_per_s": [r["tokens_per_s"] for r in steps], "peak_memory_bytes": max((r.get("peak_mem") or 0 for r in steps), default=None),
        "memory_kind": "process peak RSS (VmHWM)", "artifact_bytes": run["result"].get("adapter_bytes"),
        "tasks": run["result"].get("tasks") or {},
    }
    return {"model": run["model"], "data": run["data"], "forget": None}, [entry]


def collect(folders: list, allow_mixed: bool = False) -> dict:
    """One report summary from finished comparison and train folders."""
    if not folders:
        raise UserError("give at least one folder: a comparison (results.json) or a train run (run.json)")
    meta, entries = [], []
    for folder in map(Path, folders):
        if (folder / "results.json").is_file():
            file, read = folder / "results.json", _comparison
        elif (folder / "run.json").is_file():
            file, read = folder / "run.json", _train_run
        else:
            raise UserError(f"{folder} is neither a comparison (results.json) nor a train run (run.json)")
        try:
            m, e = read(folder)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as err:
            what = f"'{err.args[0]}'" if isinstance(err, KeyError) else "the fields peftlab writes"
            raise UserError(f"{file} lacks {what}; is it a finished peftlab run?") from None
        meta.append((folder, m))
        prefix = f"{folder.name}: " if len(folders) > 1 else ""
        entries += [x | {"label": prefix + x["label"]} for x in e]
    first_folder, first = meta[0]
    for key in ("model", "data"):
        for folder, m in meta[1:]:
            if m[key] != first[key] and not allow_mixed:
                raise UserError(f"{folder} was trained with {key} {m[key]}, {first_folder} with {first[key]}; "
                                f"pass --allow-mixed to put them in one report")
    seen = {}
    for e in entries:  # labels must be unique: colours and tables key on them
        n = seen[e["label"]] = seen.get(e["label"], 0) + 1
        if n > 1:
            e["label"] = f"{e['label']} ({n})"
    digests = {e.get("initial_weights_sha256") for e in entries}

    def common(key):
        values = {m[key] for _, m in meta}
        return values.pop() if len(values) == 1 else "mixed: " + ", ".join(sorted(map(str, values)))

    return {"model": common("model"), "data": common("data"), "forget": common("forget"), "strategies": entries,
            "identical_initial_weights": (len(digests) == 1) if None not in digests else "—", "config": {}}

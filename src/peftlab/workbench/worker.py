"""One strategy of a comparison, run in its own process so its peak memory is its own.

    python -m peftlab.workbench.worker JOB.json

JOB.json names the model, data, strategy and training config; the worker writes
`result.json` (every measurement), `metrics.jsonl` and `adapter/` beside it.
"""

import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from dataclasses import fields
from pathlib import Path

import torch

from .. import artifacts, data, methods, models, run as run_mod, runtime
from ..files import write_json
from ..params import storage_bytes
from ..params import count
from ..progress import phase
from ..report_to import Tracker
from ..tasks import load_all
from ..tasks.evaluate import Scorer, summary as task_summary
from ..config import TrainConfig
from ..loss import held_out_loss
from .style import greedy_text, style_share, top_tokens
from .tracking import WeightTracker


def weights_digest(model) -> str:
    """SHA-256 of every parameter's bytes: proof that strategies start from identical weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def optimizer_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def run(job: dict, folder: Path, show: bool = True) -> dict:
    cfg = TrainConfig(**{f.name: job["config"][f.name] for f in fields(TrainConfig) if f.name in job["config"]})
    device = runtime.pick_device(cfg.device)
    dtype = runtime.check_dtype(cfg.dtype, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    r = run_mod.load(job["model"], job["data"], cfg, show, **job.get("data_options", {}))
    loaded, blocks = r.loaded, r.blocks
    digest = weights_digest(loaded.model)
    forget = data.load_blocks(loaded, job["forget"], cfg.seq_len, held_out=1.0, max_held=16) if job.get("forget") else None
    top = top_tokens(blocks.train_ids)
    prompt = blocks.held_ids[:1, : job["prompt_tokens"]].to(device)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.tokenizer.eos_token_id
    scorer = Scorer(loaded, load_all(job.get("tasks")), cfg.seq_len, device, dtype)
    prepared = run_mod.prepare(r, job["strategy"]).prepared
    will_train = set(methods.trainable_parameters(loaded.model)) | {n for v in prepared.unfreeze_at.values() for n in v}
    loaded.model.to(device)

    def measure():
        with runtime.autocast(device, dtype):
            out = {"style": style_share(loaded.model, prompt, top, job["gen_tokens"], job["samples"], pad),
                   "sample": greedy_text(loaded, prompt, job["gen_tokens"])}
            if forget is not None:
                out["forget_loss"] = held_out_loss(loaded.model, forget, device, dtype, cfg.batch_size)
        return out

    with phase("sampling and scoring before training (style, forgetting)", show):
        before = measure()
    tracker = WeightTracker(loaded.model, will_train)
    opt_bytes = [0]

    board = Tracker(job.get("report_to", "none"), Path(job.get("tensorboard", folder / "tensorboard")))

    def on_step(step, record, opt):
        record["track_time"] = tracker.step(opt)
        opt_bytes[0] = max(opt_bytes[0], optimizer_bytes(opt))

    start = time.perf_counter()
    try:
        records = run_mod.fit(r, out=folder, show=show, on_step=on_step, on_record=board.log, on_eval=scorer or None)
    finally:
        board.close()
    total = time.perf_counter() - start
    train_peak = max(r.get("peak_mem", 0) for r in records)
    with phase("sampling and scoring after training", show):
        after = measure()
    adapter = run_mod.save(r, folder / "adapter", show)
    initial = dict(models.load(job["model"], seed=cfg.seed).model.named_parameters())  # W_0, after the peak
    steps = [r for r in records if "step_time" in r]
    counts = count(loaded.model)
    return {
        "strategy": job["strategy"], "spec": prepared.spec, "label": job["label"], "config": job["config"],
        "initial_weights_sha256": digest, "trainable": counts["total"][0], "total": counts["total"][1],
        "by_component": {k: list(v) for k, v in counts.items()}, "stored_weight_bytes": storage_bytes(loaded.model),
        "time_total_s": total, "step_time_s": [r["step_time"] for r in steps],
        "step_time_median_s": sorted(r["step_time"] for r in steps)[len(steps) // 2],
        "tokens_per_s": [r["tokens_per_s"] for r in steps], "peak_memory_bytes": train_peak,
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS (VmHWM)",
        "optimizer_state_bytes": opt_bytes[0],
        "train_loss": [[r["step"], r["loss"]] for r in steps],
        "lr": [[r["step"], r["lr"]] for r in steps], "grad_norm": [[r["step"], r["grad_norm"]] for r in steps],
        "eval_loss": [[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r],
        "tasks": task_summary(scorer, records),
        "weight_change": {"step": tracker.steps, "drift": tracker.final_drift(initial),
                          "tracking_s": tracker.seconds,
                          "tracking_share_of_step_time": tracker.seconds / max(1e-9, sum(r["step_time"] for r in steps))},
        "style": {"before": before["style"], "after": after["style"], "top100_prompt_tokens": job["prompt_tokens"],
                  "generated_tokens": job["gen_tokens"]},
        "forgetting": {"data": job.get("forget"), "before": before.get("forget_loss"), "after": after.get("forget_loss")},
        "samples": {"prompt": loaded.tokenizer.decode(prompt[0]), "before": before["sample"], "after": after["sample"]},
        "artifact_bytes": artifacts.size_on_disk(adapter), "artifact_format": artifacts.kind(adapter),
        "hardware": runtime.hardware(device), "versions": runtime.versions(), "pid": os.getpid(),
        "finished_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def main(argv=None) -> int:
    """Run JOB.json; the `compare` that started this process holds the strategy folder's lock
    (this process inherits it, so an orphaned worker still keeps a rerun out)."""
    from ..errors import UserError
    from ..interrupt import Interrupted, Stop, stop_on_signals

    job_path = Path((argv or sys.argv[1:])[0])
    try:
        with stop_on_signals():
            job = json.loads(job_path.read_text())
            result = run(job, job_path.parent, show=job.get("show", True))
            write_json(job_path.parent / "result.json", result)
    except UserError as e:
        print(f"peftlab: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"peftlab: {e}", file=sys.stderr)
        return e.exit_code
    except Stop as e:
        return 128 + e.signum
    except Exception:  # noqa: BLE001  (a bug: its traceback saved, its file named on the last line)
        from ..boundary import bug

        return bug([str(job_path)])
    return 0


if __name__ == "__main__":
    sys.exit(main())

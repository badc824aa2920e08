"""Task accuracy during a run: scored at every held-out evaluation (the training loop's
`on_eval` hook), summarised per task for run.json, results.json and the report."""

import torch

from .. import runtime
from . import score as score_mod


def key(name: str) -> str:
    """The metrics.jsonl key of a task's accuracy."""
    return f"task/{name}"


class Scorer:
    """Encodes every task once (checking each item fits `seq_len`), then scores a model on all
    of them when called; keeps the per-item results of the first and the latest call."""

    def __init__(self, loaded, tasks: list, seq_len: int | None, device, dtype):
        self.tasks, self.device, self.dtype, self.loaded = tasks, device, dtype, loaded
        self.rows = [score_mod.encode(loaded, t.items, seq_len) for t in tasks]
        self.first, self.last = {}, {}

    def __bool__(self):
        return bool(self.tasks)

    def __call__(self, model) -> dict:
        was_training = model.training
        model.eval()
        out = {}
        try:
            with runtime.autocast(self.device, self.dtype), torch.no_grad():
                for task, rows in zip(self.tasks, self.rows):
                    result = score_mod.score(model, task.items, rows, self.device, self.loaded, task.match)
                    self.first.setdefault(task.name, result)
                    self.last[task.name] = result
                    out[key(task.name)] = result["accuracy"]
                    if "acc_norm" in result:
                        out[key(task.name) + "/acc_norm"] = result["acc_norm"]
        finally:
            model.train(was_training)
        return out


def summary(scorer: Scorer, records: list) -> dict:
    """{task: {kind, source, n, curve [[step, acc]], before, after, correct (per item, after),
    correct_before, and acc_norm's the same for multiple choice}}."""
    out = {}
    for task in scorer.tasks:
        k = key(task.name)
        entry = {"kind": task.kind, "source": task.source, "match": task.match, "n": len(task.items),
                 "curve": [[r["step"], r[k]] for r in records if k in r]}
        first, last = scorer.first.get(task.name), scorer.last.get(task.name)
        if first and last:
            entry |= {"before": first["accuracy"], "after": last["accuracy"],
                      "correct_before": first["correct"], "correct": last["correct"]}
            if "acc_norm" in last:
                entry |= {"norm_curve": [[r["step"], r[k + "/acc_norm"]] for r in records if k + "/acc_norm" in r],
                          "acc_norm_before": first["acc_norm"], "acc_norm_after": last["acc_norm"],
                          "correct_norm": last["correct_norm"]}
        out[task.name] = entry
    return out

"""--report-to tensorboard mirrors metrics.jsonl, for train and for each strategy of compare."""

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from peftlab.config import TrainConfig
from peftlab.workbench import compare


def scalars(folder) -> dict:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_writes_every_step_to_tensorboard(cli, text_file, tmp_path):
    code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "-s", "lora:r=2", "--steps", 4, "--seq-len", 32,
                       "--eval-every", 2, "--quiet", "--report-to", "tensorboard", "-o", tmp_path / "run")
    assert code == 0, err
    got = scalars(tmp_path / "run" / "tensorboard")
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "eval/loss", "train/learning_rate", "train/grad_norm", "perf/tokens_per_s",
            "perf/peak_memory_mb"} <= set(got)
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4] and [s for s, _ in got["eval/loss"]] == [0, 2, 4]
    for (step, value), r in zip(got["train/loss"], records[1:]):
        assert abs(value - r["loss"]) < 1e-6
    code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "--report-to", "wandb", "-o", tmp_path / "x")
    assert code == 2 and "--report-to must be one of none, tensorboard" in err


def test_compare_writes_one_tensorboard_run_per_strategy(tmp_path, text_file):
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=32)
    kw = dict(forget=None, samples=1, gen_tokens=4, show=False, log=lambda *a: None)
    compare("tiny-llama", str(text_file), ["full", "lora:r=2@1e-2"], tmp_path / "cmp", cfg, **kw)
    board = tmp_path / "cmp" / "tensorboard"
    assert not board.exists()  # only when asked for
    compare("tiny-llama", str(text_file), ["full", "lora:r=2@1e-2"], tmp_path / "cmp", cfg, report_to="tensorboard", **kw)
    # reused strategies (display options do not retrain) are written from their metrics.jsonl
    assert sorted(p.name for p in board.iterdir()) == ["full", "lora_r=2_1e-2"]
    for run in board.iterdir():
        assert [s for s, _ in scalars(run)["train/loss"]] == [1, 2, 3]
    compare("tiny-llama", str(text_file), ["adapter:r=2"], tmp_path / "cmp2", cfg, report_to="tensorboard", **kw)
    assert [s for s, _ in scalars(tmp_path / "cmp2" / "tensorboard" / "adapter_r=2")["train/loss"]] == [1, 2, 3]


def test_task_accuracy_from_a_toml_config_reaches_tensorboard(cli, tmp_path):
    """--task given in the run config (a list), scored at each evaluation, logged as task/NAME."""
    config = tmp_path / "run.toml"
    config.write_text('model = "tiny-llama"\ndata = "arith:digits=1"\ntask = ["sums=arith:digits=1"]\n'
                      'steps = 4\nseq-len = 64\neval-every = 2\n')
    code, _, err = cli("train", "--config", config, "-o", tmp_path / "run", "--report-to", "tensorboard", "--quiet")
    assert code == 0, err
    assert [s for s, _ in scalars(tmp_path / "run" / "tensorboard")["task/sums"]] == [0, 2, 4]

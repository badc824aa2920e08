"""torch.distributed: N processes compute what one process computes, only rank 0 writes, and a
process that dies fails the job without a partial save. 2-process gloo runs on the CPU."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file

from test_train_resume import peftlab, wait_for_step

STRATEGIES = ["lora:r=4", "dora:r=4", "freeze-attention", "full"]
HELPER = Path(__file__).parent / "helpers" / "distributed_train.py"


def tensors(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def assert_same_run(one, two, what):
    for a, b in zip(one, two, strict=True):
        assert a["step"] == b["step"]
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (what, a["step"], key, a[key], b[key])


def test_two_processes_train_what_one_process_trains(text_file, tmp_path):
    """DDP and FSDP2 with 2 processes against 1 process: equal losses (1e-5) and adapters (1e-6)."""
    from peftlab import TrainConfig, artifacts, load_blocks, load_model, prepare, train

    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(HELPER), str(tmp_path), str(text_file), *STRATEGIES],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for i, spec in enumerate(STRATEGIES):
        loaded = load_model("tiny-llama")
        prepared = prepare(loaded.model, spec)
        cfg = TrainConfig(steps=4, seq_len=32, batch_size=4, lr=1e-4, eval_every=2)
        one = train(loaded.model, load_blocks(loaded, str(text_file), 32), prepared, cfg, show=False)
        single = tensors(artifacts.save(loaded.model, prepared, tmp_path / f"one-{i}" / "adapter"))
        for mode in ("ddp", "fsdp"):
            two = json.loads((tmp_path / f"{mode}-{i}" / "losses.json").read_text())
            assert_same_run(one, two, f"{spec} {mode}")
            shared = tensors(tmp_path / f"{mode}-{i}" / "adapter")
            assert shared.keys() == single.keys() and shared, (spec, mode)
            for k in single:
                assert shared[k].shape == single[k].shape and shared[k].numel() > 0
                torch.testing.assert_close(shared[k], single[k], atol=1e-6, rtol=0, msg=f"{spec} {mode} {k}")


def test_nproc_from_the_command_line_and_resume_distributed(text_file, tmp_path):
    args = ["train", "-m", "tiny-llama", "-d", text_file, "-s", "lora:r=4", "--seq-len", 32, "--steps", 6,
            "--lr", 3e-3, "--quiet"]
    one = peftlab(*args, "-o", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    # Two processes; rank 0 is killed in the middle of writing the step-3 checkpoint.
    run = tmp_path / "two"
    killed = peftlab(*args, "-o", run, "--nproc", 2, "--fsdp", "--checkpoint-every", 1,
                     env={"PEFTLAB_FAULT": "checkpoint-write:3"})
    assert killed.returncode != 0 and not (run / "adapter").exists()
    resumed = peftlab(*args, "-o", run, "--nproc", 2, "--fsdp", "--checkpoint-every", 1, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "adapter:" in resumed.stdout and resumed.stdout.count("adapter:") == 1  # rank 0 alone reports
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(7))
    assert_same_run([json.loads(ln) for ln in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()], lines, "cli")
    a, b = tensors(tmp_path / "one" / "adapter"), tensors(run / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert json.loads((run / "run.json").read_text())["processes"] == 2


def _pid_of(tag: str, rank: int, limit: float = 120) -> int | None:
    """The process whose environment holds PEFTLAB_TEST_TAG=tag and RANK=rank."""
    deadline = time.time() + limit
    want = {f"PEFTLAB_TEST_TAG={tag}".encode(), f"RANK={rank}".encode()}
    while time.time() < deadline:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    env = set((entry / "environ").read_bytes().split(b"\0"))
                except OSError:
                    continue
                if want <= env:
                    return int(entry.name)
        time.sleep(0.2)
    return None


def test_a_process_that_dies_fails_the_job_and_nothing_is_saved(text_file, tmp_path):
    tag = uuid.uuid4().hex
    run = tmp_path / "run"
    proc = peftlab("train", "-m", "tiny-llama", "-d", text_file, "-s", "lora:r=8,targets=all-linear", "--seq-len", 64,
                   "--batch-size", 8, "--steps", 400, "--quiet", "-o", run, "--nproc", 2, "--checkpoint-every", 5,
                   env={"PEFTLAB_TEST_TAG": tag}, wait=False)
    wait_for_step(proc, run, 6)
    pid = _pid_of(tag, 1)
    assert pid, "rank 1 not found"
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode not in (0, None)
    last = err.strip().splitlines()[-1]  # the launcher's own line, whatever rank 0 managed to say before it
    assert "failed" in last and "--resume" in last, err
    assert not (run / "adapter").exists()
    assert "result" not in json.loads((run / "run.json").read_text())
    # What was checkpointed is complete and resumable.
    assert all((c / "state.json").exists() for c in (run / "checkpoints").iterdir() if not c.name.startswith("."))


def test_batch_must_split_evenly_between_processes(cli, text_file, tmp_path):
    code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "--batch-size", 4, "--nproc", 3, "-o", tmp_path / "x")
    assert code == 2 and "multiple of the 3 processes" in err
    assert not (tmp_path / "x").exists()


def test_uneven_loss_masks_weight_each_process_by_its_tokens(tmp_path):
    """Chat records learn only assistant tokens, so the two halves of a batch hold different
    numbers of targets: each process's loss is weighted by its share, and 2 processes still
    compute the 1-process loss (a plain mean of the two halves would not)."""
    rows = []
    for i in range(40):
        answer = "Ahab." if i % 2 else "The white whale, whose name is Moby Dick, and the ship is the Pequod." * 2
        rows.append({"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answer}]})
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    args = ["train", "-m", "tiny-llama", "-d", data, "-s", "lora:r=4", "--seq-len", 48, "--steps", 4, "--lr", 1e-3,
            "--eval-every", 2, "--quiet"]
    one = peftlab(*args, "-o", tmp_path / "one")
    two = peftlab(*args, "-o", tmp_path / "two", "--nproc", 2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr[-2000:]
    read = lambda d: [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert_same_run(read(tmp_path / "one"), read(tmp_path / "two"), "chat")


def test_the_launcher_reports_the_first_failure_not_the_teardown():
    """One worker refuses (2) and torchrun stops the other (143): the user sees 2, as with one
    process. A signal we passed on is 128 + its number; a crash (1) wins over a refusal; a worker
    that died without reporting (SIGKILL, out of memory) while torchrun stopped the other (143)
    is a failure (1), not a stop."""
    from peftlab.distributed import exit_code

    assert exit_code(1, None, {0: 2, 1: 143}, 2) == 2
    assert exit_code(1, None, {0: 2}, 2) == 2  # the other was stopped before it could report
    assert exit_code(1, None, {0: 1, 1: 2, 2: 143}, 3) == 1
    assert exit_code(1, None, {0: 143}, 2) == 1  # rank 1 was killed; torchrun then stopped rank 0
    assert exit_code(1, None, {0: 143, 1: 143}, 2) == 143  # both were sent SIGTERM directly
    assert exit_code(1, signal.SIGTERM, {0: 143}, 2) == 128 + signal.SIGTERM
    assert exit_code(0, None, {0: 0, 1: 0}, 2) == 0
    assert exit_code(1, None, {}, 2) == 1  # no worker got as far as writing its code


def test_torchruns_report_is_dropped_but_a_workers_last_line_inside_it_is_kept():
    """torchrun and the workers share one pipe: when torchrun stops rank 0 after rank 1 died,
    rank 0's own line can land after torchrun's first glog line. It must still reach the user,
    and torchrun's account of the dead worker is read, not shown."""
    from peftlab.distributed import _death, worker_lines

    lines = ["peftlab: warning: a\n", "peftlab: warning: a\n",
             "W1203 09:30:00.1 77 torch/distributed/elastic/multiprocessing/api.py:1029] Sending process 9 closing signal SIGTERM\n",
             "E1203 09:30:01.2 77 torch/distributed/elastic/multiprocessing/api.py:1003] failed (exitcode: -9) local_rank: 1 "
             "(pid: 8) of binary: python\n",
             "peftlab: stopped by SIGTERM; checkpoints in run are kept: continue with --resume\n",
             "Traceback (most recent call last):\n", '  File "x.py", line 1\n',
             "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"]
    died = {}
    assert list(worker_lines(iter(lines), died)) == [lines[0], lines[4]]
    assert died == {1: -9}
    assert _death(1, died[1]) == "training process 1 failed (killed by SIGKILL, without a message of its own)"
    assert _death(1, None) == "training process 1 failed (it ended, without a message of its own)"

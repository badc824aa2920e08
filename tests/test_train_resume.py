"""A run survives: SIGKILL at any moment (also mid-checkpoint), SIGTERM or Ctrl-C, then
--resume gives the same adapter, byte for byte, as a run that was never interrupted."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file


def peftlab(*args, env=None, wait=True):
    """`python -m peftlab ARGS` in a fresh process (a kill must not take the test with it)."""
    cmd = [sys.executable, "-m", "peftlab", *map(str, args)]
    full_env = dict(os.environ, **(env or {}))
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)


def finish(proc) -> subprocess.CompletedProcess:
    """Wait for a process started with wait=False. A reference run is started beside the run under test: its
    arithmetic does not depend on what else the machine runs, and most of a tiny run's time is importing torch."""
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def tensor_digests(folder) -> dict:
    """sha256 of every saved tensor's bytes."""
    files = [f for f in folder.iterdir() if f.suffix == ".safetensors"]
    assert files, f"no tensors in {folder}"
    return {k: hashlib.sha256(v.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()).hexdigest()
            for f in files for k, v in load_file(str(f)).items()}


def steps_logged(folder) -> list[int]:
    return [json.loads(ln)["step"] for ln in (folder / "metrics.jsonl").read_text().splitlines()]


def wait_for_step(proc, folder, step: int, limit: float = 300) -> None:
    """Poll metrics.jsonl until it holds `step` (or the process ends)."""
    deadline = time.time() + limit
    path = folder / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and sum(1 for ln in path.read_text().splitlines() if ln.endswith("}")) > step:
            return
        time.sleep(0.002)


BASE = ["train", "-m", "tiny-llama", "--seq-len", 32, "--batch-size", 4, "--lr", 3e-3, "--quiet"]

CASES = {
    "lora-fp32": ["-s", "lora:r=4,dropout=0.1", "--steps", 8],  # dropout: the RNG state must come back too
    "lora-bf16": ["-s", "lora:r=4", "--steps", 8, "--dtype", "bf16"],
    "freeze-bf16-compile": ["-s", "freeze:train=mlp+norm", "--steps", 6, "--dtype", "bf16", "--compile"],
    "schedule": ["-s", "schedule:mlp=0,attention=5", "--steps", 8],  # attention unfreezes after the kill
    # killed while the rank budget falls (steps 2-5); its scores and masks must come back
    "adalora": ["-s", "adalora:r=4,target_r=2,tinit=1,tfinal=2", "--steps", 8],
    # inits from the training data: a resume reads the same batches and rebuilds the same start
    "eva": ["-s", "lora:r=4,init=eva,eva_tau=0.9", "--steps", 6],
    "corda": ["-s", "lora:r=4,init=corda,calibration_batches=4", "--steps", 6],
    # the int8 base's outlier channels are read from the training data again on resume: the same base
    "lora-int8": ["-s", "lora:r=4", "--steps", 6, "--base-precision", "int8"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_during_a_checkpoint_write_then_resume_is_bit_identical(case, cli, text_file, tmp_path):
    args = [*BASE, "-d", text_file, *CASES[case]]
    ref = peftlab(*args, "-o", tmp_path / "ref", wait=False)
    run = tmp_path / "run"
    # Killed (SIGKILL, from inside) after the step-3 tensors are written, before the rename.
    killed = peftlab(*args, "-o", run, "--checkpoint-every", 1, env={"PEFTLAB_FAULT": "checkpoint-write:3"})
    assert killed.returncode == -signal.SIGKILL
    assert not (run / "adapter").exists()
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000001", "step-00000002"]
    code, _, err = cli(*args, "-o", run, "--checkpoint-every", 1)
    assert code == 2 and "--resume" in err  # an unfinished run is never silently restarted
    ref = finish(ref)
    assert ref.returncode == 0, ref.stderr
    resumed = peftlab(*args, "-o", run, "--checkpoint-every", 1, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert tensor_digests(run / "adapter") == tensor_digests(tmp_path / "ref" / "adapter")
    assert steps_logged(run) == steps_logged(tmp_path / "ref")  # every step exactly once
    assert json.loads((run / "run.json").read_text())["resumed"] == [2]
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())  # the half-written one is gone


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(text_file, tmp_path):
    args = [*BASE, "-d", text_file, "-s", "lora:r=8,targets=all-linear", "--steps", 40, "--seq-len", 64, "--batch-size", 8]
    ref = peftlab(*args, "-o", tmp_path / "ref", wait=False)
    at = random.randint(2, 30)
    run = tmp_path / "run"
    proc = peftlab(*args, "-o", run, "--checkpoint-every", 1, "--keep-checkpoints", 3, wait=False)
    wait_for_step(proc, run, at)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill at step {at}"
    assert len([p for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")]) <= 3
    resumed = peftlab(*args, "-o", run, "--checkpoint-every", 1, "--keep-checkpoints", 3, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    ref = finish(ref)
    assert ref.returncode == 0, ref.stderr
    assert tensor_digests(run / "adapter") == tensor_digests(tmp_path / "ref" / "adapter"), f"killed near step {at}"
    assert steps_logged(run) == list(range(41))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_checkpoint_and_say_how_to_resume(sig, code, text_file, tmp_path):
    args = [*BASE, "-d", text_file, "-s", "lora:r=8,targets=all-linear", "--steps", 40, "--seq-len", 64, "--batch-size", 8]
    run = tmp_path / "run"
    ref = peftlab(*args, "-o", tmp_path / "ref", wait=False)
    proc = peftlab(*args, "-o", run, wait=False)  # no periodic checkpoints: the signal writes one
    wait_for_step(proc, run, 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--resume" in lines[0] and signal.Signals(sig).name in lines[0], err
    stopped = steps_logged(run)[-1]
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{stopped:08d}"]
    resumed = peftlab(*args, "-o", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    ref = finish(ref)
    assert ref.returncode == 0, ref.stderr
    assert tensor_digests(run / "adapter") == tensor_digests(tmp_path / "ref" / "adapter")


def test_resume_with_other_arguments_is_refused_naming_the_difference(cli, text_file, tmp_path):
    args = ["train", "-m", "tiny-llama", "-d", text_file, "-s", "lora:r=4", "--seq-len", 32, "--steps", 4, "--quiet",
            "-o", tmp_path / "run", "--checkpoint-every", 1]
    code, _, err = cli(*args)
    assert code == 0, err
    (tmp_path / "run" / "run.json").unlink()  # make it look unfinished
    for change, word in ((["--seq-len", 16], "--seq-len"), (["-s", "lora:r=2"], "--strategy"),
                         (["--batch-size", 2], "--batch-size"), (["-m", "tiny-gpt2"], "--model")):
        code, _, err = cli(*args, "--resume", *change)
        assert code == 2 and word in err and "cannot resume" in err, err
        assert len(err.strip().splitlines()) == 1


def test_resume_of_a_finished_run_does_nothing(cli, text_file, tmp_path):
    args = ["train", "-m", "tiny-llama", "-d", text_file, "-s", "lora:r=4", "--seq-len", 32, "--steps", 3, "--quiet",
            "-o", tmp_path / "run"]
    assert cli(*args)[0] == 0
    before = tensor_digests(tmp_path / "run" / "adapter")
    code, out, _ = cli(*args, "--resume")
    assert code == 0 and "already finished" in out
    assert tensor_digests(tmp_path / "run" / "adapter") == before


def test_python_api_resumes(text_file, tmp_path):
    import torch

    from peftlab import TrainConfig, load_blocks, load_model, prepare, train

    cfg = TrainConfig(steps=6, seq_len=32, lr=3e-3, checkpoint_every=2)
    runs = []
    for resume in (False, True):  # the second picks up the first's step-4 checkpoint
        loaded = load_model("tiny-llama")
        prepared = prepare(loaded.model, "lora:r=4")
        records = train(loaded.model, load_blocks(loaded, str(text_file), 32), prepared, cfg, out=tmp_path / "run",
                        show=False, resume=resume)
        runs.append((records, {n: p.detach().clone() for n, p in loaded.model.named_parameters() if p.requires_grad}))
    (whole, final), (resumed, again) = runs
    def numbers(records):
        return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("eval_loss")) for r in records]

    assert numbers(resumed) == numbers(whole)  # records 0-4 come from the checkpoint, 5-6 are recomputed
    assert all(torch.equal(final[n], again[n]) for n in final)

"""One error boundary: every command ends in success (0), one `peftlab: error:` line (2), an
interrupt that says what was kept (130 / 143), or an internal error that calls itself a bug,
with its traceback saved to a file (1). And one writer per output folder."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_ctrl_c_while_loading_is_130_and_says_so(monkeypatch, capsys):
    from peftlab import models

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load", interrupted)
    code, _, err = run(capsys, "generate", "-m", "tiny-llama", "-p", "Hi")
    assert code == 130
    assert err.strip() == "peftlab: stopped by Ctrl-C; nothing was written"


def test_sigterm_is_143(monkeypatch, capsys):
    from peftlab import models

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # the boundary's handler turns it into Stop
        time.sleep(5)

    monkeypatch.setattr(models, "load", terminated)
    code, _, err = run(capsys, "params", "-m", "tiny-llama", "-s", "full")
    assert code == 143 and err.startswith("peftlab: stopped by SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the command


def test_a_bug_is_exit_1_with_the_traceback_saved(monkeypatch, capsys):
    from peftlab import models

    def broken(*a, **k):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(models, "load", broken)
    code, _, err = run(capsys, "params", "-m", "tiny-llama", "-s", "full")
    assert code == 1
    line = err.strip()
    assert "\n" not in line and line.startswith("peftlab: internal error (a bug in peftlab")
    path = Path(re.search(r"traceback: (\S+)$", line).group(1))
    saved = path.read_text()
    assert "ZeroDivisionError: oops" in saved and "Traceback" in saved
    path.unlink()


def test_disk_full_while_merging_is_one_line_and_leaves_nothing(monkeypatch, capsys, tmp_path):
    """ENOSPC inside save_pretrained: one line naming the file, no half-written folder."""
    from peftlab import load_model, prepare
    from peftlab.artifacts import save
    import transformers

    m = load_model("tiny-llama")
    adapter = save(m.model, prepare(m.model, "lora:r=2"), tmp_path / "lora", base_model="tiny-llama")

    def full(self, folder, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    code, _, err = run(capsys, "merge", "-m", "tiny-llama", "-a", adapter, "-o", tmp_path / "merged")
    assert code == 2
    assert re.fullmatch(r"peftlab: error: cannot use \S+model.safetensors: No space left on device", err.strip())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_disk_full_while_saving_the_adapter_leaves_no_run(monkeypatch, capsys, tmp_path):
    import safetensors.torch

    text = tmp_path / "t.txt"
    text.write_text("Call me Ishmael. " * 300)

    def full(tensors, filename, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    import peftlab.artifacts.io as io

    monkeypatch.setattr(io, "save_file", full)
    code, _, err = run(capsys, "train", "-m", "tiny-llama", "-d", text, "-s", "lora:r=2", "--steps", 2, "--seq-len", 32,
                       "-o", tmp_path / "run", "--quiet")
    assert code == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_second_writer_is_refused_naming_the_holder(capsys, tmp_path):
    from peftlab import outputs

    text = tmp_path / "t.txt"
    text.write_text("Call me Ishmael. " * 300)
    with outputs.lock(tmp_path / "run"):
        code, _, err = run(capsys, "train", "-m", "tiny-llama", "-d", text, "--steps", 1, "--seq-len", 32,
                           "-o", tmp_path / "run", "--quiet")
    assert code == 2
    assert f"is in use by another peftlab process (pid {os.getpid()})" in err
    assert not (tmp_path / "run").exists()
    code, _, err = run(capsys, "train", "-m", "tiny-llama", "-d", text, "--steps", 1, "--seq-len", 32,
                       "-o", tmp_path / "run", "--quiet")
    assert code == 0, err  # released: the next writer gets it


def test_two_train_processes_on_one_out(tmp_path):
    """Real processes: the second is refused while the first trains; the first's run is whole."""
    text = tmp_path / "t.txt"
    text.write_text("Call me Ishmael. " * 2000)
    cmd = [sys.executable, "-m", "peftlab", "train", "-m", "tiny-llama", "-d", str(text), "--steps", "400",
           "--seq-len", "64", "-o", str(tmp_path / "run"), "--quiet"]
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    assert second.returncode == 2
    assert f"in use by another peftlab process (pid {first.pid})" in second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    import json

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines if "loss" in json.loads(ln)] == list(range(1, 401))


def test_sigterm_to_compare_stops_its_worker(tmp_path):
    """compare passes SIGTERM on to its worker (own process group) and exits 143; no orphan."""
    text = tmp_path / "t.txt"
    text.write_text("Call me Ishmael. " * 2000)
    out = tmp_path / "cmp"
    proc = subprocess.Popen([sys.executable, "-m", "peftlab", "compare", "-m", "tiny-llama", "-d", str(text),
                             "-s", "full", "--steps", "100000", "--seq-len", "64", "-o", str(out), "--quiet",
                             "--forget", "none"], stderr=subprocess.PIPE, text=True)
    metrics = out / "strategies" / "full" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size > 200) and time.time() < deadline:
        time.sleep(0.2)
    assert metrics.exists(), "the worker never started training"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    assert "stopped by SIGTERM" in proc.stderr.read()
    left = subprocess.run(["pgrep", "-f", f"peftlab.workbench.worker {out}"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "the worker outlived compare"


def test_compare_never_runs_two_workers_on_one_strategy_folder(capsys, tmp_path):
    """A worker orphaned by a killed compare still holds its strategy folder: a rerun is refused."""
    from peftlab import outputs

    text = tmp_path / "t.txt"
    text.write_text("Call me Ishmael. " * 300)
    out = tmp_path / "cmp"
    (out / "strategies" / "full").mkdir(parents=True)
    job = {"model": "tiny-llama", "data": str(text)}  # what the running worker was given (in part)
    (out / "strategies" / "full" / "job.json").write_text(json.dumps(job))
    with outputs.lock(out / "strategies" / "full"):
        code, _, err = run(capsys, "compare", "-m", "tiny-llama", "-d", text, "-s", "full", "--steps", 1,
                           "--seq-len", 32, "-o", out, "--quiet", "--forget", "none")
    assert code == 2
    assert re.search(r"strategy folder of 'full' in \S+ is in use by another peftlab process \(pid \d+\)", err)
    assert sorted(p.name for p in out.rglob("*")) == ["full", "job.json", "strategies"]


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only bind mount (root can write into a chmod-555 folder; not into a read-only mount)."""
    src, mnt = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    mnt.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True).returncode:
        pytest.skip("no bind mounts here (needs root with CAP_SYS_ADMIN)")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_out_on_a_read_only_file_system(capsys, read_only_folder, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Call me Ishmael. " * 300)
    code, _, err = run(capsys, "train", "-m", "tiny-llama", "-d", text, "--steps", 1, "--seq-len", 32, "--quiet",
                       "-o", read_only_folder / "run")
    assert code == 2
    assert err.strip() == f"peftlab: error: --out {read_only_folder / 'run'}: cannot write in {read_only_folder} " \
                          "(Read-only file system)"


def test_a_destination_inside_one_being_written_is_refused(capsys, tmp_path):
    """merge --overwrite onto a folder that holds another process's output folder: refused."""
    from peftlab import load_model, prepare
    from peftlab.artifacts import save

    m = load_model("tiny-llama")
    adapter = save(m.model, prepare(m.model, "lora:r=2"), tmp_path / "lora", base_model="tiny-llama")
    (tmp_path / "P" / "a").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from peftlab import outputs\n"
                               f"with outputs.lock({str(tmp_path / 'P' / 'a')!r}):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    try:
        code, _, err = run(capsys, "merge", "-m", "tiny-llama", "-a", adapter, "-o", tmp_path / "P", "--overwrite")
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert re.search(r"--out \S+/P holds \S+/P/a, which another peftlab process \(pid \d+\) is writing", err)
    assert (tmp_path / "P" / "a").is_dir()


def test_nproc_overwrite_checks_everything_before_replacing(tmp_path, bad_world):
    """--nproc 2 --overwrite with data that does not exist: the finished run stays whole."""
    import shutil

    from bad_input import snapshot

    shutil.copytree(bad_world / "run", tmp_path / "run")
    before = snapshot(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "peftlab", "train", "-m", "tiny-llama", "-d", str(tmp_path / "nope.txt"),
                           "--nproc", "2", "--batch-size", "2", "--overwrite", "-o", str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "data not found" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(tmp_path / "run") == before

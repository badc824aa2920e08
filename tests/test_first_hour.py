"""What a new user meets first: each strategy's own memory, readable files, reuse that ignores
display options, one vocabulary across commands."""

import os
import stat

import torch

from peftlab.config import TrainConfig
from peftlab.workbench import compare


def test_each_strategy_reports_its_own_peak_not_the_parents(tmp_path, text_file):
    bloat = torch.ones(400_000_000, dtype=torch.uint8)  # this (parent) process now holds 400 MB more
    bloat[::4096] = 2  # touch every page
    from peftlab.memory import peak_memory

    parent = peak_memory(torch.device("cpu"))
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=32)
    summary = compare("tiny-llama", str(text_file), ["lora:r=2"], tmp_path / "cmp", cfg, forget=None, samples=1,
                      gen_tokens=4, show=False, log=lambda *a: None)
    worker = summary["strategies"][0]["peak_memory_bytes"]
    assert worker < parent - 300e6, (worker, parent)  # ru_maxrss would report at least the parent's peak
    del bloat


def test_weight_files_are_readable_like_every_other_output(cli, text_file, tmp_path):
    old = os.umask(0o022)
    try:
        code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "-s", "lora:r=2", "--steps", 2, "--seq-len", 32,
                           "--checkpoint-every", 1, "--quiet", "-o", tmp_path / "run")
        assert code == 0, err
        code, _, err = cli("merge", "-m", "tiny-llama", "-a", tmp_path / "run" / "adapter", "-o", tmp_path / "merged")
        assert code == 0, err
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "text.txt"]
    assert any(p.suffix == ".safetensors" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_display_only_options_do_not_retrain(tmp_path, text_file):
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=32)
    lines = []
    for show in (False, True):
        compare("tiny-llama", str(text_file), ["lora:r=2"], tmp_path / "cmp", cfg, forget=None, samples=1, gen_tokens=4,
                show=show, log=lines.append)
    assert "already done" in lines[-1]


def _params(name):
    import typer

    from peftlab.cli import app

    command = typer.main.get_command(app).commands[name]
    return {p.name: p for p in command.params}


def test_train_compare_and_bench_share_one_vocabulary():
    train, compare_, bench = _params("train"), _params("compare"), _params("bench")
    shared = {"model", "data", "steps", "batch_size", "seq_len", "lr", "warmup", "seed", "dtype", "device", "grad_accum",
              "eval_every", "grad_checkpoint", "compile", "quiet", "config"}
    assert shared <= set(train) and shared <= set(compare_)
    for name in shared:
        a, b = train[name], compare_[name]
        assert (a.opts, a.default, a.help) == (b.opts, b.default, b.help), name
    for name in ("batch_size", "seq_len", "config"):
        assert (bench[name].opts, bench[name].default, bench[name].help) == (train[name].opts, train[name].default, train[name].help)
    assert "precision" not in bench and bench["dtype"].opts == ["--dtype"]
    assert bench["warmup_steps"].opts == ["--warmup-steps"]  # a step count, unlike train's --warmup fraction


def test_version(cli):
    from peftlab import __version__

    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"peftlab {__version__}"


def test_train_takes_a_learning_rate_per_strategy_and_evaluates_at_most_five_times(cli, text_file, tmp_path):
    import json

    code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "-s", "lora:r=4@1e-3", "--steps", 6, "--seq-len", 32,
                       "--quiet", "-o", tmp_path / "run")
    assert code == 0, err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["lr"] == 1e-3 and run["strategy"] == "lora:r=4"
    evals = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in json.loads(ln)]
    assert evals == [0, 2, 4, 6]


def test_run_config_file_holds_any_option_and_flags_win(cli, text_file, tmp_path):
    import json

    config = tmp_path / "run.toml"
    config.write_text(f'model = "tiny-llama"\ndata = "{text_file}"\nstrategy = "lora:r=2"\nsteps = 6\nseq-len = 32\n'
                      f'batch_size = 2\nout = "{tmp_path / "run"}"\nquiet = true\n')
    code, _, err = cli("train", "--config", config, "--steps", 3)
    assert code == 0, err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (run["config"]["steps"], run["config"]["seq_len"], run["config"]["batch_size"], run["strategy"]) == (3, 32, 2, "lora:r=2")
    config.write_text(config.read_text() + "stepz = 4\n")
    code, _, err = cli("train", "--config", config)
    assert code == 2 and "'stepz' is not an option of peftlab train (did you mean: steps" in err
    config.write_text("[oops\n")
    code, _, err = cli("compare", "--config", config)
    assert code == 2 and "not valid TOML" in err


def test_generate_and_merge_take_dtype_and_device(cli, text_file, tmp_path):
    from safetensors.torch import load_file

    code, out32, err = cli("generate", "-m", "tiny-llama", "-p", "Call me", "--max-new-tokens", 5)
    assert code == 0, err
    code, out16, err = cli("generate", "-m", "tiny-llama", "-p", "Call me", "--max-new-tokens", 5, "--dtype", "bf16",
                           "--device", "cpu")
    assert code == 0 and out16.startswith("Call me"), err
    assert cli("train", "-m", "tiny-llama", "-d", text_file, "-s", "lora:r=2", "--steps", 2, "--seq-len", 32, "--quiet",
               "-o", tmp_path / "run")[0] == 0
    for dtype, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        code, _, err = cli("merge", "-m", "tiny-llama", "-a", tmp_path / "run" / "adapter", "-o", tmp_path / dtype,
                           "--dtype", dtype)
        assert code == 0, err
        weights = load_file(str(next((tmp_path / dtype).glob("*.safetensors"))))
        assert {t.dtype for t in weights.values()} == {want}
    code, _, err = cli("merge", "-m", "tiny-llama", "-a", tmp_path / "run" / "adapter", "-o", tmp_path / "x", "--dtype", "fp16")
    assert code == 2 and "--dtype must be one of" in err


def test_progress_piped_to_a_file_shows_while_the_run_goes(text_file, tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "peftlab", "train", "-m", "tiny-llama", "-d", str(text_file),
                             "-s", "lora:r=8,targets=all-linear", "--seq-len", "64", "--batch-size", "8", "--steps", "400",
                             "-o", str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:  # a pipe, not a terminal: plain lines, flushed as they come
        seen.append(line)
        if line.startswith("step 40/400"):
            assert proc.poll() is None  # the run is still going
            break
    rest, _ = proc.communicate(timeout=600)
    lines = seen + rest.splitlines(keepends=True)
    text = "".join(lines)
    assert proc.returncode == 0
    assert "loading tiny-llama…" in text and "evaluating before training…" in text and "saving the adapter…" in text
    steps = [ln for ln in lines if ln.startswith("step ") and "tok/s" in ln]
    assert 20 <= len(steps) <= 40  # every 20th step (and on time), not every step
    assert "held-out 5." in steps[-1] and "ETA" in steps[-1]
    assert "\x1b[" not in text  # no terminal escapes in a log file


def test_report_merges_comparisons_and_train_runs_across_time(cli, text_file, tmp_path):
    import json
    import re
    import shutil
    import subprocess

    cfg = TrainConfig(steps=3, batch_size=2, seq_len=32, lr=3e-3)
    compare("tiny-llama", str(text_file), ["full", "lora:r=2@1e-2"], tmp_path / "monday", cfg, forget=None, samples=1,
            gen_tokens=4, show=False, log=lambda *a: None)
    code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "-s", "dora:r=2", "--steps", 4, "--seq-len", 32,
                       "--batch-size", 2, "--quiet", "-o", tmp_path / "tuesday")
    assert code == 0, err
    code, out, err = cli("report", tmp_path / "monday", tmp_path / "tuesday", "--out", tmp_path / "all.html")
    assert code == 0, err
    assert "| monday: full |" in out and "| tuesday: dora:r=2 |" in out
    html = (tmp_path / "all.html").read_text()
    runs = html[html.index('id="runs-table"'):html.index("</table>", html.index('id="runs-table"'))]
    assert runs.count("<tr>") == 4 and "UTC" in runs and "2.13" in runs and str(tmp_path / "tuesday") in runs
    assert 'id="fig-drift"' in html  # from the comparison; the train run simply has no drift
    hover = [json.loads(__import__("html").unescape(h)) for h in re.findall(r"data-hover='([^']*)'", html)]
    labels = {s["label"] for boxes in hover for b in boxes for s in b["series"]}
    assert {"monday: full", "monday: lora:r=2@1e-2", "tuesday: dora:r=2"} <= labels
    for boxes in hover:
        for b in boxes:
            assert 0 <= b["box"][0] < b["box"][2] <= 1 and 0 <= b["box"][1] < b["box"][3] <= 1
    # Another model is refused unless asked for; an unfinished run is refused.
    code, _, err = cli("train", "-m", "tiny-gpt2", "-d", text_file, "--steps", 2, "--seq-len", 32, "--quiet",
                       "-o", tmp_path / "other")
    assert code == 0, err
    code, _, err = cli("report", tmp_path / "monday", tmp_path / "other", "--out", tmp_path / "x.html")
    assert code == 2 and "--allow-mixed" in err and "tiny-gpt2" in err and not (tmp_path / "x.html").exists()
    assert cli("report", tmp_path / "monday", tmp_path / "other", "--out", tmp_path / "x.html", "--allow-mixed")[0] == 0
    shutil.copytree(tmp_path / "tuesday", tmp_path / "killed")
    run = json.loads((tmp_path / "killed" / "run.json").read_text())
    del run["result"]
    (tmp_path / "killed" / "run.json").write_text(json.dumps(run))
    code, _, err = cli("report", tmp_path / "killed", "--out", tmp_path / "y.html")
    assert code == 2 and "unfinished" in err
    # Hover works in a real browser: a pointer over the first loss plot shows every curve's value.
    from test_workbench import chromium

    browser = chromium()
    if browser:
        probe = html.replace("</body>", """<script>window.addEventListener("load", function () {
          var img = document.querySelector("#fig-loss img"), b = JSON.parse(img.getAttribute("data-hover"))[0].box;
          var r = img.getBoundingClientRect();
          img.dispatchEvent(new MouseEvent("mousemove", {clientX: r.left + r.width * (b[0] + b[2]) / 2,
                                                          clientY: r.top + r.height * (b[1] + b[3]) / 2}));
          document.body.setAttribute("data-tip", document.getElementById("tip").textContent.replace(/\\n/g, " | "));
        });</script></body>""")
        (tmp_path / "probe.html").write_text(probe)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}"]
        dom = subprocess.run([browser, *flags, "--dump-dom", (tmp_path / "probe.html").as_uri()], capture_output=True,
                             text=True, timeout=120).stdout
        tip = re.search(r'data-tip="([^"]*)"', dom).group(1)
        assert tip.startswith("train loss") and "monday: full:" in tip and "tuesday: dora:r=2:" in tip, tip


def test_dtype_auto_picks_bf16_only_where_it_is_native(monkeypatch):
    import torch

    from peftlab import runtime

    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(runtime, "native_bf16", lambda device, native=native: native)
        assert runtime.check_dtype("auto", torch.device("cpu")) == want


def test_bf16_where_it_is_emulated_says_so_in_one_line(monkeypatch, cli, text_file, tmp_path):
    from peftlab import runtime

    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "-s", "lora:r=2", "--steps", 1, "--seq-len", 32,
                       "--dtype", "bf16", "-o", tmp_path / "run")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "no native bf16" in line]
    assert len(notes) == 1 and "--dtype auto" in notes[0]

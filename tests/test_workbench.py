"""The comparison workbench: exact weight-change tracking, resumable runs, the report."""

import shutil
import subprocess

import pytest
import torch

from peftlab import TrainConfig, load_blocks, load_model, prepare, train
from peftlab.methods import trainable_parameters
from peftlab.methods.attach import attached
from peftlab.workbench import compare
from peftlab.workbench.tracking import WeightTracker


def effective(model):
    """Every trained matrix as the tracker sees it: base weights, LoRA/DoRA merged deltas, others."""
    out = {}
    for host, layer, slot in attached(model, "lora"):
        d = slot["default"]
        w = layer.weight.detach().float()
        if d.magnitude is None:
            out[f"{host}.weight"] = d.delta_weight().detach().clone()
        else:
            merged = w + d.delta_weight().detach()
            out[f"{host}.weight"] = (d.magnitude.detach() / merged.norm(dim=1))[:, None] * merged - w
    for n, p in model.named_parameters():
        if p.requires_grad and ".lora." not in n:
            out[n] = p.detach().clone()
    return out


@pytest.mark.parametrize("spec, wd", [("full", 0.0), ("full", 0.1), ("lora:r=4", 0.0), ("dora:r=4", 0.0),
                                      ("adapter:r=8", 0.0), ("prefix:tokens=3", 0.0), ("bitfit:norms=true", 0.1)])
def test_tracker_matches_explicit_copies(spec, wd, text_file):
    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, spec)
    tracker = WeightTracker(loaded.model, set(trainable_parameters(loaded.model)))
    start = effective(loaded.model)
    prev = [dict(start)]
    actual = {}

    def on_step(step, record, opt):
        tracker.step(opt)
        now = effective(loaded.model)
        for n, v in now.items():  # every trained tensor, vectors too (biases, norms, IA3-like scales)
            actual.setdefault(n, []).append(float((v - prev[0][n]).norm()))
        prev[0] = now

    blocks = load_blocks(loaded, str(text_file), 32)
    train(loaded.model, blocks, prepared, TrainConfig(steps=5, lr=1e-2, weight_decay=wd, batch_size=2, warmup=0),
          on_step=on_step, show=False)
    assert set(actual) == set(tracker.steps)
    for n in actual:
        torch.testing.assert_close(torch.tensor(tracker.steps[n]), torch.tensor(actual[n]), rtol=2e-3, atol=1e-6)
    initial = dict(load_model("tiny-llama").model.named_parameters())
    drift = tracker.final_drift(initial)
    final = effective(loaded.model)
    for n in actual:
        want = float((final[n] - start[n]).norm())
        assert abs(drift[n] - want) <= 2e-3 * want + 1e-6, n


def test_compare_runs_isolated_resumes_and_reports(tmp_path, text_file):
    lines = []
    cfg = TrainConfig(steps=4, batch_size=2, seq_len=32, lr=3e-3)
    summary = compare("tiny-llama", str(text_file), ["full", "lora:r=4@1e-2"], tmp_path / "cmp", cfg, forget=str(text_file),
                      samples=2, gen_tokens=8, show=False, log=lines.append)
    assert summary["identical_initial_weights"]
    a, b = summary["strategies"]
    assert a["pid"] != b["pid"]  # each strategy in its own process: its own peak memory
    assert b["config"]["lr"] == 1e-2 and a["config"]["lr"] == 3e-3
    assert a["trainable"] == a["total"] and b["trainable"] == 4 * (64 + 64) * 2 + 4 * (64 + 32) * 2
    for r in (a, b):
        # AdamW: two fp32 moments per parameter, plus one step counter per tensor
        assert 0 <= r["optimizer_state_bytes"] - 2 * 4 * r["trainable"] <= 4 * 64
        assert len(r["train_loss"]) == 4 and r["eval_loss"][0][0] == 0
        assert set(r["style"]["before"]) == {"mean", "std", "samples"} and len(r["style"]["after"]["samples"]) == 2
        assert r["forgetting"]["before"] > 0 and r["artifact_bytes"] > 0
        assert r["weight_change"]["drift"] and all(len(v) == 4 for v in r["weight_change"]["step"].values())
    table = (tmp_path / "cmp" / "summary.md").read_text()
    assert "| full |" in table and "| lora:r=4@1e-2 |" in table
    html = (tmp_path / "cmp" / "report.html").read_text()
    assert html.count("<img ") == 9 and "http" not in html.replace("http-equiv", "")
    # an interrupted comparison resumes: only the missing strategy runs again
    (tmp_path / "cmp" / "strategies" / "lora_r=4_1e-2" / "result.json").unlink()
    lines.clear()
    again = compare("tiny-llama", str(text_file), ["full", "lora:r=4@1e-2"], tmp_path / "cmp", cfg, forget=str(text_file),
                    samples=2, gen_tokens=8, show=False, log=lines.append)
    assert "already done" in lines[0] and "already done" not in lines[1]
    assert again["strategies"][0] == summary["strategies"][0]


def test_compare_errors(cli, tmp_path, text_file):
    code, _, err = cli("compare", "-m", "tiny-llama", "-d", text_file, "-s", "full", "-s", "lorra", "-o", tmp_path / "c")
    assert code == 2 and "unknown strategy 'lorra'" in err and not (tmp_path / "c").exists()
    code, _, err = cli("compare", "-m", "tiny-llama", "-d", text_file, "-s", "lora@fast", "-o", tmp_path / "c")
    assert code == 2 and "must be a number" in err


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(tmp_path, text_file):
    import os

    browser = chromium()
    if not browser:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium (./dev test installs it)")
        pytest.skip("needs chromium (apt-get install chromium)")
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=32, lr=3e-3)
    compare("tiny-gpt2", str(text_file), ["full", "adapter:r=4"], tmp_path / "cmp", cfg, forget=None, samples=2,
            gen_tokens=6, show=False, log=lambda *a: None)
    page = (tmp_path / "cmp" / "report.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert 'data-figures="9"' in dom and 'data-figures-loaded="9"' in dom
    for fig in ("fig-loss", "fig-loss-cost", "fig-lr-grad", "fig-time", "fig-memory", "fig-pareto", "fig-drift",
                "fig-step-change", "fig-style-forgetting", "samples-table", 'id="summary"', 'id="runs-table"'):
        assert fig in dom
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, "--window-size=1300,2400", f"--screenshot={shot}", page], capture_output=True,
                   timeout=120)
    assert shot.exists() and shot.stat().st_size > 50_000


def test_tracker_scratch_lives_on_the_weights_device():
    import torch

    from peftlab import load_model, prepare
    from peftlab.methods import trainable_parameters
    from peftlab.workbench.tracking import WeightTracker

    loaded = load_model("tiny-llama")
    prepare(loaded.model, "full")
    loaded.model.to("meta")  # any device other than the CPU (a GPU in real use)
    tracker = WeightTracker(loaded.model, set(trainable_parameters(loaded.model)))
    assert tracker._buffer.device == torch.device("meta")

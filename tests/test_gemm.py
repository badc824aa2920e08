"""Row-split matrix products (gemm.py, gemm_probe.py): the same numbers as torch's products,
forward and backward, eager and compiled; the probe's answer; layers changed and restored."""

import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from peftlab import TrainConfig, data, gemm, gemm_probe, models, train
from peftlab.methods import prepare


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_rows_mm_is_the_product(parts):
    torch.manual_seed(0)
    a, b = torch.randn(10, 7), torch.randn(7, 5)
    torch.testing.assert_close(gemm.rows_mm(a, b, parts, parts), a @ b, rtol=1e-6, atol=1e-6)


def _split(layer: nn.Linear, rows: int, parts=(2, 2)) -> nn.Linear:
    layer.__class__ = gemm.RowSplitLinear
    layer.parts = {rows: parts}
    return layer


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_row_split_linear_matches_linear(trained, compiled):
    torch.manual_seed(0)
    ref = nn.Linear(12, 6, bias=False).requires_grad_(trained)
    layer = _split(nn.Linear(12, 6, bias=False).requires_grad_(trained), rows=3 * 8)
    layer.weight.data.copy_(ref.weight)
    x = torch.randn(3, 8, 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(3, 8, 6)
    run = torch.compile(layer) if compiled else layer
    (run(x) * g).sum().backward()
    (ref(x_ref) * g).sum().backward()
    torch.testing.assert_close(run(x), ref(x_ref), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    if trained:
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
    else:
        assert layer.weight.grad is None


def test_forward_and_input_gradient_each_split_as_planned(monkeypatch):
    calls = []
    product = gemm.split_mm
    monkeypatch.setattr(gemm, "split_mm", lambda a, b, parts: calls.append((tuple(a.shape), parts)) or product(a, b, parts))
    layer = _split(nn.Linear(12, 6, bias=False).requires_grad_(False), rows=16, parts=(2, 1))
    x = torch.randn(16, 12, requires_grad=True)
    y = layer(x)
    assert calls == [((16, 12), 2)]  # forward: x (16, 12) in halves
    y.sum().backward()
    assert calls[1:] == [((16, 6), 1)]  # input gradient: dy (16, 6) whole, as planned


def test_a_frozen_layer_keeps_no_activation_for_backward():
    layer = _split(nn.Linear(12, 6, bias=False).requires_grad_(False), rows=16)
    x = torch.randn(16, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer(x).sum().backward()
    assert torch.Size([16, 12]) not in saved  # only the weight (as Wᵀ) is kept


def test_other_row_counts_and_autocast_run_as_linear():
    torch.manual_seed(0)
    layer = _split(nn.Linear(12, 6, bias=False), rows=16)
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))  # 4 rows: not planned
    x16 = torch.randn(16, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = layer(x16), F.linear(x16, layer.weight)
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want)


def test_plan_asks_the_probe_only_where_a_split_could_help(monkeypatch):
    layers = [nn.Linear(8, 4, bias=False)]

    def no_probe(*a, **k):
        raise AssertionError("the probe ran")

    monkeypatch.setattr(gemm.subprocess, "run", no_probe)
    assert gemm.plan(layers, gemm.MIN_ROWS - 1, torch.float32) == {}  # too few rows
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert gemm.plan(layers, 4096, torch.float32) == {}  # one thread: nothing to share out


def test_a_failed_probe_splits_nothing(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(gemm, "PROBE", gemm.PROBE.with_name("no-such-probe.py"))
    assert gemm.plan([nn.Linear(8, 4, bias=False)], 4096, torch.float32) == {}


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: nothing to probe")
def test_the_probe_answers_for_every_shape():
    shapes = [(64, 32), (32, 96)]
    found = gemm.plan([nn.Linear(k, n, bias=False) for k, n in shapes], 512, torch.float32)
    assert set(found) == set(shapes) and all(p in {(a, b) for a in (1, 2) for b in (1, 2)} for p in found.values())


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread CPU time is read from /proc")
def test_busy_threads_sees_one_python_loop():
    assert gemm_probe.busy_threads(lambda: sum(range(20_000))) == 1


def test_probe_keeps_whole_a_product_that_splitting_would_change(monkeypatch):
    monkeypatch.setattr(gemm_probe, "split_mm", lambda a, b, parts: torch.mm(a, b) + 1)
    assert gemm_probe.best_parts(torch.randn(8, 4), torch.randn(4, 3)) == 1


def test_probe_splits_only_what_runs_on_one_thread(monkeypatch):
    answers = iter([1, 2])  # whole: one thread; halves: two
    monkeypatch.setattr(gemm_probe, "busy_threads", lambda f: next(answers))
    assert gemm_probe.best_parts(torch.randn(8, 4), torch.randn(4, 3)) == 2
    answers = iter([2, 2])  # torch already keeps both busy
    assert gemm_probe.best_parts(torch.randn(8, 4), torch.randn(4, 3)) == 1


def _train(text_file, plan, monkeypatch):
    monkeypatch.setattr(gemm, "plan", plan)
    loaded = models.load("tiny-llama", seed=0)
    blocks = data.load_blocks(loaded, str(text_file), 32)
    prepared = prepare(loaded.model, "lora:r=4,targets=all-linear", loaded.tokenizer)
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=32, lr=1e-2, warmup=0, eval_every=3, device="cpu", compile=True)
    return loaded.model, train(loaded.model, blocks, prepared, cfg, show=False)


def test_compiled_training_with_split_layers_learns_the_same(text_file, monkeypatch):
    seen = []

    def split_all(layers, rows, dtype):
        seen.append(rows)
        return {(m.in_features, m.out_features): (2, 2) for m in layers}

    _, want = _train(text_file, lambda layers, rows, dtype: {}, monkeypatch)
    calls = []
    product = gemm.split_mm
    monkeypatch.setattr(gemm, "split_mm", lambda a, b, parts: calls.append(parts) or product(a, b, parts))
    model, got = _train(text_file, split_all, monkeypatch)
    assert seen == [2 * 32]  # batch × sequence rows
    assert calls.count(2) >= 2 * 7 * 2  # the split products ran: 7 layers a block, 2 blocks, forward and backward
    for a, b in zip(want, got):
        for key in ("loss", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a["step"])
    # training over: every layer is an nn.Linear again, as saving and merging expect
    assert not any(isinstance(m, gemm.RowSplitLinear) or hasattr(m, "parts") for m in model.modules())


def test_probe_runs_without_peftlab(tmp_path):
    import json
    import subprocess

    job = {"rows": 512, "dtype": "float32", "threads": 2, "shapes": [[16, 8]]}
    env = dict(os.environ, PYTHONPATH="", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, str(gemm.PROBE), json.dumps(job)], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [[k, n, fwd, back]] = json.loads(proc.stdout)
    assert (k, n) == (16, 8) and fwd in (1, 2) and back in (1, 2)

"""--base-precision int8: frozen linear layers stored int8, forward and input-gradient GEMMs in
int8 with per-token scales; trainable parts untouched; compile, merge, resume identity."""

import json
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from peftlab import data, int8, models, params
from peftlab.errors import UserError
from peftlab.merge import merge, merge_and_unload
from peftlab.methods import prepare, trainable_parameters
from peftlab import TrainConfig, train

from conftest import perturb, sample_ids


def _linear(bias=False):
    torch.manual_seed(0)
    return nn.Linear(64, 48, bias=bias).requires_grad_(False)


@pytest.mark.parametrize("kernel", int8.KERNELS)
def test_forward_and_input_gradient_are_close_to_fp32(kernel):
    layer = _linear(bias=True)
    x = torch.randn(3, 5, 64, requires_grad=True)
    want = layer(x)
    g = torch.randn_like(want)
    (want * g).sum().backward()
    want_dx, x.grad = x.grad.clone(), None
    int8.to_int8(layer, kernel)
    got = layer(x)
    (got * g).sum().backward()
    rel = lambda a, b: float((a - b).detach().norm() / b.norm())  # noqa: E731
    assert rel(got, want) < 0.02 and rel(x.grad, want_dx) < 0.02
    assert got.shape == want.shape and x.grad.shape == x.shape


def test_the_input_gradient_folds_the_weight_scales_into_dy():
    """dx contracts over the output channels, which carry W's scales: dx must equal the
    quantized product of (dy · diag(sw)) with the int8 weight, exactly."""
    layer = int8.to_int8(_linear(), "float")
    x = torch.randn(4, 64, requires_grad=True)
    dy = torch.randn(4, 48)
    layer(x).backward(dy)
    gq, sg = int8.quantize_rows(dy * layer.wscale)
    torch.testing.assert_close(x.grad, (gq.float() @ layer.qweight.float()) * sg, rtol=1e-6, atol=1e-6)


def _outlier_inputs():
    """x (256, 64) whose channel 5 is ~60× the others (what SmolLM2's residual stream does)."""
    torch.manual_seed(1)
    x = torch.randn(256, 64)
    x[:, 5] *= 60
    return x


def test_outlier_channels_stay_fp32_so_the_rest_keep_their_precision():
    x = _outlier_inputs().requires_grad_()
    want = _linear()(x)
    dy = torch.randn(256, 48)
    (want * dy).sum().backward()
    want_dx, x.grad = x.grad.clone(), None
    plain = int8.to_int8(_linear(), "float")
    split = int8.to_int8(_linear(), "float", x_range=x.detach().abs().amax(dim=0))
    assert 5 in split.outliers.tolist() and len(split.outliers) == int8.OUTLIERS
    rel = lambda a, b: float((a - b).detach().norm() / b.norm())  # noqa: E731
    errors = {}
    for name, layer in (("plain", plain), ("split", split)):
        y = layer(x)
        (y * dy).sum().backward()
        errors[name] = rel(y, want), rel(x.grad, want_dx)
        x.grad = None
    assert errors["split"][0] < errors["plain"][0] / 3, errors  # forward: the per-token scale no longer spent on them
    assert errors["split"][1] < errors["plain"][1], errors  # dx: never worse (those columns are exact)
    w = _linear().weight  # the weight reads back with its fp32 columns exact, the rest within half a step
    assert torch.equal(split.weight[:, split.outliers], w[:, split.outliers])
    assert ((split.weight - w).abs() <= split.wscale[:, None] / 2 + 1e-7).all()


def test_an_outlier_layers_input_gradient_is_the_int8_product_plus_its_fp32_columns():
    x = _outlier_inputs().requires_grad_()
    layer = int8.to_int8(_linear(), "float", x_range=x.detach().abs().amax(dim=0))
    dy = torch.randn(256, 48)
    layer(x).backward(dy)
    gq, sg = int8.quantize_rows(dy * layer.wscale)
    want = (gq.float() @ layer.qweight.float()) * sg
    want[:, layer.outliers] = dy @ layer.outlier_weight
    torch.testing.assert_close(x.grad, want, rtol=1e-6, atol=1e-6)


def test_calibration_reads_each_frozen_layer_and_leaves_the_model_as_it_was(text_file):
    def quantized():
        loaded = models.load("tiny-llama", seed=0)
        perturb(loaded.model)
        prepare(loaded.model, "lora:r=4", loaded.tokenizer)
        ids = data.load_blocks(loaded, str(text_file), 32).train_ids
        loaded.model.train()
        n = int8.quantize_frozen(loaded.model, torch.device("cpu"), ids)
        return loaded.model, n

    model, n = quantized()
    layers = [m for m in model.modules() if int8.is_int8(m)]
    assert n == len(layers) > 0 and model.training
    assert all(len(m.outliers) == min(int8.OUTLIERS, m.in_features) for m in layers)  # each saw its inputs
    assert not any(m._forward_pre_hooks for m in model.modules())  # nothing left listening
    again, _ = quantized()  # what a resumed run rebuilds: the same base, bit for bit
    for a, b in zip(layers, [m for m in again.modules() if int8.is_int8(m)]):
        assert all(torch.equal(getattr(a, t), getattr(b, t)) for t in ("qweight", "wscale", "outliers", "outlier_weight"))


def test_the_two_kernels_give_the_same_numbers():
    x = torch.randn(32, 64)
    a = int8.to_int8(_linear(), "float")(x)
    b = int8.to_int8(_linear(), "int_mm")(x)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_weight_reads_back_dequantized_and_round_trips_to_a_plain_linear():
    layer = _linear()
    w = layer.weight.detach().clone()
    int8.to_int8(layer, "float")
    assert "weight" not in dict(layer.named_parameters()) and layer.qweight.dtype == torch.int8
    assert (layer.weight - w).abs().max() <= layer.wscale.max() / 2 + 1e-7  # half a step at most
    int8.to_float(layer)
    assert type(layer) is nn.Linear and not layer.weight.requires_grad
    with pytest.raises(UserError, match="frozen"):
        int8.to_int8(nn.Linear(4, 4), "float")


def _train(spec, text_file, precision, steps=4, **extra):
    loaded = models.load("tiny-llama", seed=0)
    perturb(loaded.model)
    blocks = data.load_blocks(loaded, str(text_file), 32)
    prepared = prepare(loaded.model, spec, loaded.tokenizer)
    cfg = TrainConfig(steps=steps, batch_size=2, seq_len=32, lr=1e-2, warmup=0, eval_every=steps, device="cpu",
                      base_precision=precision, **extra)
    return loaded, train(loaded.model, blocks, prepared, cfg, show=False)


@pytest.mark.parametrize("spec", ["lora:r=4,targets=all-linear", "dora:r=4", "adapter:r=4", "prefix:tokens=4",
                                  "bitfit:norms=true", "freeze-attention"])
def test_int8_base_trains_like_the_float_base(spec, text_file):
    float_model, want = _train(spec, text_file, "float")
    int8_model, got = _train(spec, text_file, "int8")
    for a, b in zip(want, got):
        for key in ("loss", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=0.02), (spec, key, a["step"])
    layers = [m for m in int8_model.model.modules() if isinstance(m, nn.Linear)]
    quantized = [m for m in layers if int8.is_int8(m)]
    assert quantized, spec
    for m in layers:  # a trained linear keeps its precision; a frozen one inside the blocks is int8
        if "weight" in m._parameters:
            assert m.weight.requires_grad or m is int8_model.model.lm_head, spec
    assert set(trainable_parameters(int8_model.model)) == set(trainable_parameters(float_model.model))


def test_int8_base_halves_the_frozen_linear_bytes(text_file):
    loaded, _ = _train("lora:r=4", text_file, "float", steps=1, dtype="bf16")
    bf16_bytes = params.storage_bytes(loaded.model)
    loaded8, _ = _train("lora:r=4", text_file, "int8", steps=1, dtype="bf16")
    layers = [m for m in loaded8.model.modules() if int8.is_int8(m)]
    weights, scales = sum(m.qweight.numel() for m in layers), sum(m.wscale.numel() for m in layers)
    outliers = sum(m.outlier_weight.numel() * 4 + m.outliers.numel() * 8 for m in layers)  # fp32 columns, int64 indices
    # 2 → 1 byte each, plus fp32 scales and the fp32 outlier columns
    assert bf16_bytes - params.storage_bytes(loaded8.model) == weights - 4 * scales - outliers
    assert int8.int8_bytes(loaded8.model) == weights + 4 * scales + outliers


def test_int8_base_compiles_to_the_same_losses(text_file):
    _, eager = _train("lora:r=4,targets=all-linear", text_file, "int8", compile=False)
    _, fused = _train("lora:r=4,targets=all-linear", text_file, "int8", compile=True)
    for a, b in zip(eager, fused):
        for key in ("loss", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3), (key, a["step"])


def test_merging_into_an_int8_base_dequantizes(text_file):
    import copy

    loaded, _ = _train("lora:r=4,targets=all-linear", text_file, "int8", steps=2)
    model = loaded.model
    ids = sample_ids(loaded)
    with pytest.raises(UserError, match="quantized"):
        merge(model)
    unmerged = copy.deepcopy(model)  # the same dequantized base, the adapter kept apart
    for m in list(unmerged.modules()):
        if int8.is_int8(m):
            int8.to_float(m)
    with pytest.warns(UserWarning, match="de-quantizing"):
        merge_and_unload(model, dequantize=True)
    assert not any(int8.is_int8(m) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_cli_base_precision(cli, text_file, tmp_path):
    code, _, err = cli("train", "-m", "tiny-llama", "-d", str(text_file), "-s", "lora:r=4", "--steps", "2", "--seq-len", "32",
                       "--batch-size", "2", "--base-precision", "int8", "--quiet", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["base_precision"] == "int8"
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    code, _, err = cli("train", "-m", "tiny-llama", "-d", str(text_file), "-s", "lora:r=4", "--base-precision", "int4",
                       "--out", str(tmp_path / "bad"))
    assert code == 2 and "--base-precision must be auto, float or int8" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_resume_refuses_another_base_precision(cli, text_file, tmp_path):
    from peftlab import checkpoint

    loaded = models.load("tiny-llama", seed=0)
    blocks = data.load_blocks(loaded, str(text_file), 32)
    prepared = prepare(loaded.model, "lora:r=4", loaded.tokenizer)
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=32, eval_every=-1, device="cpu", checkpoint_every=1, base_precision="int8")
    train(loaded.model, blocks, prepared, cfg, out=tmp_path, show=False)
    state = checkpoint.read(checkpoint.folder_of(tmp_path, 1))[0]
    assert state["identity"]["base_precision"] == "int8"
    with pytest.raises(UserError, match="--base-precision int8"):
        checkpoint.check_identity(state["identity"], state["identity"] | {"base_precision": "float"}, tmp_path)


def _frozen_bytes(model, dtype):
    return sum(m.weight.numel() for m in int8._frozen_linear(model).values()) * torch.empty((), dtype=dtype).element_size()


def test_auto_is_float_unless_the_base_would_not_fit(monkeypatch):
    loaded = models.load("tiny-llama", seed=0)
    prepare(loaded.model, "lora:r=4", loaded.tokenizer)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    need = _frozen_bytes(loaded.model, bf16)
    assert need > 0
    assert int8.choose("float", loaded.model, cpu, bf16) == ("float", None)  # the user's word
    assert int8.choose("int8", loaded.model, cpu, bf16) == ("int8", None)
    monkeypatch.setattr(int8.memory, "available", lambda device: 2 * need)
    assert int8.choose("auto", loaded.model, cpu, bf16) == ("float", None)  # half the free memory: fits
    assert int8.choose("auto", loaded.model, cpu, bf16, copies=2)[0] == "int8"  # two processes' bases do not
    assert int8.choose("auto", loaded.model, cpu, torch.float32)[0] == "int8"  # 4 bytes a weight do not either
    monkeypatch.setattr(int8.memory, "available", lambda device: 2 * need - 1)
    chosen, note = int8.choose("auto", loaded.model, cpu, bf16)
    assert chosen == "int8" and "in int8" in note and "--base-precision float" in note
    assert int8.choose("auto", loaded.model, cpu, bf16, fsdp=True) == ("float", None)  # FSDP shards no buffers
    monkeypatch.setattr(int8.memory, "available", lambda device: None)
    assert int8.choose("auto", loaded.model, cpu, bf16) == ("float", None)  # unknown: no guess
    monkeypatch.setattr(int8.memory, "available", lambda device: 1)
    full = models.load("tiny-llama", seed=0)
    prepare(full.model, "full", full.tokenizer)
    assert int8.choose("auto", full.model, cpu, bf16) == ("float", None)  # nothing frozen to store in int8


def test_available_memory_is_read():
    free = int8.memory.available(torch.device("cpu"))
    assert free is None or free > 0


def test_cli_auto_decides_and_records_it(cli, text_file, tmp_path, monkeypatch):
    args = ["train", "-m", "tiny-llama", "-d", str(text_file), "-s", "lora:r=4", "--steps", "2", "--seq-len", "32",
            "--batch-size", "2"]
    code, _, err = cli(*args, "--quiet", "--out", tmp_path / "roomy")
    assert code == 0, err
    run = json.loads((tmp_path / "roomy" / "run.json").read_text())
    assert run["config"]["base_precision"] == "auto" and run["result"]["base_precision"] == "float"
    monkeypatch.setattr(int8.memory, "available", lambda device: 1000)
    code, _, err = cli(*args, "--out", tmp_path / "tight")
    assert code == 0, err
    assert "stored in int8 (--base-precision auto" in err
    assert json.loads((tmp_path / "tight" / "run.json").read_text())["result"]["base_precision"] == "int8"


def test_a_resumed_auto_run_keeps_its_checkpoints_choice(text_file, tmp_path, monkeypatch):
    def run(resume):
        loaded = models.load("tiny-llama", seed=0)
        blocks = data.load_blocks(loaded, str(text_file), 32)
        prepared = prepare(loaded.model, "lora:r=4", loaded.tokenizer)
        cfg = TrainConfig(steps=3, batch_size=2, seq_len=32, eval_every=-1, device="cpu", checkpoint_every=1)
        train(loaded.model, blocks, prepared, cfg, out=tmp_path, show=False, resume=resume)
        return any(int8.is_int8(m) for m in loaded.model.modules())

    with monkeypatch.context() as m:
        m.setattr(int8.memory, "available", lambda device: 1000)
        assert run(resume=False)  # memory was short: int8
    from peftlab import checkpoint

    assert checkpoint.read(checkpoint.latest(tmp_path))[0]["identity"]["base_precision"] == "int8"
    assert run(resume=True)  # memory is plentiful now, but the checkpoint's base was int8
    assert not run(resume=False)  # a fresh run decides anew


def test_one_process_short_of_memory_decides_for_all(monkeypatch, capsys):
    import importlib

    from peftlab import distributed

    train_mod = importlib.import_module("peftlab.loop")

    loaded = models.load("tiny-llama", seed=0)
    prepare(loaded.model, "lora:r=4", loaded.tokenizer)
    cfg, cpu = TrainConfig(device="cpu"), torch.device("cpu")
    sent = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "all_sum", lambda values, device: sent.append(values) or [values[0] + 1.0])
    assert train_mod.base_precision(loaded.model, cfg, cpu, torch.float32, True).base_precision == "int8"
    assert sent == [[0.0]]  # this process had room: it asked for float, the other one for int8
    assert "another training process has too little memory" in capsys.readouterr().err
    monkeypatch.setattr(distributed, "all_sum", lambda values, device: values)  # nobody short
    assert train_mod.base_precision(loaded.model, cfg, cpu, torch.float32, False).base_precision == "float"
    resumed = {"base_precision": "int8"}  # a checkpoint's choice stands
    assert train_mod.base_precision(loaded.model, cfg, cpu, torch.float32, False, resumed).base_precision == "int8"


def test_layers_unfrozen_later_keep_their_precision(text_file, monkeypatch):
    spec = "schedule:mlp=0,attention=2"
    with pytest.raises(UserError, match="unfreezes"):
        _train(spec, text_file, "int8", steps=3)
    monkeypatch.setattr(int8.memory, "available", lambda device: 1000)  # short of memory: auto would pick int8
    loaded, records = _train(spec, text_file, "auto", steps=3)
    assert not any(int8.is_int8(m) for m in loaded.model.modules()) and len(records) >= 3


def test_a_container_limit_counts_as_the_memory_available(tmp_path, monkeypatch):
    from peftlab import memory

    group = tmp_path / "job"
    group.mkdir()
    (group / "memory.max").write_text("4294967296\n")
    (group / "memory.current").write_text("1073741824\n")
    real_open = open

    def fake_open(path, *a, **k):
        return real_open(tmp_path / "cgroup", *a, **k) if path == "/proc/self/cgroup" else real_open(path, *a, **k)

    (tmp_path / "cgroup").write_text("0::/job\n")
    monkeypatch.setattr("builtins.open", fake_open)
    assert memory._cgroup_room(str(tmp_path)) == 3 * 2**30
    (group / "memory.max").write_text("max\n")
    assert memory._cgroup_room(str(tmp_path)) is None


_FREED = """
import sys, torch
from peftlab import memory

def resident():
    return memory._proc_kb("/proc/self/status", "VmRSS") * 1024

if sys.argv[1] == "unmap":
    assert memory.unmap_freed()
torch.ones(2 << 20)  # 8 MB, mapped and freed at once, which lifts glibc's own threshold to 8 MB
blocks = [torch.ones(3 << 18) for _ in range(60)]  # 60 blocks of 3 MB
pin = torch.ones(3 << 18)  # allocated after them: on the heap, above them
held = resident()
del blocks
print(held - resident())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the mapping threshold is glibc's")
def test_freed_blocks_go_back_to_the_system_after_unmap_freed():
    """Without `memory.unmap_freed`, 180 MB of freed 3 MB blocks below a live one stay resident
    (the int8 base's saving lost to such holes); with it, each block was its own mapping."""
    returned = {how: int(subprocess.run([sys.executable, "-c", _FREED, how], capture_output=True, text=True,
                                        check=True).stdout) for how in ("default", "unmap")}
    assert returned["default"] < 40 * 2**20
    assert returned["unmap"] > 160 * 2**20


def test_the_int8_base_on_the_cpu_asks_for_freed_memory_back(monkeypatch):
    asked = []
    monkeypatch.setattr(int8.memory, "unmap_freed", lambda: asked.append(True) or True)
    model = models.load("tiny-llama", seed=0).model
    prepare(model, "lora:r=4")
    assert int8.quantize_frozen(model, torch.device("cpu")) > 0
    assert asked == [True]

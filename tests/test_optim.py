"""--master-weights bf16-compensated: bf16 trained weights with Kahan-compensated AdamW
updates and stochastically rounded bf16 moments, against fp32 master weights."""

import math

import pytest
import torch

from peftlab import checkpoint, data, kernels, models, optim
from peftlab.errors import UserError
from peftlab.methods import prepare, trainable_parameters
from peftlab import TrainConfig, train


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2 ** -10)  # a quarter of the way between two bf16 neighbours
    assert x.to(torch.bfloat16).float().mean() == 1.0  # round to nearest loses it
    for bits in (optim.random_bits(len(x), optim.stream_key(7, 1)) & 0xFFFF, optim.random_bits(len(x), 12345) >> 16):
        assert float(optim.round_stochastic(x, bits).float().mean()) == pytest.approx(1.0 + 2 ** -10, abs=2e-5)
        assert float(optim.round_stochastic(-x, bits).float().mean()) == pytest.approx(-1.0 - 2 ** -10, abs=2e-5)


def test_counter_based_bits_are_uniform_and_independent_of_the_split():
    n = 1 << 18
    bits = optim.random_bits(n, optim.stream_key(3, 5))
    assert int(bits.min()) >= 0 and int(bits.max()) < 1 << 32
    for part in (bits & 0xFFFF, bits >> 16):  # each 16-bit half: uniform over its 16 bins of 4,096
        counts = torch.bincount((part >> 12).long(), minlength=16).float()
        assert float(((counts - n / 16) ** 2 / (n / 16)).sum()) < 50  # chi-square, 15 degrees of freedom (p ≈ 1e-5)
    # the bits of element i depend on (seed, step, i) only: a slice of the stream is the stream's slice
    assert torch.equal(optim.random_bits(1000, optim.stream_key(3, 5) + 500), bits[500:1500])
    other = [optim.random_bits(n, optim.stream_key(s, t)) for s, t in ((3, 6), (4, 5))]
    assert all(float((o == bits).float().mean()) < 1e-3 for o in other)  # another step or seed: other bits
    low = (bits & 0xFFFF).double()  # neighbours uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([low[:-1], low[1:]]))[0, 1])) < 0.01


def _state(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, grad, m, v, c = (torch.randn(n, generator=g) * s for s in (0.05, 0.01, 1e-3, 1e-3, 1e-5))
    return [x.to(torch.bfloat16) for x in (w, grad, m, v.square(), c)]


SCALARS = [1e-3 / (1 - 0.9 ** 3), (1 - 0.999 ** 3) ** -0.5, 1e-3 * 0.01, 0.9, 0.999, 1e-8, 0.37]  # lr 1e-3, wd 0.01,
# step 3, gradients clipped by a factor 0.37


def _torch_ops(w, g, m, v, c, key, scalars):
    optim._update(w, g, m, v, c, torch.tensor(key), *(torch.tensor(x, dtype=torch.float32) for x in scalars))


def test_kernel_is_the_torch_step_bit_for_bit():
    """The built single-pass kernel computes exactly what the torch expression of the step does,
    split across threads or not."""
    if kernels.compiler() is None:
        pytest.skip("no C++ compiler here: the torch-ops step runs instead (tested below)")
    assert kernels.load() is not None, "a C++ compiler is present but the kernel did not build"
    for n in (1, 17, 4099, 3 * kernels.CHUNK + 5):
        ops, kernel = _state(n), _state(n)
        key = optim.stream_key(11, 3)
        _torch_ops(*ops, key, SCALARS)
        assert kernels.compensated_adamw(*kernel, key, *SCALARS)
        for name, a, b in zip("wgmvc", ops, kernel):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), (n, name)
    assert not torch.equal(ops[0], _state(n)[0])  # the step moved the weights


def test_kernel_allocates_no_tensor_sized_temporaries():
    from peftlab import memory

    if kernels.compiler() is None:
        pytest.skip("no C++ compiler here: the torch-ops step runs instead")
    n = 1 << 24  # 16M weights: one fp32 temporary would be 64 MB
    state = _state(n)
    kernels.compensated_adamw(*_state(8), 1, *SCALARS)  # built and loaded
    memory.reset_peak_memory(torch.device("cpu"))
    before = memory.peak_memory(torch.device("cpu"))
    assert kernels.compensated_adamw(*state, optim.stream_key(1, 1), *SCALARS)
    grew = memory.peak_memory(torch.device("cpu")) - before
    assert grew < 16e6, f"the update grew the process by {grew / 1e6:.0f} MB"


def test_without_a_compiler_the_torch_step_runs(monkeypatch):
    monkeypatch.setattr(kernels, "load", lambda: None)
    state, want = _state(100), _state(100)
    optim.update(*state, 5, SCALARS)
    _torch_ops(*want, 5, SCALARS)
    assert all(torch.equal(a, b) for a, b in zip(state, want))


def _updates(kind, steps=300, lr=1e-4):
    """Adam steps on w = 1 + small, whose updates are below half a bf16 step at |w| ≈ 1."""
    torch.manual_seed(0)
    w0 = 1 + 0.01 * torch.randn(4096)
    target = w0 + 0.02
    p = torch.nn.Parameter(w0.clone().to(torch.float32 if kind == "fp32" else torch.bfloat16))
    opt = {"fp32": lambda: torch.optim.AdamW([p], lr=lr, weight_decay=0.0),
           "bf16": lambda: torch.optim.AdamW([p], lr=lr, weight_decay=0.0),
           "compensated": lambda: optim.CompensatedAdamW([p], lr=lr)}[kind]()
    for _ in range(steps):
        p.grad = (p.detach().float() - target).to(p.dtype)
        opt.step()
    if kind == "compensated":  # the weight it stands for: the bf16 value plus what rounding it dropped
        return p.detach().float() + opt.state[p]["compensation"].float(), p.detach().float()
    return p.detach().float()


def test_compensated_bf16_follows_fp32_masters_where_plain_bf16_stalls():
    fp32, plain = _updates("fp32"), _updates("bf16")
    comp, stored = _updates("compensated")
    moved = (fp32 - _updates("fp32", steps=0)).abs().mean()
    assert moved > 0.01  # fp32 masters learn
    assert (plain - fp32).abs().mean() > 0.5 * moved  # plain bf16 rounds most updates away
    assert (comp - fp32).abs().mean() < 0.05 * moved  # compensated bf16 keeps them
    assert (stored - fp32).abs().max() <= 2 ** -7  # the bf16 weight itself: within one bf16 step of fp32


def _run(text_file, master, out=None, steps=4, resume=False, **extra):
    loaded = models.load("tiny-llama", seed=0)
    blocks = data.load_blocks(loaded, str(text_file), 32)
    prepared = prepare(loaded.model, "full", loaded.tokenizer)
    cfg = TrainConfig(steps=steps, batch_size=2, seq_len=32, lr=1e-3, warmup=0, eval_every=steps, device="cpu",
                      dtype="bf16", master_weights=master, **extra)
    records = train(loaded.model, blocks, prepared, cfg, out=out, show=False, resume=resume)
    return loaded.model, records


def test_full_fine_tune_with_compensated_bf16_weights(text_file):
    ref, want = _run(text_file, "fp32")
    model, got = _run(text_file, "bf16-compensated")
    trained = trainable_parameters(model)
    assert trained and all(p.dtype == torch.bfloat16 for p in trained.values())
    assert got[-1]["eval_loss"] == pytest.approx(want[-1]["eval_loss"], rel=0.02)
    assert got[-1]["eval_loss"] < got[0]["eval_loss"]


def test_compensated_run_resumes_bit_for_bit(text_file, tmp_path):
    whole, _ = _run(text_file, "bf16-compensated", out=tmp_path / "a", checkpoint_every=2)
    _run(text_file, "bf16-compensated", out=tmp_path / "b", checkpoint_every=2)
    for p in list((tmp_path / "b" / checkpoint.FOLDER).iterdir()):
        if p.name.endswith("4"):
            import shutil

            shutil.rmtree(p)  # as if killed after step 2's checkpoint
    assert checkpoint.latest(tmp_path / "b").name.endswith("2")
    resumed, _ = _run(text_file, "bf16-compensated", out=tmp_path / "b", checkpoint_every=2, resume=True)
    for name, p in trainable_parameters(whole).items():
        assert torch.equal(trainable_parameters(resumed)[name], p), name


def test_master_weights_errors(cli, text_file, tmp_path):
    code, _, err = cli("train", "-m", "tiny-llama", "-d", str(text_file), "--master-weights", "bf16-compensated",
                       "--dtype", "fp32", "--out", str(tmp_path / "r"))
    assert code == 2 and "needs --dtype bf16" in err
    code, _, err = cli("train", "-m", "tiny-llama", "-d", str(text_file), "--master-weights", "fp16", "--out", str(tmp_path / "r"))
    assert code == 2 and "--master-weights must be one of fp32, bf16-compensated" in err
    loaded = models.load("tiny-llama", seed=0)
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=32, device="cpu", dtype="fp32", master_weights="bf16-compensated")
    with pytest.raises(UserError, match="needs --dtype bf16"):
        train(loaded.model, data.load_blocks(loaded, str(text_file), 32), prepare(loaded.model, "full"), cfg, show=False)


def test_compensation_starts_from_the_exact_fp32_weights(text_file):
    """The fp32 weights rounded to bf16 plus the initial compensation are the fp32 weights (to
    the 8 bits the bf16 residual keeps), so a compensated run starts where an fp32-master run does."""
    p32 = torch.randn(10_000) * 0.05
    stored, residual = p32.to(torch.bfloat16), optim.rounding_residual(p32)
    assert (stored.float() + residual.float() - p32).abs().max() <= p32.abs().max() * 2 ** -16
    assert (stored.float() - p32).abs().max() > 1e-5  # bf16 alone drops that much

    loaded = models.load("tiny-llama", seed=0)
    start = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    blocks = data.load_blocks(loaded, str(text_file), 32)
    seen = {}
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=32, lr=1e-30, warmup=0, eval_every=-1, device="cpu", dtype="bf16",
                      master_weights="bf16-compensated")
    train(loaded.model, blocks, prepare(loaded.model, "full"), cfg, show=False,
          on_step=lambda step, record, opt: seen.update(opt=opt))
    for name, p in trainable_parameters(loaded.model).items():
        whole = p.detach().float() + seen["opt"].state[p]["compensation"].float()
        assert (whole - start[name]).abs().max() <= start[name].abs().max() * 2 ** -15, name


def test_total_norm_is_the_exact_norm_and_falls_back_to_torch():
    """Clipping's norm: the float64 norm of bf16 and fp32 gradients of any size (split across
    threads at 3·CHUNK + 5 elements); tensors the kernel does not take go to torch whole."""
    if kernels.compiler() is None:
        pytest.skip("no C++ compiler: torch's norm runs")
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=g).to(dt) for n, dt in
             [(1, torch.bfloat16), (37, torch.float32), (0, torch.bfloat16), (3 * kernels.CHUNK + 5, torch.bfloat16),
              (4099, torch.float32)]]
    exact = math.sqrt(sum(float(t.double().square().sum()) for t in grads))
    assert float(optim.total_norm(grads)) == pytest.approx(exact, rel=1e-6)
    odd = [grads[1], torch.randn(8, 4, generator=g).t(), torch.randn(5, generator=g).half()]  # strided, fp16
    for chosen in (odd[:2], odd[::2]):
        assert torch.equal(optim.total_norm(chosen), torch.nn.utils.get_total_norm(chosen))
    grads[3][17] = float("nan")
    assert optim.total_norm(grads).isnan()
    grads[3][17] = float("inf")
    assert optim.total_norm(grads).isinf()
    # squares past the fp32 range, in the vector loop and in the scalar tail: infinite, as torch's
    for n in (3 * kernels.CHUNK + 5, 3):
        huge = [torch.full((n,), 1e20)]
        assert optim.total_norm(huge).isinf() and torch.nn.utils.get_total_norm(huge).isinf()

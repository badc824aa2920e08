"""Many adapters on one base: switching, disabling, deleting, combining, per-row routing."""

import pytest
import torch

from conftest import perturb, sample_ids
from peftlab import load_model, prepare
from peftlab.adapters import (active_names, adapter_names, combine, delete, disabled, enable_adapter_names_kwarg,
                              per_row, set_active)
from peftlab.artifacts import load, save
from peftlab.errors import UserError


def two_loras(tmp_path, ranks=(4, 4), specs=None):
    """A base with LoRA adapters 'a' and 'b' loaded from files, plus their solo logits."""
    ids = None
    for i, name in enumerate("ab"):
        m = load_model("tiny-llama")
        spec = (specs or {}).get(name, f"lora:r={ranks[i]},targets=q_proj+v_proj+up_proj,seed={i}")
        prepared = prepare(m.model, spec)
        perturb(m.model, 0.1, seed=i + 5)
        save(m.model, prepared, tmp_path / name)
    base = load_model("tiny-llama")
    ids = sample_ids(base, 3)
    plain = base.model(input_ids=ids).logits
    for name in "ab":
        load(base.model, tmp_path / name, name=name)
    return base, ids, plain


def test_switch_disable_delete(tmp_path):
    base, ids, plain = two_loras(tmp_path)
    assert adapter_names(base.model) == ["a", "b"]
    outs = {}
    for name in "ab":
        set_active(base.model, name)
        assert active_names(base.model) == [name]
        outs[name] = base.model(input_ids=ids).logits
    assert not torch.allclose(outs["a"], outs["b"])
    with disabled(base.model):
        torch.testing.assert_close(base.model(input_ids=ids).logits, plain, atol=0, rtol=0)
    torch.testing.assert_close(base.model(input_ids=ids).logits, outs["b"], atol=0, rtol=0)
    delete(base.model, "b")
    assert adapter_names(base.model) == ["a"]
    set_active(base.model, "a")
    torch.testing.assert_close(base.model(input_ids=ids).logits, outs["a"], atol=0, rtol=0)
    with pytest.raises(UserError, match="no adapter named 'b'"):
        set_active(base.model, "b")


def deltas(model, name):
    return {h: s[name].delta_weight() for h, _, s in __import__("peftlab.methods.attach", fromlist=["attached"]).attached(model, "lora")
            if name in s}


@pytest.mark.parametrize("how, ranks", [("cat", (4, 2)), ("linear", (4, 4)), ("svd", (4, 2))])
def test_combinations_match_hand_computed_deltas(tmp_path, how, ranks):
    base, ids, _ = two_loras(tmp_path, ranks)
    da, db = deltas(base.model, "a"), deltas(base.model, "b")
    combine(base.model, {"a": 0.7, "b": -0.3}, "ab", how=how, rank=3 if how == "svd" else None)
    got = deltas(base.model, "ab")
    from peftlab.methods.attach import attached

    for host, _, slot in attached(base.model, "lora"):
        exact = 0.7 * da[host] + -0.3 * db[host]
        if how == "cat":
            torch.testing.assert_close(got[host], exact, atol=1e-6, rtol=0)
        elif how == "linear":  # peft's rule: A carries the weight's sign
            a, b = slot["a"], slot["b"]
            ka, kb = (0.7 * a.scaling) ** 0.5, (0.3 * b.scaling) ** 0.5
            hand = (ka * a.B + kb * b.B) @ (ka * a.A - kb * b.A)
            torch.testing.assert_close(got[host], hand, atol=1e-6, rtol=0)
        else:
            U, S, Vh = torch.linalg.svd(exact)
            torch.testing.assert_close(got[host], (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-5, rtol=0)
    set_active(base.model, "ab")
    assert torch.isfinite(base.model(input_ids=ids).logits).all()


@pytest.mark.parametrize("how", ["cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd",
                                 "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"])
def test_combinations_equal_peft_add_weighted_adapter(how, tmp_path, monkeypatch):
    """The same two adapters combined by peft's add_weighted_adapter and by ours: equal logits
    (TIES' sign election by sum and by count). DARE's masks are random, and peft draws them
    from the global generator after initialising the new adapter (which draws too), so here
    both sides get the same fixed masks; test_dare_draws_peft_masks checks the random ones."""
    from peft import PeftModel

    if how.startswith("dare"):
        fixed = lambda p, generator=None: (torch.arange(p.numel()).reshape(p.shape) % 5 < 3).to(p.dtype)  # noqa: E731
        monkeypatch.setattr(torch, "bernoulli", fixed)
    base, ids, _ = two_loras(tmp_path)
    theirs = PeftModel.from_pretrained(load_model("tiny-llama").model, str(tmp_path / "a"), adapter_name="a")
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    for sign in ("total", "frequency") if "ties" in how else ("total",):
        name = f"ab_{sign}"
        torch.manual_seed(7)
        theirs.add_weighted_adapter(["a", "b"], [0.7, -0.3], name, combination_type=how, svd_rank=3, density=0.6,
                                    majority_sign_method=sign)
        theirs.set_adapter(name)
        combine(base.model, {"a": 0.7, "b": -0.3}, name, how=how, rank=3, density=0.6, sign=sign, seed=7)
        set_active(base.model, name)
        torch.testing.assert_close(base.model(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", ["dare_linear", "dare_ties"])
def test_dare_draws_peft_masks(how):
    """mixing.mix with a generator seeded s equals peft's merge function after torch.manual_seed(s)."""
    from peft.utils import merge_utils

    from peftlab.mixing import mix

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 5, generator=g) for _ in range(3)]
    weights = [0.5, -0.2, 0.9]
    torch.manual_seed(11)
    args = (tensors, torch.tensor(weights), 0.4) + (("total",) if how == "dare_ties" else ())
    want = getattr(merge_utils, how)(*args)
    got = mix(tensors, weights, how, 0.4, "total", torch.Generator().manual_seed(11))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_combine_refuses_what_it_cannot_do(tmp_path):
    base, _, _ = two_loras(tmp_path, specs={"b": "adapter:r=4,seed=1"})
    with pytest.raises(UserError, match=r"bottleneck adapters \(nonlinear\) cannot be combined"):
        combine(base.model, {"b": 1.0}, "bb")
    for kwargs, says in (({"how": "ties", "density": 0}, "density=0 must be in"), ({"how": "ties", "sign": "most"}, "sign must be"),
                         ({"how": "best"}, "how must be one of"), ({"how": "ties_svd"}, "needs a positive rank")):
        with pytest.raises(UserError, match=says):
            combine(base.model, {"a": 1.0}, "x", **kwargs)


def test_linear_needs_equal_ranks(tmp_path):
    base, _, _ = two_loras(tmp_path, (4, 2))
    with pytest.raises(UserError, match="equal ranks"):
        combine(base.model, {"a": 1, "b": 1}, "ab", how="linear")


@pytest.mark.parametrize("second", ["lora", "adapter"])
def test_per_row_adapters_equal_each_row_alone(tmp_path, second):
    specs = {"b": "adapter:r=4,seed=1"} if second == "adapter" else None
    base, ids, plain = two_loras(tmp_path, specs=specs)
    ids = torch.stack([ids[0], ids[1].flip(0), ids[2]])
    routing = ["a", "b", "__base__"]
    alone = []
    for i, name in enumerate(routing):
        if name == "__base__":
            with disabled(base.model):
                alone.append(base.model(input_ids=ids[i : i + 1]).logits)
        else:
            set_active(base.model, name)
            alone.append(base.model(input_ids=ids[i : i + 1]).logits)
    with per_row(base.model, routing):
        mixed = base.model(input_ids=ids).logits
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=0)
    enable_adapter_names_kwarg(base.model)
    torch.testing.assert_close(base.model(input_ids=ids, adapter_names=routing).logits, mixed, atol=0, rtol=0)


def test_routing_is_switched_off_when_a_forward_raises():
    import pytest
    import torch

    from peftlab import adapters, load_model, prepare
    from peftlab.methods.attach import attached

    loaded = load_model("tiny-llama")
    prepare(loaded.model, "lora:r=2")
    adapters.enable_adapter_names_kwarg(loaded.model)
    bad = torch.full((1, 4), 10_000)  # past the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        loaded.model(input_ids=bad, adapter_names=["default"])
    assert all(slot.rows is None for _, _, slot in attached(loaded.model))


def test_routing_belongs_to_the_model_being_called():
    """Routing one model leaves another untouched (no process-wide state)."""
    import torch

    from peftlab import adapters, load_model, prepare
    from peftlab.methods.attach import attached

    a, b = load_model("tiny-llama"), load_model("tiny-llama")
    for loaded in (a, b):
        prepare(loaded.model, "lora:r=2")
    ids = torch.randint(0, 200, (2, 6))
    plain = b.model(input_ids=ids).logits
    with adapters.per_row(a.model, ["__base__", "default"]):
        assert all(slot.rows is None for _, _, slot in attached(b.model))
        torch.testing.assert_close(b.model(input_ids=ids).logits, plain, atol=0, rtol=0)


def test_routing_refuses_what_it_cannot_do(tmp_path):
    """As peft: unknown names, a name count that is not the batch's row count, and a merged
    adapter (every row would get it) are each one clear error, by both routing paths; nothing
    stays routed after a refusal."""
    from peftlab.merge import merge, unmerge
    from peftlab.methods.attach import attached

    base, ids, plain = two_loras(tmp_path)
    enable_adapter_names_kwarg(base.model)
    with pytest.raises(UserError, match="no adapter named 'c'; loaded: a, b"):
        base.model(input_ids=ids, adapter_names=["a", "c", "b"])
    with pytest.raises(UserError, match="no adapter named 'c'"):
        with per_row(base.model, ["c", "a", "b"]):
            pass
    with pytest.raises(UserError, match="adapter_names has 2 names for a batch of 3 rows"):
        base.model(input_ids=ids, adapter_names=["a", "b"])
    with pytest.raises(UserError, match="routed to 4 adapter names but the batch has 3 rows"):
        with per_row(base.model, ["a", "b", "a", "b"]):
            base.model(input_ids=ids)
    with pytest.raises(UserError, match="one adapter name per batch row"):
        base.model(input_ids=ids, adapter_names="a")
    assert all(slot.rows is None for _, _, slot in attached(base.model))
    set_active(base.model, "a")
    merge(base.model, ["a"])
    for route in (lambda: base.model(input_ids=ids, adapter_names=["a", "b", "__base__"]),
                  lambda: per_row(base.model, ["__base__", "b", "b"]).__enter__()):
        with pytest.raises(UserError, match="adapter 'a' is merged into the base weights, so every row would get it"):
            route()
    unmerge(base.model)
    routed = base.model(input_ids=ids, adapter_names=["__base__", "__base__", "__base__"]).logits
    torch.testing.assert_close(routed, plain, atol=1e-5, rtol=0)  # after unmerging, routing works again

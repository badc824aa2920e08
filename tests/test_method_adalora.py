"""AdaLoRA: counts, peft interop (same weights → same logits, both ways, with and without a
rank pattern), the orthogonality term and the rank budget equal to peft's on the same
gradients, masks that hold, and a run resumed mid-schedule."""

import pytest
import torch

from conftest import ARCHS, linear_dims, n_trainable, perturb, sample_ids
from method_checks import merges_exactly, named_and_routed, peft_agrees, starts_at_the_base
from peftlab import TrainConfig, load_blocks, load_model, prepare, train
from peftlab.artifacts import load, save
from peftlab.errors import UserError
from peftlab.methods.attach import attached

QV = {"tiny-gpt2": ("c_attn",)}


def leaves(arch):
    return list(QV.get(arch, ("q_proj", "v_proj")))


def peft_config(arch, **kw):
    from peft import AdaLoraConfig

    kw = dict(init_r=4, target_r=2, lora_alpha=8, total_step=10, target_modules=leaves(arch),
              fan_in_fan_out=arch == "tiny-gpt2") | kw
    return AdaLoraConfig(**kw)


def deltas(model) -> dict:
    return {host: slot["default"] for host, _, slot in attached(model, "adalora")}


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_are_r0_times_m_plus_n_plus_1(arch):
    model = load_model(arch).model
    prepare(model, "adalora:r=4,target_r=2")
    assert n_trainable(model) == sum(4 * (i + o + 1) for i, o in linear_dims(model, leaves(arch)))


@pytest.mark.parametrize("arch", ARCHS)
def test_same_weights_same_logits_as_peft_both_ways(arch, tmp_path):
    peft_agrees(arch, "adalora:r=4,target_r=2", peft_config(arch), tmp_path)


def test_starts_at_the_base_merges_and_routes():
    starts_at_the_base("tiny-llama", "adalora:r=4,target_r=2")
    merges_exactly("tiny-llama", "adalora:r=4,target_r=2")
    named_and_routed("tiny-llama", "adalora:r=4,target_r=2")


def test_orthogonality_term_equals_peft():
    """peft adds orth_reg_weight · mean ‖PPᵀ − I‖ to the model's loss in AdaLoraModel.forward (a
    PeftModel without task_type skips that forward, and the term with it); Budget.loss is that term."""
    from peft import get_peft_model, get_peft_model_state_dict

    theirs = get_peft_model(load_model("tiny-llama").model, peft_config("tiny-llama", orth_reg_weight=0.3))
    perturb(theirs, 0.1)
    ours = load_model("tiny-llama")
    prepared = prepare(ours.model, "adalora:r=4,target_r=2,orth=0.3")
    _copy_from_peft(ours.model, get_peft_model_state_dict(theirs))
    ids = sample_ids(ours)
    theirs.train()
    with_term = theirs.base_model(input_ids=ids, labels=ids).loss
    task = ours.model(input_ids=ids, labels=ids).loss
    (term,) = [t.loss(ours.model) for t in prepared.training]
    torch.testing.assert_close(task + term, with_term, atol=1e-5, rtol=0)
    assert term.item() > 0


def _copy_from_peft(model, state: dict) -> None:
    """peft's adapter tensors (base_model.model.<host>.lora_X) into our AdaLoRA deltas."""
    with torch.no_grad():
        for host, d in deltas(model).items():
            for ours, theirs in d.peft_keys.items():
                getattr(d, ours).copy_(state[f"base_model.model.{host}.{theirs}"])


def test_rank_budget_equals_peft_on_the_same_gradients():
    """Both sides get the same gradients and the same SGD step, then peft's update_and_allocate(t)
    and our after_step(t): through warmup (tinit), the cubic fall every deltaT steps, the
    fixed pattern (t = T − tfinal) and the final phase, E's masks and values stay equal."""
    from peft import get_peft_model, get_peft_model_state_dict

    config = peft_config("tiny-llama", init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12)
    theirs = get_peft_model(load_model("tiny-llama").model, config)
    perturb(theirs, 0.05)
    ours = load_model("tiny-llama")
    (budget,) = prepare(ours.model, "adalora:r=6,target_r=2,tinit=2,tfinal=3,delta_t=2").training
    _copy_from_peft(ours.model, get_peft_model_state_dict(theirs))
    budget.start(ours.model, 12)
    mine = {f"{h}.{n}": getattr(d, n) for h, d in deltas(ours.model).items() for n in ("A", "B", "E")}
    names = {"A": "lora_A", "B": "lora_B", "E": "lora_E"}
    peft_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    pairs = [(mine[k], peft_params[f"base_model.model.{k.rsplit('.', 1)[0]}.{names[k[-1]]}.default"]) for k in mine]
    g = torch.Generator().manual_seed(0)
    kept_counts = []
    for step in range(1, 13):
        with torch.no_grad():
            for a, b in pairs:
                grad = torch.randn(a.shape, generator=g)
                a.grad, b.grad = grad.clone(), grad.clone()
                a.sub_(0.01 * grad)
                b.sub_(0.01 * grad)
        theirs.base_model.update_and_allocate(step)
        budget.after_step(ours.model, step)
        for a, b in pairs:
            assert torch.equal(a, b), step
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern:
            for host, d in deltas(ours.model).items():
                assert d.kept.tolist() == pattern[f"{host}.lora_E.default"], (step, host)
            kept_counts.append(sum(int(d.kept.sum()) for d in deltas(ours.model).values()))
    layers = len(deltas(ours.model))
    assert kept_counts[0] < 6 * layers and kept_counts[-1] == 2 * layers  # the budget fell to target_r per layer
    assert sorted(kept_counts, reverse=True) == kept_counts


def _trained(text_file, spec, steps=8, out=None, **kw):
    loaded = load_model("tiny-llama", seed=0)
    prepared = prepare(loaded.model, spec)
    cfg = TrainConfig(steps=steps, batch_size=4, seq_len=32, lr=1e-2, warmup=0, eval_every=-1, **kw)
    records = train(loaded.model, load_blocks(loaded, str(text_file), 32), prepared, cfg, out=out, show=False)
    return loaded, prepared, records


def test_training_ends_at_the_target_budget_and_saves_peft_rank_pattern(text_file, tmp_path):
    """After a run the kept triplets are target_r per layer on average, masked E entries are
    zero, and the folder holds only the kept triplets with peft's rank_pattern: peft loads it
    with equal logits, and so do we."""
    from peft import PeftModel

    loaded, prepared, records = _trained(text_file, "adalora:r=4,target_r=2,tinit=1,tfinal=2")
    assert all(r["method_loss"] > 0 for r in records if r["step"] > 0)
    ds = deltas(loaded.model)
    assert sum(int(d.kept.sum()) for d in ds.values()) == 2 * len(ds)
    assert len({int(d.kept.sum()) for d in ds.values()}) > 1, "the budget moved between layers"
    for d in ds.values():
        assert torch.all(d.E[~d.kept] == 0)
    ids = sample_ids(loaded)
    want = loaded.model(input_ids=ids).logits
    folder = save(loaded.model, prepared, tmp_path / "a", base_model="tiny-llama")
    import json

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 8
    assert {k: sum(v) for k, v in config["rank_pattern"].items()} == {f"{h}.lora_E": int(d.kept.sum()) for h, d in ds.items()}
    by_peft = PeftModel.from_pretrained(load_model("tiny-llama").model, str(folder))
    torch.testing.assert_close(by_peft(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    fresh = load_model("tiny-llama")
    reloaded = load(fresh.model, folder)
    assert {h: d.A.shape[0] for h, d in deltas(fresh.model).items()} == {h: int(d.kept.sum()) for h, d in ds.items()}
    torch.testing.assert_close(fresh.model(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    # saved again from the loaded (resized) form: peft reads it with the same logits
    again = save(fresh.model, reloaded, tmp_path / "b")
    by_peft = PeftModel.from_pretrained(load_model("tiny-llama").model, str(again))
    torch.testing.assert_close(by_peft(input_ids=ids).logits, want, atol=1e-5, rtol=0)


def test_peft_trained_rank_pattern_loads_with_equal_logits(tmp_path):
    """peft's own allocation, saved by peft (resized tensors + rank_pattern), loads here."""
    from peft import get_peft_model

    theirs = get_peft_model(load_model("tiny-llama").model, peft_config("tiny-llama", init_r=4, target_r=1, total_step=4))
    perturb(theirs, 0.1)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        for p in theirs.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g)
        theirs.base_model.update_and_allocate(step)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = load_model("tiny-llama")
    load(ours.model, tmp_path / "theirs")
    ids = sample_ids(ours)
    torch.testing.assert_close(ours.model(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert sum(d.A.shape[0] for d in deltas(ours.model).values()) == len(deltas(ours.model))


def test_bad_schedules_are_one_line_errors(text_file):
    with pytest.raises(UserError, match="target_r=6 is above r=4"):
        prepare(load_model("tiny-llama").model, "adalora:r=4,target_r=6")
    with pytest.raises(UserError, match="tinit=5 and tfinal=4 leave no step of a 8-step run"):
        _trained(text_file, "adalora:r=4,target_r=2,tinit=5,tfinal=4")


def test_equal_ranks_keep_every_triplet(text_file):
    """target_r = r: the budget never falls, nothing is masked (peft's kthvalue(k=0) would raise)."""
    loaded, _, _ = _trained(text_file, "adalora:r=2,target_r=2", steps=3)
    assert all(bool(d.kept.all()) for d in deltas(loaded.model).values())


def test_resumed_with_other_steps_is_refused(text_file, tmp_path):
    _trained(text_file, "adalora:r=4,target_r=2", steps=6, out=tmp_path / "run", checkpoint_every=2)
    loaded = load_model("tiny-llama", seed=0)
    prepared = prepare(loaded.model, "adalora:r=4,target_r=2")
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=32, lr=1e-2, warmup=0, eval_every=-1, checkpoint_every=2)
    from peftlab import checkpoint

    folder = checkpoint.latest(tmp_path / "run")
    assert folder is not None
    with pytest.raises(UserError, match="scheduled over 6 steps; resume with --steps 6"):
        train(loaded.model, load_blocks(loaded, str(text_file), 32), prepared, cfg, out=tmp_path / "run", show=False,
              resume=True)


def test_fsdp_is_refused_with_a_reason(text_file):
    with pytest.raises(UserError, match="adalora needs whole tensors in every process"):
        _trained(text_file, "adalora:r=4,target_r=2", fsdp=True)


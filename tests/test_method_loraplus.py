"""LoRA+: B's learning rate is ratio × A's; otherwise exactly LoRA (counts, peft format, merge)."""

import pytest

from conftest import ARCHS, linear_dims, n_trainable, perturb
from method_checks import merges_exactly, named_and_routed, peft_agrees, starts_at_the_base
from peftlab import TrainConfig, load_blocks, load_model, prepare, train
from peftlab.errors import UserError
from peftlab.methods import parameter_groups, trainable_parameters

QV = {"tiny-gpt2": ("c_attn",)}


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_are_loras(arch):
    model = load_model(arch).model
    prepare(model, "loraplus:r=4")
    assert n_trainable(model) == sum(4 * (i + o) for i, o in linear_dims(model, QV.get(arch, ("q_proj", "v_proj"))))


def test_b_gets_ratio_times_the_learning_rate():
    model = load_model("tiny-llama").model
    prepared = prepare(model, "loraplus:r=4,ratio=8")
    groups = parameter_groups(prepared, model, trainable_parameters(model).values())
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["lr_scale"] for g in groups] == [1.0, 8.0]
    assert all(names[id(p)].endswith(".A") for p in groups[0]["params"])
    assert all(names[id(p)].endswith(".B") for p in groups[1]["params"])


def test_expert_parameters_b_gets_the_ratio_too():
    """With target_parameters (MoE experts' stacked weights) each expert LoRA's B is faster too."""
    model = load_model("tiny-mixtral").model
    prepared = prepare(model, "loraplus:r=2,ratio=4,targets=q_proj,target_parameters=experts.gate_up_proj")
    scales = prepared.lr_scales(model)
    trained = trainable_parameters(model)
    assert {n for n in trained if n.endswith(".B")} == set(scales) and set(scales.values()) == {4.0}
    assert any(".factors.gate_up_proj.B" in n for n in scales) and any(n.endswith("q_proj.lora.default.B") for n in scales)


def test_one_training_step_moves_b_by_ratio_times_lora(text_file):
    """AdamW's first step moves each entry by ≈ lr: B's step under LoRA+ is ratio × LoRA's."""
    moved = {}
    for spec in ("lora:r=4", "loraplus:r=4,ratio=4"):
        loaded = load_model("tiny-llama", seed=0)
        prepared = prepare(loaded.model, spec)
        perturb(loaded.model, 0.1)  # B off zero, so both factors get gradients
        start = {n: p.detach().clone() for n, p in trainable_parameters(loaded.model).items()}
        train(loaded.model, load_blocks(loaded, str(text_file), 32), prepared,
              TrainConfig(steps=1, batch_size=2, seq_len=32, lr=1e-3, warmup=0, eval_every=-1), show=False)
        moved[spec] = {k: (p - start[n]).abs().max().item() for n, p in trainable_parameters(loaded.model).items()
                       for k in ("A", "B") if n.endswith("." + k)}
    assert moved["loraplus:r=4,ratio=4"]["A"] == pytest.approx(moved["lora:r=4"]["A"], rel=0.05)
    assert moved["loraplus:r=4,ratio=4"]["B"] == pytest.approx(4 * moved["lora:r=4"]["B"], rel=0.05)


@pytest.mark.parametrize("arch", ARCHS)
def test_saves_as_peft_lora(arch, tmp_path):
    from peft import LoraConfig

    peft_agrees(arch, "loraplus:r=4,alpha=8", LoraConfig(r=4, lora_alpha=8, target_modules=list(QV.get(arch, ("q_proj", "v_proj"))),
                                                         fan_in_fan_out=arch == "tiny-gpt2"), tmp_path)


def test_identity_merge_and_names():
    starts_at_the_base("tiny-llama", "loraplus:r=4")
    merges_exactly("tiny-llama", "loraplus:r=4")
    named_and_routed("tiny-llama", "loraplus:r=4")


def test_ratio_must_be_at_least_one():
    with pytest.raises(UserError, match="ratio=0.5 is out of range"):
        prepare(load_model("tiny-llama").model, "loraplus:ratio=0.5")


def test_hf_trainer_gives_b_its_learning_rate(tmp_path):
    from transformers import Trainer, TrainingArguments

    from peftlab.trainer import adapter_trainer

    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "loraplus:r=4,ratio=8")
    trainer = adapter_trainer(Trainer)(model=loaded.model, prepared=prepared,
                                       args=TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to=[]))
    opt = trainer.create_optimizer()
    names = {id(p): n for n, p in loaded.model.named_parameters()}
    lr = {names[id(p)].rsplit(".", 1)[-1]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr == {"A": pytest.approx(1e-3), "B": pytest.approx(8e-3)}

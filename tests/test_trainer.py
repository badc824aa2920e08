"""peftlab strategies under HF Trainer and TRL's SFTTrainer: checkpoints and final saves are
small adapters (peft's format for LoRA), resume_from_checkpoint works, nothing of the base."""

import json

import pytest
import torch

from peftlab import artifacts, load_blocks, load_model, prepare
from peftlab.trainer import adapter_trainer


def rows(loaded, text_file, n=16):
    blocks = load_blocks(loaded, str(text_file), 32)
    return [{"input_ids": ids.tolist(), "labels": ids.tolist()} for ids in blocks.train_ids[:n]]


def args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=4,
                save_steps=2, logging_steps=1, report_to=[], seed=0, use_cpu=True, save_strategy="steps")
    return TrainingArguments(**(base | kw))


def logits(model, loaded):
    ids = torch.tensor([loaded.encode("Call me Ishmael. Some years ago")])
    with torch.no_grad():
        return model(input_ids=ids).logits


def train_lora(tmp_path, text_file, max_steps=4, resume=None, **kw):
    from transformers import Trainer

    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "lora:r=4,targets=all-linear")
    trainer = adapter_trainer(Trainer)(model=loaded.model, args=args(tmp_path, max_steps=max_steps, **kw),
                                       train_dataset=rows(loaded, text_file), prepared=prepared, base_model="tiny-llama")
    trainer.train(resume_from_checkpoint=resume)
    return loaded, trainer


def test_trainer_checkpoints_are_small_peft_adapters_and_resume(tmp_path, text_file):
    from peft import PeftModel

    loaded, trainer = train_lora(tmp_path, text_file)
    ckpt = tmp_path / "out" / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors", "optimizer.pt"} <= names
    assert "config.json" not in names  # AutoModelForCausalLM must refuse it rather than drop the adapter
    adapter_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    base_bytes = sum(p.numel() * 4 for p in loaded.model.parameters() if not p.requires_grad)
    assert adapter_bytes < base_bytes / 3
    trainer.save_model(str(tmp_path / "final"))
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # peft and peftlab load the final adapter with the trained model's logits
    want = logits(loaded.model, loaded)
    theirs = PeftModel.from_pretrained(load_model("tiny-llama").model, str(tmp_path / "final")).eval()
    ours = load_model("tiny-llama")
    artifacts.load(ours.model, tmp_path / "final")
    torch.testing.assert_close(logits(theirs, loaded), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(ours.model, ours), want, atol=1e-5, rtol=0)
    # resume from checkpoint-2 alone: the same final weights as the uninterrupted run
    import shutil

    shutil.copytree(tmp_path / "out" / "checkpoint-2", tmp_path / "resume" / "out" / "checkpoint-2")
    resumed, trainer3 = train_lora(tmp_path / "resume", text_file, resume=True)
    assert trainer3.state.global_step == 4
    torch.testing.assert_close(logits(resumed.model, resumed), want, atol=1e-5, rtol=0)


def test_trl_sft_trainer_saves_adapters(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "lora:r=4")
    data = Dataset.from_list([{"messages": [{"role": "user", "content": f"Who is the captain? ({i})"},
                                            {"role": "assistant", "content": "Ahab, of the Pequod."}]} for i in range(16)])
    config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=2, save_steps=2,
                           learning_rate=1e-2, report_to=[], use_cpu=True, max_length=64, logging_steps=1,
                           bf16=False)  # TRL defaults to bf16 autocast, which stays on the trained model's forward
    trainer = adapter_trainer(trl.SFTTrainer)(model=loaded.model, args=config, train_dataset=data,
                                              processing_class=loaded.tokenizer, prepared=prepared)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    ckpt = tmp_path / "sft" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "config.json").exists()
    ours = load_model("tiny-llama")
    artifacts.load(ours.model, tmp_path / "final")
    torch.testing.assert_close(logits(ours.model, ours), logits(loaded.model.eval(), loaded), atol=1e-5, rtol=0)


def train_adalora(tmp_path, text_file, resume=None):
    from transformers import Trainer

    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "adalora:r=4,target_r=2,tinit=1,tfinal=1")
    trainer = adapter_trainer(Trainer)(model=loaded.model, args=args(tmp_path, max_steps=6), prepared=prepared,
                                       train_dataset=rows(loaded, text_file), base_model="tiny-llama")
    trainer.train(resume_from_checkpoint=resume)
    return loaded, prepared


def test_training_hooks_run_under_the_trainer_and_resume(tmp_path, text_file):
    """AdaLoRA under a Trainer: its schedule spans the Trainer's max_steps, the budget ends at
    target_r per layer, and a run resumed from checkpoint-4 (its scores and masks in
    peftlab_training.*) ends with the uninterrupted run's weights and masks."""
    import shutil

    from peftlab.methods.attach import attached

    loaded, prepared = train_adalora(tmp_path, text_file)
    (budget,) = prepared.training
    assert budget.total == 6
    deltas = [slot["default"] for _, _, slot in attached(loaded.model, "adalora")]
    assert sum(int(d.kept.sum()) for d in deltas) == 2 * len(deltas)
    assert (tmp_path / "out" / "checkpoint-4" / "peftlab_training.json").is_file()
    (tmp_path / "resume" / "out").mkdir(parents=True)
    shutil.copytree(tmp_path / "out" / "checkpoint-4", tmp_path / "resume" / "out" / "checkpoint-4")
    again, _ = train_adalora(tmp_path / "resume", text_file, resume=True)
    redo = [slot["default"] for _, _, slot in attached(again.model, "adalora")]
    for a, b in zip(deltas, redo):
        assert torch.equal(a.kept, b.kept)
        torch.testing.assert_close(b.E, a.E, atol=1e-6, rtol=0)


def test_a_schedule_is_refused_under_the_trainer(tmp_path):
    from transformers import Trainer

    from peftlab.errors import UserError

    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "schedule:mlp=0,attention=2")
    with pytest.raises(UserError, match="unfreezes parameters mid-run"):
        adapter_trainer(Trainer)(model=loaded.model, args=args(tmp_path), prepared=prepared, train_dataset=[])


@pytest.mark.parametrize("accum", [1, 2])
def test_a_method_loss_term_is_added_under_the_trainer(tmp_path, text_file, accum):
    """A strategy step's loss term (Training.loss) joins the Trainer's loss once per optimizer
    step whatever the gradient accumulation: a constant term of 10 leaves training unchanged and
    raises every logged loss by exactly 10."""
    from transformers import Trainer

    from peftlab.methods.protocol import Training

    class Constant(Training):
        def loss(self, model):
            return torch.tensor(10.0)

    logged = []
    for term in (False, True):
        loaded = load_model("tiny-llama")
        prepared = prepare(loaded.model, "lora:r=4")
        if term:
            prepared.training.append(Constant())
        trainer = adapter_trainer(Trainer)(model=loaded.model, train_dataset=rows(loaded, text_file), prepared=prepared,
                                           args=args(tmp_path / str(term), max_steps=3, save_steps=10,
                                                     per_device_train_batch_size=4 // accum,
                                                     gradient_accumulation_steps=accum))
        trainer.train()
        logged.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(logged[0]) == 3
    assert logged[1] == pytest.approx([x + 10 for x in logged[0]], abs=1e-3)

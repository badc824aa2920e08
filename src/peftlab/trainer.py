"""peftlab strategies under Hugging Face `Trainer` and TRL's `SFTTrainer`.

    from peftlab import prepare
    from peftlab.trainer import adapter_trainer
    prepared = prepare(model, "lora:r=16,targets=all-linear")     # freezes the rest
    SFTTrainer = adapter_trainer(trl.SFTTrainer)                 # or adapter_trainer(transformers.Trainer)
    trainer = SFTTrainer(model=model, args=..., train_dataset=..., prepared=prepared, base_model="HuggingFaceTB/...")
    trainer.train(resume_from_checkpoint=True)
    trainer.save_model("runs/sft/adapter")

The trainer class is the caller's own, with public methods changed. `create_optimizer`
splits the Trainer's parameter groups by the learning-rate multipliers a method asks for
(LoRA+: B at ratio × lr); `compute_loss` adds a method's loss term (AdaLoRA's orthogonality)
and a callback runs its hooks around the optimizer step (after the Trainer's clipping) and
gives it the run's length; its state rides in every checkpoint (`peftlab_training.*`) and
comes back with `train(resume_from_checkpoint=...)`. `save_model`, which
the Trainer calls for every checkpoint and for the final save, writes a peftlab artifact
(peft's format where peft can express the strategy) instead of the whole model, so nothing
of the frozen base is saved. Each folder also holds `model.safetensors` with the trained
tensors under the model's own names: Trainer's `resume_from_checkpoint` loads that file into
the model (frozen weights stay as loaded), while optimizer, scheduler and RNG states are the
Trainer's own files beside it. No config.json is written, so `AutoModelForCausalLM` refuses
the folder instead of loading a base without its adapter.
"""

import os
from pathlib import Path

from . import artifacts, distributed, outputs
from .artifacts.io import read_json, read_tensors, write_tensors
from .artifacts.native import trained_tensors
from .errors import UserError
from .files import write_json
from .methods import parameter_groups

RESUME_FILE = "model.safetensors"  # the name Trainer looks for when it resumes
TRAINING_STATE = "peftlab_training"  # .json + .safetensors: the strategy steps' training-time state


def save_for_trainer(model, prepared, folder, base_model: str = "") -> Path:
    """Write the adapter and the trained tensors into `folder`, beside whatever else is there
    (the Trainer's optimizer and scheduler states). Every process calls it; rank 0 writes."""
    folder = Path(folder)
    staging = folder / ".peftlab-adapter"
    artifacts.save(model, prepared, staging, base_model=base_model)
    if distributed.is_main():
        for f in staging.iterdir():
            os.replace(f, folder / f.name)
        staging.rmdir()
        write_tensors(folder / RESUME_FILE, trained_tensors(model, prepared))
        if prepared.training:
            states = [t.state() for t in prepared.training]
            tensors = {f"{i}.{k}": v.detach().cpu() for i, (_, own) in enumerate(states) for k, v in own.items()}
            if tensors:
                write_tensors(folder / f"{TRAINING_STATE}.safetensors", tensors)
            write_json(folder / f"{TRAINING_STATE}.json", {"training": [meta for meta, _ in states]})
    distributed.barrier()
    return folder


def restore_training(prepared, folder: Path) -> None:
    """Put the training state saved in a Trainer checkpoint back (nothing when it holds none)."""
    path = Path(folder) / f"{TRAINING_STATE}.json"
    if not prepared.training or not path.is_file():
        return
    saved = read_json(path, required=("training",))["training"]
    held = Path(folder) / f"{TRAINING_STATE}.safetensors"
    tensors = read_tensors(held) if held.is_file() else {}
    if len(saved) != len(prepared.training):
        raise UserError(f"{path}: holds the training state of {len(saved)} strategy steps, this strategy has "
                        f"{len(prepared.training)}; resume with the strategy that wrote it")
    for i, t in enumerate(prepared.training):
        t.restore(saved[i], {k[len(f"{i}."):]: v for k, v in tensors.items() if k.startswith(f"{i}.")})


def _hooks(trainer):
    """A TrainerCallback running the strategy steps' training hooks."""
    from transformers import TrainerCallback

    class Hooks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            model = trainer.accelerator.unwrap_model(trainer.model)
            for t in trainer.peftlab_prepared.training:
                t.start(model, state.max_steps)
            if trainer.peftlab_resume:
                restore_training(trainer.peftlab_prepared, trainer.peftlab_resume)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            model = trainer.accelerator.unwrap_model(trainer.model)
            for t in trainer.peftlab_prepared.training:
                t.after_backward(model, state.global_step + 1)

        def on_optimizer_step(self, args, state, control, **kwargs):
            model = trainer.accelerator.unwrap_model(trainer.model)
            for t in trainer.peftlab_prepared.training:
                t.after_step(model, state.global_step + 1)

    return Hooks()


def adapter_trainer(base: type) -> type:
    """A subclass of `base` (Trainer, SFTTrainer, ...) that saves peftlab adapters. It takes two
    more keyword arguments: `prepared` (what `peftlab.prepare` returned) and `base_model` (the
    name written into the adapter for other tools to find the base)."""

    class AdapterTrainer(base):
        def __init__(self, *args, prepared, base_model: str = "", **kwargs):
            if prepared.unfreeze_at:
                raise UserError("a strategy that unfreezes parameters mid-run (schedule) trains with `peftlab train` "
                                "or peftlab.train, not under a Trainer, whose optimizer is built once")
            super().__init__(*args, **kwargs)
            self.peftlab_prepared, self.peftlab_base_model = prepared, base_model
            self.peftlab_resume = None
            if prepared.training:
                self.add_callback(_hooks(self))

        def train(self, resume_from_checkpoint=None, *args, **kwargs):
            found = resume_from_checkpoint
            if found is True:
                from transformers.trainer_utils import get_last_checkpoint

                found = get_last_checkpoint(self.args.output_dir)
            self.peftlab_resume = found or None
            return super().train(resume_from_checkpoint, *args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            term = self.peftlab_prepared.loss(self.accelerator.unwrap_model(model)) if model.training else None
            if term is None:
                return result
            if num_items_in_batch is not None and getattr(self, "model_accepts_loss_kwargs", False):
                term = term / self.args.gradient_accumulation_steps  # the Trainer then sums micro-batches' losses
            return (result[0] + term, result[1]) if return_outputs else result + term

        def create_optimizer(self, *args, **kwargs):
            opt = super().create_optimizer(*args, **kwargs)
            model = self.accelerator.unwrap_model(self.model)
            groups = [g | sub | {"lr": g["lr"] * sub["lr_scale"]} for g in opt.param_groups
                      for sub in parameter_groups(self.peftlab_prepared, model, g["params"])]
            if any(g["lr_scale"] != 1 for g in groups):  # before the first step: no optimizer state yet
                opt.param_groups.clear()
                for g in groups:
                    opt.add_param_group(g)
            return opt

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            folder = Path(output_dir or self.args.output_dir)
            model = self.accelerator.unwrap_model(self.model)
            # The output policy: a Trainer keeps writing into its own output_dir (continuing its
            # job), but never into or over the base model's folder.
            outputs.check(folder, inputs=(getattr(model.config, "name_or_path", None),), continuing=True,
                          flag="output_dir")
            folder.mkdir(parents=True, exist_ok=True)
            save_for_trainer(model, self.peftlab_prepared, folder, self.peftlab_base_model)

    AdapterTrainer.__name__ = AdapterTrainer.__qualname__ = f"Adapter{base.__name__}"
    return AdapterTrainer

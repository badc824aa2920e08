"""peftlab strategies under Hugging Face `Trainer` and TRL's `SFTTrainer`.

    from peftlab import prepare
    from peftlab.trainer import adapter_trainer
    prepared = prepare(model, "lora:r=16,targets=all-linear")     # freezes the rest
    SFTTrainer = adapter_trainer(trl.SFTTrainer)                 # or adapter_trainer(transformers.Trainer)
    trainer = SFTTrainer(model=model, args=..., train_dataset=..., prepared=prepared, base_model="HuggingFaceTB/...")
    trainer.train(resume_from_checkpoint=True)
    trainer.save_model("runs/sft/adapter")

The trainer class is the caller's own, with two public methods changed. `create_optimizer`
splits the Trainer's parameter groups by the learning-rate multipliers a method asks for
(LoRA+: B at ratio × lr), and `save_model`, which
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
from .artifacts.io import write_tensors
from .artifacts.native import trained_tensors
from .methods import parameter_groups

RESUME_FILE = "model.safetensors"  # the name Trainer looks for when it resumes


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
    distributed.barrier()
    return folder


def adapter_trainer(base: type) -> type:
    """A subclass of `base` (Trainer, SFTTrainer, ...) that saves peftlab adapters. It takes two
    more keyword arguments: `prepared` (what `peftlab.prepare` returned) and `base_model` (the
    name written into the adapter for other tools to find the base)."""

    class AdapterTrainer(base):
        def __init__(self, *args, prepared, base_model: str = "", **kwargs):
            super().__init__(*args, **kwargs)
            self.peftlab_prepared, self.peftlab_base_model = prepared, base_model

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

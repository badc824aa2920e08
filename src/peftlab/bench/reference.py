"""The reference side of the benchmark: HF peft (or plain transformers for methods peft has
no class for) with the training loop a peft user writes, at every setting they can pick:
fp32; bf16 autocast over an fp32 model; the whole model loaded in bf16 (pure bf16 weights and
AdamW moments); each of them also under `torch.compile(model)`, which peft documents."""

import torch

from ..components import matches, where


def compiled(mode: str) -> bool:
    return mode.endswith("+compile")


def build(model, setup: dict, mode: str, grad_checkpoint: bool = False):
    """Wrap or freeze `model` like a peft user would; `mode` is fp32 | autocast | bf16-model,
    optionally `+compile` (applied by the caller, around the returned model)."""
    if grad_checkpoint:  # what peft's docs have a user call before get_peft_model
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode.startswith("bf16-model"):
        model = model.to(torch.bfloat16)
    kind = setup["peft"]
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        fan = model.config.model_type == "gpt2"
        model = get_peft_model(model, LoraConfig(r=setup["r"], lora_alpha=setup["alpha"], target_modules=setup["targets"],
                                                 use_dora=setup.get("dora", False), lora_dropout=0.0, fan_in_fan_out=fan,
                                                 task_type="CAUSAL_LM"))
    elif kind == "prompt":
        from peft import PromptTuningConfig, get_peft_model

        model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=setup["tokens"]))
    else:  # transformers alone: requires_grad by hand
        places = where(model)
        wanted = setup["train"].split("+")
        for name, p in model.named_parameters():
            p.requires_grad_(setup["train"] == "all" or any(matches(places[name], c) for c in wanted))
    return model


def train_steps(model, batches, steps: int, mode: str, cfg) -> list[float]:
    """AdamW over the trainable parameters, clip 1.0, the learning-rate schedule peftlab's side
    follows (so both reach comparable held-out losses); the wall time of every step."""
    import time

    from ..optim import lr_factor

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    times = []
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup)
        ids, labels = next(batches)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("autocast")):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times

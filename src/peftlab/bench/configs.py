"""The benchmark's configurations: one peftlab strategy and its HF peft / transformers twin."""

CONFIGS = {
    # name: (peftlab strategy, how a peft user sets up the same thing)
    "lora-r8-qv": ("lora:r=8,alpha=16,targets=q_proj+v_proj", {"peft": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}),
    "lora-r16-all": ("lora:r=16,alpha=32,targets=all-linear", {"peft": "lora", "r": 16, "alpha": 32, "targets": "all-linear"}),
    "dora-r8-qv": ("dora:r=8,alpha=16,targets=q_proj+v_proj", {"peft": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"], "dora": True}),
    "prompt-20": ("prompt:tokens=20", {"peft": "prompt", "tokens": 20}),
    "bitfit-norms": ("bitfit:norms=true", {"peft": None, "train": "norm"}),
    "freeze-attention": ("freeze-attention", {"peft": None, "train": "mlp+norm"}),
    "full": ("full", {"peft": None, "train": "all"}),
}

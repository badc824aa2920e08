"""Study 3: LoRA ranks against full fine-tuning and the other PEFT families.

LoRA on q and v at r = 1 ... 64, full fine-tuning, and prompt, prefix, adapter and bitfit
at comparable budgets, all on Moby-Dick from the same weights and batches. Adapter methods
train at 1e-3 (they start from zero and need a larger step); full fine-tuning at 1e-4.

    python studies/lora_rank_sweep.py
"""

from common import run_study

RANKS = [1, 2, 4, 8, 16, 32, 64]

if __name__ == "__main__":
    strategies = ["full"] + [f"lora:r={r}@1e-3" for r in RANKS] + [
        "prompt:tokens=20@1e-2",      # 11,520 trainable: about LoRA r=0.2
        "prefix:tokens=10@1e-3",      # 115,200: about LoRA r=2
        "adapter:r=8@1e-3",           # 562,080: about LoRA r=10
        "bitfit:norms=true@1e-3",     # 35,136: about LoRA r=0.6
    ]
    run_study("lora_rank_sweep", "moby-dick", strategies, steps=25, samples=3)

"""Study 2: freezing attention on Alice.

Freeze every attention block and the embeddings; train MLP and norms only, against full
fine-tuning. Trainable ratio, peak memory (each strategy in its own process), optimizer
state, time per step, loss, and forgetting measured on Moby-Dick.

    python studies/alice_freeze_attention.py
"""

from common import run_study

if __name__ == "__main__":
    run_study("alice_freeze_attention", "alice", ["full", "freeze-attention"], steps=40)

"""Study 1: targeted freezing on Moby-Dick.

Two identical copies of SmolLM2-135M; one trains fully, the other only W_Q, W_K, W_V of
blocks >= 6. Same data, same order. Loss, time per step, weight change per matrix, and the
share of generated tokens among the corpus's 100 most frequent tokens, before and after.

    python studies/moby_dick_targeted.py
"""

from common import run_study

if __name__ == "__main__":
    run_study("moby_dick_targeted", "moby-dick", ["full", "targeted-qkv:from_layer=6"], steps=40)

"""Run under torchrun by test_train_distributed.py: train each strategy data-parallel with DDP
and with FSDP2 through the Python API; rank 0 writes OUT/<mode>-<i>/ (adapter + losses.json)."""

import sys
from pathlib import Path

from peftlab import TrainConfig, artifacts, load_blocks, load_model, prepare, train
from peftlab import distributed
from peftlab.files import write_json

out, text, strategies = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
for mode in ("ddp", "fsdp"):
    for i, spec in enumerate(strategies):
        loaded = load_model("tiny-llama")
        prepared = prepare(loaded.model, spec)
        cfg = TrainConfig(steps=4, seq_len=32, batch_size=4, lr=1e-4, eval_every=2, fsdp=mode == "fsdp")
        records = train(loaded.model, load_blocks(loaded, text, 32), prepared, cfg, show=False)
        folder = artifacts.save(loaded.model, prepared, out / f"{mode}-{i}" / "adapter")  # every rank calls it
        if distributed.is_main():
            write_json(out / f"{mode}-{i}" / "losses.json", records)

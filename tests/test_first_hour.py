"""What a new user meets first: each strategy's own memory, readable files, reuse that ignores
display options, one vocabulary across commands."""

import os
import stat

import torch

from peftlab.train import TrainConfig
from peftlab.workbench import compare


def test_each_strategy_reports_its_own_peak_not_the_parents(tmp_path, text_file):
    bloat = torch.ones(400_000_000, dtype=torch.uint8)  # this (parent) process now holds 400 MB more
    bloat[::4096] = 2  # touch every page
    from peftlab.runtime import peak_memory

    parent = peak_memory(torch.device("cpu"))
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=32)
    summary = compare("tiny-llama", str(text_file), ["lora:r=2"], tmp_path / "cmp", cfg, forget=None, samples=1,
                      gen_tokens=4, show=False, log=lambda *a: None)
    worker = summary["strategies"][0]["peak_memory_bytes"]
    assert worker < parent - 300e6, (worker, parent)  # ru_maxrss would report at least the parent's peak
    del bloat


def test_weight_files_are_readable_like_every_other_output(cli, text_file, tmp_path):
    old = os.umask(0o022)
    try:
        code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "-s", "lora:r=2", "--steps", 2, "--seq-len", 32,
                           "--checkpoint-every", 1, "--quiet", "-o", tmp_path / "run")
        assert code == 0, err
        code, _, err = cli("merge", "-m", "tiny-llama", "-a", tmp_path / "run" / "adapter", "-o", tmp_path / "merged")
        assert code == 0, err
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "text.txt"]
    assert any(p.suffix == ".safetensors" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_display_only_options_do_not_retrain(tmp_path, text_file):
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=32)
    lines = []
    for show in (False, True):
        compare("tiny-llama", str(text_file), ["lora:r=2"], tmp_path / "cmp", cfg, forget=None, samples=1, gen_tokens=4,
                show=show, log=lines.append)
    assert "already done" in lines[-1]

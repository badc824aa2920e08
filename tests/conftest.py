import json
import os

import pytest

from peftlab import assets
from peftlab.cli import main

PARAGRAPH = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the watery "
    "part of the world. It is a way I have of driving off the spleen and regulating the circulation.\n"
)


@pytest.fixture
def text_file(tmp_path):
    """About 12 kB of English prose: enough blocks for a tiny model to learn from."""
    path = tmp_path / "text.txt"
    path.write_text(PARAGRAPH * 40)
    return path


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def need_assets(*names):
    missing = [n for n in names if not assets.is_fetched(n)]
    if missing and os.environ.get("CI"):
        pytest.fail(f"CI must fetch {missing} first (./dev test does)")
    if missing:
        pytest.skip(f"needs: peftlab fetch {' '.join(missing)}")


ARCHS = ["tiny-llama", "tiny-gptneo", "tiny-gpt2", "tiny-gemma3"]


def perturb(model, scale=0.2, seed=1):
    """Move every trainable tensor off its (often zero) init, so outputs really depend on it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def sample_ids(loaded, batch=2):
    import torch

    return torch.tensor([loaded.encode("Call me Ishmael. Some years ago, never mind")] * batch)


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def linear_dims(model, leaves=None):
    """[(in, out)] of the decoder's linear layers whose leaf name is in `leaves` (None: all)."""
    from peftlab.methods.targets import dims, linear_layers

    return [dims(m) for n, m in linear_layers(model).items() if leaves is None or n.rsplit(".", 1)[-1] in leaves]


@pytest.fixture(scope="session")
def bad_world(tmp_path_factory):
    """The files every bad-input case starts from (tests/bad_input.py), built once."""
    from bad_input import build_world

    return build_world(tmp_path_factory.mktemp("bad-world"))


@pytest.fixture
def bad_case(bad_world, tmp_path, capsys, monkeypatch):
    """run(case): one row of a bad-input table, checked as tests/bad_input.py describes."""
    from bad_input import run_case

    return lambda case: run_case(case, bad_world, tmp_path, capsys, monkeypatch)

"""Bad numbers are refused before anything loads; a run that diverges stops with one line,
or skips the step when asked; a non-finite adapter is never written."""

import json

import pytest
import torch

from peftlab.errors import UserError


@pytest.mark.parametrize("args, words", [
    (["-s", "lora:r=4,alpha=nan"], "alpha=nan must be a finite number"),
    (["-s", "lora:r=0"], "r=0 is out of range"),
    (["-s", "lora:dropout=1.5"], "dropout=1.5 is out of range"),
    (["-s", "prefix:tokens=-3"], "tokens=-3 is out of range"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lr", "inf"], "--lr must be a positive number"),
    (["--warmup", "nan"], "--warmup must be 0 or more"),
    (["--eval-every", "-1"], "--eval-every must be 0 or more"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be a positive number"),
])
def test_bad_numbers_are_one_line_before_anything_is_written(cli, text_file, tmp_path, args, words):
    code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "--steps", 2, "--seq-len", 32, "--quiet",
                       "-o", tmp_path / "run", *args)
    assert code == 2 and words in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_out_naming_a_file_is_refused(cli, text_file, tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "--steps", 2, "-o", other)
    assert code == 2 and "is a file" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "--steps", 2, "-o", text_file)
    assert code == 2 and "is the input" in err and len(err.strip().splitlines()) == 1


def test_a_diverging_run_stops_naming_the_step_and_writes_no_adapter(cli, text_file, tmp_path):
    # alpha=1e30 is a finite, valid number whose scale overflows the gradient at the first step.
    code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "-s", "lora:r=4,alpha=1e30", "--steps", 4,
                       "--seq-len", 32, "--quiet", "-o", tmp_path / "run")
    assert code == 2 and "step 1:" in err and "--skip-nonfinite" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "adapter").exists()


def test_skip_nonfinite_skips_and_counts(cli, text_file, tmp_path):
    """Each skipped step is counted (its non-finite numbers as null); a run whose every step was
    skipped learned nothing: one line, exit 2, no adapter and no run folder left."""
    code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "-s", "lora:r=4,alpha=1e30", "--steps", 3,
                       "--seq-len", 32, "--quiet", "-o", tmp_path / "run", "--skip-nonfinite")
    assert code == 2 and "every one of the 3 steps had a non-finite loss" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    from peftlab import TrainConfig, load_blocks, load_model, prepare, train
    from peftlab.loop import NonFinite

    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "lora:r=4,alpha=1e30")
    seen = []
    with pytest.raises(NonFinite):
        train(loaded.model, load_blocks(loaded, str(text_file), 32), prepared,
              TrainConfig(steps=3, skip_nonfinite=True), out=tmp_path / "api", show=False, on_record=seen.append)
    assert [r.get("skipped_total") for r in seen[1:]] == [1, 2, 3]
    lines = (tmp_path / "api" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(ln, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for ln in lines]
    assert all(r["grad_norm"] is None for r in records[1:])


def test_an_adapter_with_a_non_finite_tensor_is_never_written(tmp_path):
    from peftlab import artifacts, load_model, prepare

    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "lora:r=4")
    next(p for p in loaded.model.parameters() if p.requires_grad).data[0, 0] = float("inf")
    with pytest.raises(UserError, match="NaN or Inf"):
        artifacts.save(loaded.model, prepared, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists() and not list(tmp_path.iterdir())


def test_an_empty_tensor_is_never_written(tmp_path):
    from peftlab.artifacts.io import write_tensors

    with pytest.raises(UserError, match="empty"):
        write_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(0, 4)})

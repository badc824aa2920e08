"""Slow: a trained SmolLM2 adapter as a file: peft loads it, `peftlab merge` gives a plain model."""

import subprocess
import sys

import pytest
import torch

from conftest import need_assets

pytestmark = pytest.mark.slow


def test_train_save_peft_load_merge_plain_transformers(cli, tmp_path):
    need_assets("smollm2-135m", "moby-dick")
    from peft import PeftModel

    from peftlab import load_model

    run = tmp_path / "run"
    code, out, err = cli("train", "-m", "smollm2-135m", "-d", "moby-dick", "-s", "lora:r=8,targets=q_proj+v_proj",
                         "--steps", 5, "--seq-len", 64, "--batch-size", 2, "--lr", 1e-3, "--dtype", "auto", "-o", run, "--quiet")
    assert code == 0, err
    assert (run / "adapter" / "adapter_config.json").exists()
    assert "MB; the full model is 538.1 MB" in out
    loaded = load_model("smollm2-135m")
    ids = torch.tensor([loaded.encode("Call me Ishmael. Some years ago")])
    base = loaded.model(input_ids=ids).logits
    theirs = PeftModel.from_pretrained(loaded.model, str(run / "adapter"))
    want = theirs(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3  # five steps of training moved the outputs
    code, out, err = cli("merge", "-m", "smollm2-135m", "-a", run / "adapter", "-o", tmp_path / "merged")
    assert code == 0, err
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys; sys.modules['peftlab'] = None\n"
        "import torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r})\n"
        f"torch.save(m(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'l.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "l.pt"), want, atol=1e-4, rtol=0)

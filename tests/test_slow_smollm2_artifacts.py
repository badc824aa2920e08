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
                         "--steps", 5, "--seq-len", 64, "--batch-size", 2, "--lr", 1e-3, "--dtype", "auto", "-o", run, "--quiet",
                         "--eval-every", 5)  # held-out loss before and after: most of a short run's time is evaluation
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


def test_tied_smollm2_keeps_its_trained_output_layer_through_save_load_and_merge(cli, tmp_path):
    """SmolLM2 ties lm_head to the input embedding. With tie=true the one trained matrix is saved
    (peft's ensure_weight_tying layout), loads in peft and here with the trained logits, and
    `peftlab merge` writes a plain model whose tied embedding is the trained one."""
    need_assets("smollm2-135m", "moby-dick")
    from peft import PeftModel

    from peftlab import artifacts, load_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    code, out, err = cli("train", "-m", "smollm2-135m", "-d", "moby-dick", "-s", "lora:r=4/modules:names=lm_head,tie=true",
                         "--steps", 3, "--seq-len", 32, "--batch-size", 2, "--lr", 1e-3, "-o", run, "--quiet",
                         "--eval-every", 3)
    assert code == 0, err
    loaded = load_model("smollm2-135m")
    ids = torch.tensor([loaded.encode("Call me Ishmael. Some years ago")])
    base_head = loaded.model.get_output_embeddings().weight.detach().clone()
    ours = load_model("smollm2-135m")
    artifacts.load(ours.model, run / "adapter")
    want = ours.model(input_ids=ids).logits
    theirs = PeftModel.from_pretrained(loaded.model, str(run / "adapter"))
    torch.testing.assert_close(theirs(input_ids=ids).logits, want, atol=1e-4, rtol=0)
    code, out, err = cli("merge", "-m", "smollm2-135m", "-a", run / "adapter", "-o", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    assert not torch.equal(merged.get_output_embeddings().weight, base_head)  # the trained head survived
    torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_inits_from_data_train_on_smollm2_and_peft_loads_them_on_the_original_base(init, tmp_path):
    """init=eva / init=corda read the run's own training batches, train, and save as plain LoRA
    relative to the original SmolLM2 (CorDA changed the base it trained on): peft loads the
    folder onto the untouched model with the trained model's logits."""
    need_assets("smollm2-135m", "moby-dick")
    from peft import PeftModel

    from peftlab import load_model, run
    from peftlab.config import TrainConfig

    r = run.load("smollm2-135m", "moby-dick", TrainConfig(steps=3, seq_len=64, batch_size=2, lr=1e-3, eval_every=3), show=False)
    run.prepare(r, f"lora:r=8,init={init},calibration_batches={32 if init == 'eva' else 4},eva_tau=0.9")
    run.fit(r, show=False)
    folder = run.save(r, tmp_path / "adapter", show=False)
    ids = torch.tensor([r.loaded.encode("Call me Ishmael. Some years ago")])
    want = r.model(input_ids=ids).logits
    original = load_model("smollm2-135m")
    base = original.model(input_ids=ids).logits
    theirs = PeftModel.from_pretrained(original.model, str(folder))
    torch.testing.assert_close(theirs(input_ids=ids).logits, want, atol=1e-4, rtol=0)
    assert (want - base).abs().max() > 1e-3

"""The foundation's command line: train, generate, params, and one-line errors."""

import pytest

from conftest import read_metrics


def test_train_lowers_held_out_loss_and_is_reproducible(cli, text_file, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        code, stdout, err = cli("train", "--model", "tiny-llama", "--data", text_file, "--strategy", "full",
                                "--steps", 30, "--seq-len", 64, "--lr", 3e-3, "--out", out, "--quiet")
        assert code == 0, err
        runs.append(read_metrics(out))
        assert (out / "run.json").exists() and (out / "adapter" / "adapter.safetensors").exists()
    first, last = runs[0][0]["eval_loss"], runs[0][-1]["eval_loss"]
    assert last < first - 0.5
    assert [r.get("loss") for r in runs[0]] == [r.get("loss") for r in runs[1]]
    step = runs[0][5]
    assert set(step) >= {"step", "loss", "lr", "grad_norm", "step_time", "tokens_per_s", "peak_mem"}


def test_run_json_records_config_versions_hardware(cli, text_file, tmp_path):
    import json

    code, _, err = cli("train", "-m", "tiny-gpt2", "-d", text_file, "--steps", 2, "--seq-len", 32, "-o", tmp_path / "r",
                       "--quiet", "--seed", 7)
    assert code == 0, err
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["config"]["seed"] == 7 and run["versions"]["torch"] and run["hardware"]["cores"]
    assert run["strategy"] == "full"


def test_bf16_keeps_frozen_weights_bf16_and_trains(text_file):
    import torch

    from peftlab import TrainConfig, load_blocks, load_model, prepare, train

    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "freeze:train=mlp+norm")
    blocks = load_blocks(loaded, str(text_file), 64)
    records = train(loaded.model, blocks, prepared, TrainConfig(steps=10, lr=3e-3, dtype="bf16", batch_size=4), show=False)
    params = dict(loaded.model.named_parameters())
    assert params["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert params["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]


def test_params_gptneo_125m_shape(cli):
    code, out, _ = cli("params", "--model", "gptneo-125m-shape", "--strategy", "freeze:train=mlp+norm")
    assert code == 0
    total = [ln for ln in out.splitlines() if "total" in ln and "56,707,584" in ln]
    assert total and "125,198,592" in total[0]


def test_generate_is_deterministic(cli):
    a = cli("generate", "-m", "tiny-llama", "-p", "Call me", "--max-new-tokens", 10)
    b = cli("generate", "-m", "tiny-llama", "-p", "Call me", "--max-new-tokens", 10)
    assert a[0] == 0 and a[1] == b[1] and a[1].startswith("Call me")


@pytest.mark.parametrize(
    "args, says",
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--data", "/nonexistent/file.txt"], "data not found"),
        (["--data", "EMPTY"], "is empty"),
        (["--data", "SHORT"], "fewer than two blocks"),
        (["--seq-len", "0"], "--seq-len must be a positive"),
        (["--strategy", "lorax"], "unknown strategy 'lorax'"),
        (["--strategy", "freeze:trian=mlp"], "unknown key 'trian' (did you mean: train?)"),
        (["--strategy", "freeze:train=mpl"], "unknown component 'mpl' (did you mean: mlp?)"),
        (["--strategy", "freeze:train=mlp,layers=0-9"], "outside the model"),
        (["--steps", "abc"], "Invalid value for '--steps'"),
        (["--dtype", "fp8"], "--dtype must be one of"),
        (["--model", "smollm2-135m-missing.gguf"], "GGUF file not found"),
        (["--strategy", "lora:targets=q_prj"], "did you mean: q_proj"),
        (["--strategy", "lora:r=0"], "r=0 is out of range"),
        (["--strategy", "bitfit"], "use bitfit:norms=true"),
        (["--strategy", "lora:layers=2-4"], "outside the model"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, text_file, tmp_path, args, says):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("tiny")
    base = {"--model": "tiny-llama", "--data": str(text_file), "--strategy": "full", "--steps": "2", "--seq-len": "32"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = {"EMPTY": str(tmp_path / "empty.txt"), "SHORT": str(tmp_path / "short.txt")}.get(v, v)
    out = tmp_path / "out"
    code, stdout, err = cli("train", *[x for kv in base.items() for x in kv], "--out", out, "--quiet")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert says in err
    assert not out.exists()


def test_checkpoints_are_written_during_training(cli, text_file, tmp_path):
    code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "-s", "lora:r=4", "--steps", 4, "--seq-len", 32,
                       "--checkpoint-every", 2, "-o", tmp_path / "run", "--quiet")
    assert code == 0, err
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "state.safetensors").exists()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()


def test_a_named_lora_adapter_trains_and_saves(cli, text_file, tmp_path):
    import json

    code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "-s", "lora:r=2,name=moby", "--steps", 2,
                       "--seq-len", 32, "--quiet", "-o", tmp_path / "run")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 2

"""The benchmark end to end on a tiny model: every number present, ratios computed, no timing asserted."""

import json

from peftlab.bench import CONFIGS, markdown, run_bench


def test_bench_smoke(text_file, tmp_path):
    configs = ["lora-r8-qv", "bitfit-norms"]
    result = run_bench("tiny-llama", str(text_file), configs, ("bf16",), steps=2, warmup=1, repeats=1, batch_size=2,
                       seq_len=32, log=lambda *a: None)
    assert len(result["runs"]) == 2 * 4  # per config: ours as is and compiled; peft with bf16 autocast, or the model in bf16
    rows = {(r["config"], r["precision"]): r for r in result["rows"]}
    assert set(rows) == {(c, "bf16") for c in configs}
    for r in rows.values():
        assert r["peftlab_tok_s"] > 0 and r["peft_tok_s"] > 0 and r["speed_ratio"] > 0 and r["memory_ratio"] > 0
        assert 0 < r["peftlab_pct_ceiling"] and r["ceiling_tok_s"] > 0
        assert set(r["all_peftlab_tok_s"]) == {"eager", "compile"} and r["peftlab_mode"] in r["all_peftlab_tok_s"]
    same = {(r["config"], r["impl"]): r["trainable"] for r in result["runs"]}
    for c in configs:
        assert same[(c, "peftlab")] == same[(c, "peft")]  # both sides train the same parameters
    text = markdown(result)
    assert "| lora-r8-qv | bf16 |" in text and "GFLOP/s" in text and "| lora-r8-qv | bf16 | peftlab compile |" in text
    json.dumps(result)
    assert set(CONFIGS) >= {"lora-r8-qv", "lora-r16-all", "dora-r8-qv", "prompt-20", "bitfit-norms", "freeze-attention", "full"}


def test_bench_cli_errors(cli):
    code, _, err = cli("bench", "--case", "lora-r99")
    assert code == 2 and "unknown bench case 'lora-r99'" in err
    code, _, err = cli("bench", "--dtype", "fp16")
    assert code == 2 and "--dtype must be fp32 or bf16" in err

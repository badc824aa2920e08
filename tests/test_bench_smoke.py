"""The benchmark end to end on a tiny model: every number present, ratios computed, no timing asserted."""

import json

import pytest

from peftlab.bench import CONFIGS, markdown, ours, run_bench


def test_bench_smoke(text_file, tmp_path):
    """Every setting of both sides runs; each side is ranked by its fastest; the eager ratio and
    the held-out loss of every setting are reported."""
    result = run_bench("tiny-llama", str(text_file), ["lora-r8-qv"], ("fp32",), steps=2, warmup=2, repeats=1, batch_size=2,
                       seq_len=32, log=lambda *a: None)
    assert len(result["runs"]) == 3 + 2  # ours eager, compiled, compiled int8; peft fp32, and fp32 under torch.compile
    assert {r["mode"] for r in result["runs"] if r["impl"] == "peft"} == {"fp32", "fp32+compile"}
    (row,) = result["rows"]
    assert (row["config"], row["precision"]) == ("lora-r8-qv", "fp32")
    assert row["peftlab_tok_s"] > 0 and row["peft_tok_s"] > 0 and row["speed_ratio"] > 0 and row["memory_ratio"] > 0
    assert row["eager_speed_ratio"] > 0 and 0 < row["peftlab_pct_ceiling"] and row["ceiling_tok_s"] > 0
    assert all(r["gemm_flops_per_s"] > 0 for r in result["runs"])  # each run measured its own minute's ceiling
    assert set(row["settings"]["peftlab"]) == {"eager", "compile", "int8"}
    fastest = max(row["settings"]["peft"].items(), key=lambda kv: kv[1]["tokens_per_s"])[0]
    assert row["peft_any_mode"] == fastest  # the unconstrained ranking: its best setting, compiled ones included
    assert row["reference_loss"] == row["settings"]["peft"]["fp32"]["eval_loss"]
    losses = [v["eval_loss"] for side in row["settings"].values() for v in side.values()]
    assert all(2 < x < 20 for x in losses) and max(losses) - min(losses) < 0.1  # same start, same steps, near-equal
    same = {(r["config"], r["impl"]): r["trainable"] for r in result["runs"]}
    assert same[("lora-r8-qv", "peftlab")] == same[("lora-r8-qv", "peft")]  # both sides train the same parameters
    text = markdown(result)
    assert "| lora-r8-qv | fp32 | peftlab int8 |" in text and "| lora-r8-qv | fp32 | peft fp32+compile |" in text
    assert "GFLOP/s" in text and "eager ratio" in text and "Ranked at equal quality" in text
    json.dumps(result)
    assert set(CONFIGS) >= {"lora-r8-qv", "lora-r16-all", "dora-r8-qv", "prompt-20", "bitfit-norms", "freeze-attention", "full"}
    assert ours("full") == ["eager", "compile"]  # nothing frozen is a linear layer
    assert ours("full", "bf16") == ["eager", "compile", "compensated"] and "compensated" not in ours("lora-r8-qv", "bf16")


def _runs(table):
    """Bench runs from {(impl, mode): (tok/s, eval loss)} for one config in bf16."""
    return [{"config": "full", "precision": "bf16", "impl": impl, "mode": mode, "tokens_per_s": tok, "eval_loss": loss,
             "peak_rss_bytes": 1e9, "flops_per_token": 1e9} for (impl, mode), (tok, loss) in table.items()]


def test_ranking_is_by_speed_at_equal_quality():
    """A setting counts only when its held-out loss is within 0.5% of the reference's fp32-weight
    setting (bf16: autocast); the fastest at any loss is reported beside it."""
    from peftlab.bench import summarize

    runs = _runs({("peft", "autocast"): (400, 4.0780), ("peft", "autocast+compile"): (420, 4.0790),
                  ("peft", "bf16-model+compile"): (560, 4.1833),  # fast because it loses updates: 2.6% worse
                  ("peftlab", "compile"): (430, 4.0783), ("peftlab", "compensated"): (600, 4.0990),  # 0.51%: out
                  ("peftlab", "eager"): (300, 4.0600)})  # 0.44% lower: in
    (row,) = summarize(runs, {"bf16": 1e12})
    assert row["reference_loss"] == 4.0780
    assert (row["peftlab_mode"], row["peft_mode"]) == ("compile", "autocast+compile")
    assert row["speed_ratio"] == pytest.approx(430 / 420)
    assert (row["peftlab_any_mode"], row["peft_any_mode"]) == ("compensated", "bf16-model+compile")
    assert row["any_speed_ratio"] == pytest.approx(600 / 560)
    mine, theirs = row["settings"]["peftlab"], row["settings"]["peft"]
    assert not mine["compensated"]["eligible"] and mine["eager"]["eligible"] and not theirs["bf16-model+compile"]["eligible"]
    assert mine["compensated"]["loss_vs_reference"] == pytest.approx(4.0990 / 4.0780 - 1)
    text = markdown({"setup": {"model": "m", "data": "d", "batch_size": 4, "seq_len": 256, "warmup": 2, "steps": 5},
                     "machine": {"cpu": "cpu", "cpu_features": "AVX2, AVX-512, AVX-512 BF16"}, "gemm_flops_per_s": {"bf16": 1e12},
                     "rows": [row]})
    assert "cpu (AVX2, AVX-512, AVX-512 BF16)" in text
    assert "| full | bf16 | peftlab compensated | 600 | 60% | 1,000 | 4.0990 | +0.51% | **no** |" in text
    assert "| full | bf16 | 430 (compile) | 420 (autocast+compile) | **1.02×** |" in text


def test_several_rounds_show_the_ratio_of_each_round():
    from peftlab.bench import summarize

    runs = [r | {"round": k, "tokens_per_s": r["tokens_per_s"] * speed}
            for k, (mine, theirs) in enumerate([(1.0, 1.0), (1.2, 0.9), (0.9, 1.1)])
            for r in _runs({("peft", "autocast"): (400, 4.0), ("peftlab", "compile"): (600, 4.0)})
            for speed in [mine if r["impl"] == "peftlab" else theirs]]
    (row,) = summarize(runs, {"bf16": 1e12})
    assert row["speed_ratio"] == pytest.approx(600 / 400)  # medians of each side
    assert row["round_speed_ratios"] == pytest.approx([1.5, 1.5 * 1.2 / 0.9, 1.5 * 0.9 / 1.1])
    text = markdown({"setup": {"model": "m", "data": "d", "batch_size": 4, "seq_len": 256, "warmup": 2, "steps": 5},
                     "machine": {"cpu": "cpu"}, "gemm_flops_per_s": {"bf16": 1e12}, "rows": [row]})
    assert "| full | bf16 | 600 (compile) | 400 (autocast) | **1.50×** (rounds 1.23–2.00×) |" in text


def test_each_run_is_measured_against_the_ceiling_of_its_own_minute():
    """A run that carries the GEMM rate measured in its process is compared with that one (the
    host's speed moves); the shares and ceilings are medians over rounds, per side."""
    from peftlab.bench import summarize

    runs = [r | {"round": k, "gemm_flops_per_s": g}
            for k, (mine, theirs) in enumerate([(1e12, 2e12), (0.5e12, 1e12), (1e12, 1e12)])
            for r in _runs({("peft", "autocast"): (400, 4.0), ("peftlab", "compile"): (600, 4.0)})
            for g in [mine if r["impl"] == "peftlab" else theirs]]
    (row,) = summarize(runs, {"bf16": 4e12})  # the bench's own ceiling is not used where a run has one
    assert row["peftlab_pct_ceiling"] == pytest.approx(100 * 600 * 1e9 / 1e12)  # median of 60%, 120%, 60%
    assert row["peft_pct_ceiling"] == pytest.approx(100 * 400 * 1e9 / 1e12)  # of 20%, 40%, 40%
    assert row["ceiling_tok_s"] == pytest.approx(1e12 / 1e9)
    (old,) = summarize(_runs({("peft", "autocast"): (400, 4.0), ("peftlab", "compile"): (600, 4.0)}), {"bf16": 4e12})
    assert old["peftlab_pct_ceiling"] == pytest.approx(15)  # runs without their own: the bench's ceiling


def test_no_eligible_setting_is_said_not_hidden():
    from peftlab.bench import summarize

    runs = _runs({("peft", "autocast"): (400, 4.0), ("peftlab", "compile"): (900, 4.5)})
    (row,) = summarize(runs, {"bf16": 1e12})
    assert row["peftlab_mode"] is None and "speed_ratio" not in row and row["any_speed_ratio"] == pytest.approx(900 / 400)
    text = markdown({"setup": {"model": "m", "data": "d", "batch_size": 4, "seq_len": 256, "warmup": 2, "steps": 5},
                     "machine": {"cpu": "cpu"}, "gemm_flops_per_s": {"bf16": 1e12}, "rows": [row]})
    assert "| full | bf16 | no eligible setting | autocast |" in text


def test_bench_cli_errors(cli):
    code, _, err = cli("bench", "--case", "lora-r99")
    assert code == 2 and "unknown bench case 'lora-r99'" in err
    code, _, err = cli("bench", "--dtype", "fp16")
    assert code == 2 and "--dtype must be fp32 or bf16" in err


def test_cost_curves_smoke(text_file, tmp_path):
    """Both sides at each length, gradient checkpointing from the threshold on, a table, a
    figure and the longest length within the memory budget."""
    from peftlab.bench import curves

    result = curves.run_curves(("tiny-llama",), (32, 64), str(text_file), steps=1, warmup=1, checkpoint_from=64,
                               log=lambda *a: None)
    assert [(p["seq_len"], p["impl"], p["grad_checkpoint"]) for p in result["points"]] == [
        (32, "peftlab", False), (32, "peft", False), (64, "peftlab", True), (64, "peft", True)]
    rows = curves.table(result)
    assert [r["seq_len"] for r in rows] == [32, 64] and all(r["peftlab"]["tok_s"] > 0 and r["peft"]["peak_mb"] > 0 for r in rows)
    assert curves.longest_within(rows, "tiny-llama", "peftlab") == 64  # a tiny model fits 8 GB at every length
    curves.write_curves(result, tmp_path / "CURVES.md")
    text = (tmp_path / "CURVES.md").read_text()
    assert "| tiny-llama | 64 |" in text and "![cost curves](CURVES.png)" in text
    assert (tmp_path / "CURVES.png").read_bytes()[:4] == b"\x89PNG"


def test_inference_latency_smoke():
    from peftlab.bench.inference import inference_latency

    got = inference_latency("tiny-llama", 16, repeats=1)
    assert got["precision"] in ("fp32", "bf16") and got["base_ms"] > 0 and got["merged_ms"] > 0 and got["unmerged_ms"] > 0


def test_ceiling_counts_each_product_of_the_model_once():
    """linear_shapes: every decoder product and the output layer, with their uses; the rate is
    flops over the best loop time of each shape (no timing asserted, only that it is one)."""
    import torch
    from conftest import linear_dims

    from peftlab import models
    from peftlab.bench.ceiling import gemm_flops_per_s, linear_shapes

    model = models.load("tiny-llama").model
    shapes = linear_shapes(model)
    head = model.get_output_embeddings().weight
    dims = linear_dims(model) + [(head.shape[1], head.shape[0])]
    assert shapes == {s: dims.count(s) for s in dims}
    assert 0 < gemm_flops_per_s(shapes, 64, torch.float32, repeats=1, min_s=0.001) < float("inf")

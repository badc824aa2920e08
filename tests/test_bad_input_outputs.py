"""Bad input, table-driven: the output policy, the option checks and the error boundary.

Each row: the command, its exit code, the one line it prints, and (checked by the harness)
every input and pre-existing file unchanged by hash, nothing else written."""

import json
import math

import pytest

from bad_input import Case

TRAIN = ["train", "-m", "tiny-llama", "-d", "{text}", "--steps", "2", "--seq-len", "32", "--quiet"]
MERGE = ["merge", "-m", "tiny-llama", "-a", "{lora}"]


def folder_with(*names):
    """setup: a user's folder `keep/` holding files (and folders, names ending in /)."""
    def make(w):
        for n in names:
            p = w / "keep" / n
            if n.endswith("/"):
                p.mkdir(parents=True, exist_ok=True)
                (p / "note.txt").write_text("mine")
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("mine")
    return make


def write(rel, text):
    def make(w):
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_text(text)
    return make


def nan_native(w):
    from safetensors.torch import load_file, save_file

    f = w / "native" / "adapter.safetensors"
    t = load_file(str(f))
    k = sorted(t)[0]
    t[k][0, 0] = math.nan
    save_file(t, str(f), metadata={"format": "pt"})


def nan_model(w):
    from safetensors.torch import load_file, save_file

    f = w / "model" / "model.safetensors"
    t = load_file(str(f))
    k = next(k for k in sorted(t) if k.endswith("q_proj.weight"))
    t[k][0, 0] = math.nan
    save_file(t, str(f), metadata={"format": "pt"})


def truncate_metrics(w):
    f = w / "run" / "metrics.jsonl"
    f.write_bytes(f.read_bytes()[:-25])


def nul_metrics(w):
    f = w / "run" / "metrics.jsonl"
    f.write_bytes(f.read_bytes() + b"\0" * 4000 + b"\n")


def results_without_strategies(w):
    (w / "cmp" / "results.json").write_text(json.dumps({"model": "tiny-llama", "data": "x"}))


def unfinished_run(w):
    import shutil

    shutil.copytree(w / "run", w / "half")
    run = json.loads((w / "half" / "run.json").read_text())
    run.pop("result")
    (w / "half" / "run.json").write_text(json.dumps(run))


def peft_config(**fields):
    """setup: change fields of the LoRA's adapter_config.json (json writes NaN as NaN)."""
    def make(w):
        f = w / "lora" / "adapter_config.json"
        config = json.loads(f.read_text())
        f.write_text(json.dumps(config | fields))
    return make


def lora_of_seed_1(w):
    from peftlab import load_model, prepare
    from peftlab.artifacts import save

    m = load_model("tiny-llama", seed=1)
    save(m.model, prepare(m.model, "lora:r=4"), w / "lora1", base_model="tiny-llama")


def no_fingerprint(w):
    f = w / "native" / "peftlab_config.json"
    config = json.loads(f.read_text())
    config.pop("fingerprint")
    f.write_text(json.dumps(config))


CASES = [
    # --- the output policy: never into or over an input, never over a user's files without --overwrite
    Case("merge-out-is-the-adapter", MERGE + ["-o", "{lora}"], 2, r"--out .*lora is the input .*lora"),
    Case("merge-out-holds-the-adapter", ["merge", "-m", "tiny-llama", "-a", "{run}/adapter", "-o", "{run}"], 2,
         r"--out .*run holds an input of this command: .*adapter"),
    Case("merge-out-is-the-base-model", ["merge", "-m", "{model}", "-a", "{lora}", "-o", "{model}"], 2,
         r"is the input .*model"),
    Case("merge-out-inside-the-base-model", ["merge", "-m", "{model}", "-a", "{lora}", "-o", "{model}/merged"], 2,
         r"is inside the input .*model"),
    Case("merge-out-overwrite-still-not-an-input", MERGE + ["-o", "{lora}", "--overwrite"], 2, r"is the input"),
    Case("merge-out-dot", MERGE + ["-o", "."], 2, r"current folder"),
    Case("merge-out-dotdot", MERGE + ["-o", ".."], 2, r"current folder"),
    Case("merge-out-existing-folder", MERGE + ["-o", "{tmp}/keep"], 2, r"--out .*keep already exists; add --overwrite",
         setup=folder_with("a.txt")),
    Case("merge-out-existing-file", MERGE + ["-o", "{text}"], 2, r"is a file; give a folder"),
    Case("merge-out-under-a-file", MERGE + ["-o", "{text}/merged"], 2, r"text.txt is a file, not a folder"),
    Case("merge-out-proc", MERGE + ["-o", "/proc/peftlab-merged"], 2, r"cannot write in /proc"),
    Case("merge-overwrite-replaces", MERGE + ["-o", "{tmp}/keep", "--overwrite"], 0, None,
         setup=folder_with("a.txt"), writes=("keep",)),
    Case("merge-empty-folder-is-fine", MERGE + ["-o", "{tmp}/empty"], 0, None,
         setup=lambda w: (w / "empty").mkdir(), writes=("empty",)),
    Case("train-onto-finished-run", TRAIN + ["-o", "{run}"], 2, r"already exists \(a finished run, its adapter is"),
    Case("train-overwrite-that-fails-keeps-the-old-run", TRAIN + ["-o", "{run}", "--overwrite", "-s", "lora:r=4,alpha=1e30"],
         2, r"step 1: the (loss|gradient norm) is (nan|inf)"),
    Case("train-onto-user-folder", TRAIN + ["-o", "{tmp}/keep"], 2, r"keep already exists; add --overwrite",
         setup=folder_with("checkpoints/", "adapter/", "notes.md")),
    Case("train-out-is-the-data", TRAIN + ["-o", "{text}"], 2, r"is the input .*text.txt"),
    Case("train-out-holds-the-data", ["train", "-m", "tiny-llama", "-d", "{tmp}/d/text.txt", "--steps", "1",
                                      "--seq-len", "32", "--quiet", "-o", "{tmp}/d", "--overwrite"], 2,
         r"holds an input of this command", setup=write("d/text.txt", "Call me Ishmael. " * 200)),
    Case("train-out-is-the-model", ["train", "-m", "{model}", "-d", "{text}", "-o", "{model}", "--overwrite", "--quiet"],
         2, r"is the input .*model"),
    Case("train-out-under-the-data-file", TRAIN + ["-o", "{text}/out"], 2, r"is inside the input .*text.txt"),
    Case("train-out-under-a-file", TRAIN + ["-o", "{tmp}/chat.jsonl/out"], 2, r"chat.jsonl is a file, not a folder"),
    Case("train-out-proc", TRAIN + ["-o", "/proc/peftlab-run"], 2, r"cannot write in /proc"),
    Case("train-resume-finished", TRAIN + ["-o", "{run}", "--resume"], 0, None),
    Case("compare-onto-train-run", ["compare", "-m", "tiny-llama", "-d", "{text}", "-s", "full", "-o", "{run}",
                                    "--steps", "1", "--quiet"], 2, r"already exists \(not a comparison of this model and data\)"),
    Case("compare-out-is-a-file", ["compare", "-m", "tiny-llama", "-d", "{text}", "-s", "full", "-o", "{text}",
                                   "--steps", "1", "--quiet"], 2, r"is the input"),
    Case("report-out-inside-its-run", ["report", "{run}", "-o", "{run}/run.json"], 2, r"is inside the input .*run"),
    Case("report-out-is-its-run", ["report", "{run}", "-o", "{run}"], 2, r"is the input"),
    Case("report-out-existing-file", ["report", "{run}", "-o", "{text}"], 2, r"already exists; add --overwrite"),
    Case("report-truncated-metrics", ["report", "{run}", "-o", "{tmp}/r.html"], 2, r"metrics.jsonl is damaged at line",
         setup=truncate_metrics),
    Case("report-nul-bytes-in-metrics", ["report", "{run}", "-o", "{tmp}/r.html"], 2, r"damaged at line",
         setup=nul_metrics),
    Case("report-results-without-strategies", ["report", "{cmp}", "-o", "{tmp}/r.html"], 2,
         r"results.json lacks 'strategies'", setup=results_without_strategies),
    Case("report-unfinished-run", ["report", "{tmp}/half", "-o", "{tmp}/r.html"], 2, r"unfinished train run",
         setup=unfinished_run),
    Case("report-not-a-run", ["report", "{lora}", "-o", "{tmp}/r.html"], 2, r"neither a comparison"),
    Case("export-out-inside-the-adapter", ["export", "-m", "tiny-llama", "-a", "{lora}", "-o",
                                           "{lora}/adapter_model.safetensors"], 2, r"is inside the input"),
    Case("export-out-is-the-gguf", ["export", "-m", "{tmp}/tiny.gguf", "-o", "{tmp}/tiny.gguf"], 2, r"is the input",
         setup=write("tiny.gguf", "GGUF")),
    Case("export-out-existing", ["export", "-m", "tiny-llama", "-o", "{text}"], 2, r"already exists; add --overwrite"),
    Case("export-out-is-a-folder", ["export", "-m", "tiny-llama", "-o", "{lora}"], 2, r"is a folder; give the file"),
    Case("bench-out-json", ["bench", "-m", "tiny-llama", "-d", "{text}", "-o", "{tmp}/R.json"], 2,
         r"give the Markdown file to write"),
    Case("bench-out-existing", ["bench", "-m", "tiny-llama", "-d", "{text}", "-o", "{tmp}/RESULTS.md"], 2,
         r"RESULTS.md already exists", setup=write("RESULTS.md", "old")),
    Case("compare-other-settings-onto-a-comparison", ["compare", "-m", "tiny-llama", "-d", "text.txt", "-s", "full",
                                                      "--steps", "3", "--seq-len", "32", "-o", "cmp", "--quiet",
                                                      "--forget", "none", "--samples", "1", "--gen-tokens", "4"], 2,
         r"already holds strategy 'full' run with other settings; add --overwrite"),
    Case("compare-other-data-onto-a-comparison", ["compare", "-m", "tiny-llama", "-d", "{chat}", "-s", "full",
                                                  "--steps", "2", "--seq-len", "32", "-o", "cmp", "--quiet"], 2,
         r"already exists \(not a comparison of this model and data\)"),
    Case("compare-onto-empty-strategies-folder", ["compare", "-m", "tiny-llama", "-d", "{text}", "-s", "full", "-o",
                                                  "{tmp}/c", "--quiet"], 2, r"c already exists", setup=lambda w: (
                                                      (w / "c" / "strategies").mkdir(parents=True),
                                                      (w / "c" / "summary.md").write_text("mine"))),
    Case("compare-out-inside-the-model", ["compare", "-m", "{model}", "-d", "{text}", "-s", "full", "-o", "{model}/c",
                                          "--quiet"], 2, r"is inside the input"),
    Case("report-out-inside-a-comparison", ["report", "{cmp}", "-o", "{cmp}/report.html", "--overwrite"], 2,
         r"is inside the input"),
    Case("generate-past-gpt2-positions", ["generate", "-m", "tiny-gpt2", "-p", "Hi", "--max-new-tokens", "100000"], 2,
         r"and --max-new-tokens 100000 are more than tiny-gpt2's 512 positions; use --max-new-tokens 510 or less"),
    Case("generate-prompt-past-positions", ["generate", "-m", "tiny-gpt2", "-p", "x" * 600], 2,
         r"the prompt is 600 tokens, and tiny-gpt2 takes 512 positions"),
    # --- adapters: their base, their numbers, their patterns
    Case("generate-peft-target-modules-backtracks", ["generate", "-m", "tiny-llama", "-p", "Hi", "-a", "{lora}"], 2,
         r"adapter_config.json: bad target_modules .*exponential time", setup=peft_config(target_modules="(.|.)*zzz")),
    Case("merge-peft-alpha-pattern-nan", MERGE + ["-o", "{tmp}/m"], 2, r"alpha_pattern.q_proj is nan, not a finite number",
         setup=peft_config(alpha_pattern={"q_proj": math.nan})),
    Case("merge-peft-target-modules-5", MERGE + ["-o", "{tmp}/m"], 2, r"target_modules is 5; it should be",
         setup=peft_config(target_modules=5)),
    Case("merge-lora-of-another-seed", ["merge", "-m", "tiny-llama", "-a", "{tmp}/lora1", "-o", "{tmp}/m"], 2,
         r"differs from the base this adapter was trained on \(--force-base", setup=lora_of_seed_1),
    Case("merge-lora-of-another-seed-forced", ["merge", "-m", "tiny-llama", "-a", "{tmp}/lora1", "-o", "{tmp}/m",
                                               "--force-base"], 0, r"^peftlab: warning: .*loading it anyway \(--force-base\)$", setup=lora_of_seed_1, writes=("m",)),
    Case("merge-gemma3-lora-into-llama", ["merge", "-m", "tiny-gemma3", "-a", "{lora}", "-o", "{tmp}/m"], 2,
         r"lora: .*(differs from|has no tensor|made for another)"),
    Case("merge-native-without-fingerprint", ["merge", "-m", "tiny-llama", "-a", "{native}", "-o", "{tmp}/m"], 0,
         r"^peftlab: warning: .*native: the adapter records no fingerprint of its base model, so the base could not be "
         r"checked$", setup=no_fingerprint, writes=("m",)),
    # --- options
    Case("seed-2-to-the-64", TRAIN + ["-o", "{tmp}/o", "--seed", str(2**64)], 2, r"--seed must be between 0 and"),
    Case("seed-negative", TRAIN + ["-o", "{tmp}/o", "--seed", "-1"], 2, r"--seed must be between 0 and"),
    Case("lr-nan", TRAIN + ["-o", "{tmp}/o", "--lr", "nan"], 2, r"--lr must be a positive number"),
    Case("steps-zero", TRAIN + ["-o", "{tmp}/o", "--steps", "0"], 2, r"--steps must be a positive"),
    Case("batch-size-huge", TRAIN + ["-o", "{tmp}/o", "--batch-size", "1000000"], 2,
         r"--batch-size 1000000 is more than the \d+ training blocks"),
    Case("steps-not-a-number", TRAIN + ["-o", "{tmp}/o", "--steps", "many"], 2, r"Invalid value for .--steps."),
    Case("unknown-option", TRAIN + ["-o", "{tmp}/o", "--stepz", "3"], 2, r"No such option|no such option"),
    Case("generate-empty-prompt", ["generate", "-m", "tiny-llama", "-p", ""], 2, r"--prompt is empty"),
    Case("generate-no-adapter-folder", ["generate", "-m", "tiny-llama", "-p", "Hi", "-a", "{tmp}/nope"], 2,
         r"adapter folder not found"),
    Case("merge-adapter-is-a-text-file", ["merge", "-m", "tiny-llama", "-a", "{text}", "-o", "{tmp}/m"], 2,
         r"not an adapter folder|adapter folder not found"),
    Case("config-not-toml", TRAIN + ["-o", "{tmp}/o", "--config", "{tmp}/run.toml"], 2, r"is not valid TOML",
         setup=write("run.toml", "steps = = 3")),
    Case("config-unknown-key", TRAIN + ["-o", "{tmp}/o", "--config", "{tmp}/run.toml"], 2, r"'stepz' is not an option",
         setup=write("run.toml", "stepz = 3")),
    Case("export-format-onnx", ["export", "-m", "tiny-llama", "-o", "{tmp}/m.onnx", "--format", "onnx"], 2,
         r"--format must be gguf"),
    Case("export-lora-only-without-adapter", ["export", "-m", "tiny-llama", "-o", "{tmp}/m.gguf", "--lora-only"], 2,
         r"--lora-only needs --adapter"),
    Case("unknown-model", ["params", "-m", "{tmp}/no-such-model", "-s", "full"], 2, r"unknown model"),
    # --- nothing non-finite is run or written
    Case("merge-nan-native-adapter", ["merge", "-m", "tiny-llama", "-a", "{native}", "-o", "{tmp}/m"], 2,
         r"NaN", setup=nan_native),
    Case("generate-nan-native-adapter", ["generate", "-m", "tiny-llama", "-p", "Hi", "-a", "{native}"], 2, r"NaN",
         setup=nan_native),
    Case("train-nan-base-model", ["train", "-m", "{model}", "-d", "{text}", "--steps", "2", "--seq-len", "32",
                                  "-o", "{tmp}/o", "--skip-nonfinite", "--quiet"], 2, r"holds NaN or Inf",
         setup=nan_model),
    Case("export-nan-base-model", ["export", "-m", "{model}", "-o", "{tmp}/m.gguf"], 2, r"holds NaN or Inf",
         setup=nan_model),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, bad_case):
    bad_case(case)

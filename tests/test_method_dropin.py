"""The next method is one file: a method file dropped into the methods package, with nothing
else edited, is parsed, trained, covered by the shared checks, and saved and loaded in peft's
format (peft itself loads it with equal logits). The file is HRA (tests/helpers/dropin_hra.py),
a peft type peftlab does not ship."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent
ROOT = TESTS.parent

PLUGIN = """
import peftlab.methods as methods
from peftlab.methods.registry import discover

methods.__path__.append({pkg!r})  # the package now has one more file, as if it were shipped
discover()
"""

SCRIPT = """
import json, sys
from pathlib import Path
import torch
import dropin_plugin  # noqa: F401
from peft import PeftModel
from peftlab import TrainConfig, load_blocks, load_model, prepare, train
from peftlab.artifacts import kind, load, save
from peftlab.artifacts.hf import known
from peftlab.methods import parse_strategy
from peftlab.errors import UserError

out, text = Path(sys.argv[1]), sys.argv[2]
loaded = load_model("tiny-llama")
prepared = prepare(loaded.model, "hra:r=4")
records = train(loaded.model, load_blocks(loaded, text, 32), prepared, TrainConfig(steps=3, lr=1e-2, batch_size=2), show=False)
ids = torch.tensor([loaded.encode("Call me Ishmael. Some years ago")])
want = loaded.model(input_ids=ids).logits
folder = save(loaded.model, prepared, out / "adapter", base_model="tiny-llama")
config = json.loads((folder / "adapter_config.json").read_text())
theirs = PeftModel.from_pretrained(load_model("tiny-llama").model, str(folder))
fresh = load_model("tiny-llama")
load(fresh.model, folder)
refusals = []
for bad in ("hra:r=3", "hra:rank=4"):
    try:
        prepare(load_model("tiny-llama").model, bad)
    except UserError as e:
        refusals.append(str(e))
print(json.dumps({
    "kind": kind(folder), "peft_type": config["peft_type"], "unknown_keys": sorted(set(config) - known()),
    "peft_gap": (theirs(input_ids=ids).logits - want).abs().max().item(),
    "ours_gap": (fresh.model(input_ids=ids).logits - want).abs().max().item(),
    "loss_fell": records[-1]["eval_loss"] < records[0]["eval_loss"], "refusals": refusals,
    "parsed": str(parse_strategy("hra:r=6,targets=q_proj")[0]),
}))
"""


def _dropped(tmp_path) -> dict:
    pkg = tmp_path / "more_methods"
    pkg.mkdir()
    shutil.copy(TESTS / "helpers" / "dropin_hra.py", pkg / "hra.py")
    (tmp_path / "dropin_plugin.py").write_text(PLUGIN.format(pkg=str(pkg)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(TESTS), os.environ.get("PYTHONPATH", "")]))


def test_shared_checks_cover_a_dropped_in_method(tmp_path):
    env = _dropped(tmp_path)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "dropin_plugin", "-p", "no:cacheprovider", "-rs",
                          str(TESTS / "test_methods_common.py"), "-k", "hra"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    # four shared checks on three architectures; GPT-2 skipped with the reason the file gives
    assert "12 passed, 4 skipped" in run.stdout, run.stdout[-2000:]
    assert "hra: GPT-2's Conv1D layers are not nn.Linear" in run.stdout


def test_a_dropped_in_method_trains_and_saves_in_peft_format(tmp_path, text_file):
    env = _dropped(tmp_path)
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run"), str(text_file)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["kind"] == "peft" and found["peft_type"] == "HRA"
    assert found["unknown_keys"] == []  # its codec's fields join the known keys
    assert found["peft_gap"] < 1e-5 and found["ours_gap"] < 1e-5
    assert found["loss_fell"]
    assert found["refusals"][0] == "hra: r=3 must be even (pairs of equal reflections start at the identity)"
    assert found["refusals"][1].startswith("hra: unknown key 'rank'")  # the parser knows its options
    assert "valid keys: r, targets, target_regex, layers, name, seed" in found["refusals"][1]
    assert found["parsed"].startswith("hra:")

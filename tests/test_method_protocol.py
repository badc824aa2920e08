"""The method file is the unit: the rest of peftlab works through the protocol and never
imports a method file; a new method is discovered without being listed anywhere."""

import ast
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab import load_model, prepare

SRC = Path(peftlab.__file__).parent
METHODS = SRC / "methods"


def method_files() -> set:
    """Modules of the methods package that register a method (the rest is infrastructure)."""
    return {p.stem for p in METHODS.glob("*.py") if "@register(" in p.read_text()}


def imported_methods(path: Path) -> set:
    """Names of peftlab.methods submodules that `path` imports (absolute or relative)."""
    rel = path.relative_to(SRC).with_suffix("")
    package = ["peftlab", *rel.parts[:-1]]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module + "." + a.name for a in node.names] + [module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["peftlab", "methods"] and len(parts) > 2:
                found.add(parts[2])
    return found


GENERIC = [*sorted((SRC / "artifacts").glob("*.py")), SRC / "merge.py", SRC / "adapters.py",
           *sorted((SRC / "workbench").glob("*.py"))]


def test_the_finder_sees_method_files_and_imports():
    assert {"lora", "prefix", "adapter"} <= method_files()
    assert "protocol" not in method_files() and "registry" not in method_files()
    assert "lora" in imported_methods(METHODS / "qlora.py")  # a relative import is seen


@pytest.mark.parametrize("path", GENERIC, ids=lambda p: str(p.relative_to(SRC)))
def test_generic_code_imports_no_method_file(path):
    named = imported_methods(path) & method_files()
    assert not named, f"{path.relative_to(SRC)} imports method file(s) {sorted(named)}; go through methods/protocol.py"


def test_a_new_method_file_is_discovered(tmp_path, monkeypatch):
    """Dropping one file into the package registers the method: nothing else lists it."""
    import importlib
    import sys

    from peftlab.methods import registry

    pkg = tmp_path / "extra"
    (pkg / "methods").mkdir(parents=True)
    (pkg / "methods" / "scale_out.py").write_text(
        "import torch\nimport torch.nn as nn\n"
        "from peftlab.methods.attach import attach\nfrom peftlab.methods.protocol import Added\n"
        "from peftlab.methods.registry import register\nfrom peftlab.methods.targets import pick_targets\n"
        "class Scale(Added):\n    slot = 'scale_out'\n"
        "    def __init__(self, m):\n        super().__init__()\n        self.g = nn.Parameter(torch.zeros(m))\n"
        "    def forward(self, x, out, layer):\n        return out * (1 + self.g)\n"
        "@register('scale-out')\ndef scale_out(model):\n    '''Scale q outputs.'''\n"
        "    for path, layer in pick_targets(model, ('q_proj',)).items():\n"
        "        attach(layer, 'default', Scale(layer.out_features))\n")
    monkeypatch.setattr(peftlab.methods, "__path__", [*peftlab.methods.__path__, str(pkg / "methods")])
    try:
        found = registry.discover()
        assert "scale-out" in found
        model = load_model("tiny-llama").model
        prepare(model, "scale-out")
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 64
    finally:
        registry.REGISTRY.pop("scale-out", None)
        sys.modules.pop("peftlab.methods.scale_out", None)
        importlib.invalidate_caches()


def test_adapters_switch_any_added_module():
    """disabled() gives base outputs for every kind of added module at once (slots are derived)."""
    from peftlab import adapters

    loaded = load_model("tiny-llama")
    ids = torch.tensor([loaded.encode("Call me Ishmael.")])
    base = loaded.model(input_ids=ids).logits
    prepare(loaded.model, "lora:r=2/adapter:r=4/prompt:tokens=2")
    for p in loaded.model.parameters():
        if p.requires_grad:
            p.data.add_(0.1)
    assert not torch.allclose(loaded.model(input_ids=ids).logits[:, -base.shape[1]:], base, atol=1e-3)
    with adapters.disabled(loaded.model):
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, base, atol=1e-6, rtol=0)


def test_the_loss_runs_the_head_when_an_added_module_there_has_no_weight():
    """loss.py multiplies by the head's weight without calling the head; an added module on the
    head that gives no `head_weight` makes it run the layer, so the module still counts."""
    import torch.nn as nn

    from peftlab.loss import causal_lm_loss
    from peftlab.methods.attach import attach
    from peftlab.methods.protocol import Added

    class Temperature(Added):
        slot = "temperature"

        def __init__(self):
            super().__init__()
            self.t = nn.Parameter(torch.tensor(0.5))

        def forward(self, x, out, layer):
            return out * self.t

    loaded = load_model("tiny-llama")
    attach(loaded.model.get_output_embeddings(), "default", Temperature())
    ids = torch.tensor([loaded.encode("Call me Ishmael. Some years ago")])
    ours = causal_lm_loss(loaded.model, ids, ids)
    theirs = loaded.model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    ours.backward()
    assert loaded.model.lm_head.temperature["default"].t.grad is not None


def test_codec_fields_cover_every_key_of_peft_config_classes():
    """hf's known keys come from the codecs: each declares its peft config class's keys, so a
    folder peft wrote reads without an "unknown key" warning. Checked against peft itself."""
    import dataclasses

    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from peftlab.artifacts.hf import BASE_FIELDS
    from peftlab.methods import REGISTRY

    assert {f.name for f in dataclasses.fields(peft.PeftConfig)} <= BASE_FIELDS
    for method in REGISTRY.values():
        codec = method.peft
        if codec is None or codec.peft_type is None or codec.read is None:
            continue
        keys = {f.name for f in dataclasses.fields(PEFT_TYPE_TO_CONFIG_MAPPING[codec.peft_type])} - BASE_FIELDS
        assert keys <= codec.fields, (method.name, sorted(keys - codec.fields))


def test_the_training_seam_runs_each_hook_where_it_says(text_file, tmp_path):
    """A Training of no particular method: after_backward sees the step's gradients before the
    update, after_step sees the updated weights with the gradients still there, its loss term
    reaches the gradients and the record, its learning-rate multiplier reaches the optimizer,
    and its state goes into every checkpoint and comes back on resume."""
    import torch

    from peftlab import TrainConfig, load_blocks, load_model, prepare, train
    from peftlab.methods import Training

    class Probe(Training):
        def __init__(self):
            self.seen, self.count = [], torch.zeros(())

        def start(self, model, steps):
            self.steps = steps

        def lr_scales(self, model):
            return {n: 0.0 for n, p in model.named_parameters() if p.requires_grad and n.endswith(".B")}

        def loss(self, model):
            return 1e-3 * sum(p.square().sum() for n, p in model.named_parameters() if n.endswith(".A"))

        def after_backward(self, model, step):
            a = next(p for n, p in model.named_parameters() if n.endswith(".A"))
            self.before = a.detach().clone()
            self.seen.append(("backward", step, a.grad is not None))

        def after_step(self, model, step):
            a = next(p for n, p in model.named_parameters() if n.endswith(".A"))
            self.seen.append(("step", step, a.grad is not None and not torch.equal(a, self.before)))
            self.count += 1

        def state(self):
            return {"seen": len(self.seen)}, {"count": self.count}

        def restore(self, state, tensors):
            self.restored = (state["seen"], float(tensors["count"]))

    loaded = load_model("tiny-llama", seed=0)
    prepared = prepare(loaded.model, "lora:r=2")
    probe = Probe()
    prepared.training.append(probe)
    b_before = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if n.endswith(".B")}
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=32, lr=1e-2, warmup=0, eval_every=-1, checkpoint_every=2)
    records = train(loaded.model, load_blocks(loaded, str(text_file), 32), prepared, cfg, out=tmp_path / "run", show=False)
    assert probe.steps == 3
    assert probe.seen == [("backward", 1, True), ("step", 1, True), ("backward", 2, True), ("step", 2, True),
                          ("backward", 3, True), ("step", 3, True)]
    assert all(r["method_loss"] > 0 for r in records)
    assert all(torch.equal(p, b_before[n]) for n, p in loaded.model.named_parameters() if n.endswith(".B"))  # ×0
    again = load_model("tiny-llama", seed=0)
    prepared = prepare(again.model, "lora:r=2")
    probe2 = Probe()
    prepared.training.append(probe2)
    train(again.model, load_blocks(again, str(text_file), 32), prepared, cfg, out=tmp_path / "run", show=False, resume=True)
    assert probe2.restored == (4, 2.0)  # from the step-2 checkpoint: four hook calls, two updates
    assert probe2.seen == [("backward", 3, True), ("step", 3, True)]  # then only what was left

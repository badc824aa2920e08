"""Every adapter knows its base, and nothing non-finite is loaded.

The base fingerprint is taken when a strategy is first applied (before training), rides in
both formats (peft's: the tensors file's metadata; peftlab's: its config), and is checked on
load: another base is one error (or with force_base one warning); an adapter with no
fingerprint loads with one warning. NaN / Inf in tensors or configs and wrongly typed config
fields are one error naming the file.
"""

import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import perturb, sample_ids
from peftlab import load_model, prepare
from peftlab.artifacts import load, save
from peftlab.errors import UserError
from peftlab.fingerprint import ATTR, difference

FORCE = r"\(--force-base loads it anyway\)$"


def trained(spec, tmp_path, arch="tiny-llama", seed=0, folder="adapter"):
    m = load_model(arch, seed=seed)
    prepared = prepare(m.model, spec, m.tokenizer)
    perturb(m.model)
    return m, save(m.model, prepared, tmp_path / folder, base_model=arch)


def warnings_in(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("peftlab: warning:")]


def metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def rewrite(path, change, keep_metadata=True) -> None:
    """Rewrite a safetensors file with `change(tensors)` applied."""
    meta = metadata(path) if keep_metadata else None
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


def edit_config(path, change) -> None:
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))  # Python's json writes NaN / Infinity as such


# ---- the fingerprint itself --------------------------------------------------------------

def test_fingerprint_is_taken_once_before_training_and_leaves_added_modules_out():
    m = load_model("tiny-llama")
    base = {n for n, _ in m.model.named_parameters()}
    prepare(m.model, "freeze:train=mlp")
    first = dict(m.model.__dict__[ATTR])
    assert set(first) == base  # the trained mlp tensors too
    perturb(m.model)  # "training" the mlp
    prepare(m.model, "lora:r=4,name=second")  # a second strategy on the same model: not taken again
    assert m.model.__dict__[ATTR] == first
    assert not any("lora" in n for n in first)
    assert difference(m.model, {n: [shape, s] for n, (shape, s, _) in first.items()}) is None


def test_full_adapter_fingerprints_the_original_values(tmp_path):
    m, folder = trained("full", tmp_path)
    cfg = json.loads((folder / "peftlab_config.json").read_text())
    base = load_model("tiny-llama").model
    assert set(cfg["fingerprint"]) == {n for n, _ in base.named_parameters()}
    fresh = load_model("tiny-llama")
    assert difference(fresh.model, cfg["fingerprint"]) is None  # the original values, not the trained ones
    ids = sample_ids(m)
    load(fresh.model, folder)
    torch.testing.assert_close(fresh.model(input_ids=ids).logits, m.model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_peft_format_carries_the_fingerprint_and_peft_still_loads_it(tmp_path):
    from peft import PeftModel

    m, folder = trained("lora:r=4", tmp_path)
    saved = json.loads(metadata(folder / "adapter_model.safetensors")["peftlab_base_fingerprint"])
    assert set(saved) == {n for n, _ in load_model("tiny-llama").model.named_parameters()}
    ids = sample_ids(m)
    want = m.model(input_ids=ids).logits
    ours = load_model("tiny-llama")
    load(ours.model, folder)
    theirs = PeftModel.from_pretrained(load_model("tiny-llama").model, str(folder))
    torch.testing.assert_close(ours.model(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs(input_ids=ids).logits, want, atol=1e-5, rtol=0)


def test_a_bf16_base_matches_its_fp32_self(tmp_path, capsys):
    _, lora_dir = trained("lora:r=4", tmp_path)
    _, native_dir = trained("full", tmp_path, folder="native")
    for folder in (lora_dir, native_dir):
        load(load_model("tiny-llama").model.to(torch.bfloat16), folder)
    assert warnings_in(capsys.readouterr().err) == []


def test_stacking_on_a_loaded_freeze_adapter_still_checks_against_the_original_base(tmp_path, capsys):
    _, native_dir = trained("freeze:train=mlp", tmp_path, folder="native")
    _, lora_dir = trained("lora:r=4", tmp_path, folder="lora")
    m = load_model("tiny-llama")
    load(m.model, native_dir)  # overwrites the mlp weights
    load(m.model, lora_dir, name="second")
    assert warnings_in(capsys.readouterr().err) == []


# ---- another base: refused --------------------------------------------------------------

def test_lora_from_another_seed_is_refused(tmp_path):
    _, folder = trained("lora:r=4", tmp_path, seed=1)
    with pytest.raises(UserError, match=rf"^{re.escape(str(folder))}: base tensor model.embed_tokens.weight differs from the base "
                                        rf"this adapter was trained on {FORCE}"):
        load(load_model("tiny-llama").model, folder)


def test_lora_from_another_architecture_is_one_clean_error(tmp_path):
    _, folder = trained("lora:r=4", tmp_path, arch="tiny-gemma3")
    with pytest.raises(UserError, match=rf"^{re.escape(str(folder))}: .*{FORCE}"):
        load(load_model("tiny-llama").model, folder)


def test_native_full_adapter_from_another_seed_is_refused(tmp_path):
    _, folder = trained("full", tmp_path)
    with pytest.raises(UserError, match=rf"^{re.escape(str(folder))}: base tensor model.embed_tokens.weight differs .*{FORCE}"):
        load(load_model("tiny-llama", seed=1).model, folder)


def test_a_changed_shape_is_named(tmp_path):
    _, folder = trained("freeze:train=mlp", tmp_path)
    edit_config(folder / "peftlab_config.json", lambda c: c["fingerprint"]["model.norm.weight"].__setitem__(0, [65]))
    with pytest.raises(UserError, match=rf"base tensor model.norm.weight has shape \(64,\), the adapter expects \(65,\) {FORCE}"):
        load(load_model("tiny-llama").model, folder)


@pytest.mark.parametrize("spec", ["lora:r=4", "full"])
def test_force_base_loads_another_base_with_one_warning(spec, tmp_path, capsys):
    theirs, folder = trained(spec, tmp_path, seed=1)
    m = load_model("tiny-llama")
    load(m.model, folder, force_base=True)
    lines = warnings_in(capsys.readouterr().err)
    assert lines == [f"peftlab: warning: {folder}: base tensor model.embed_tokens.weight differs from the base this "
                     "adapter was trained on; loading it anyway (--force-base)"]
    trained_params = {n: p for n, p in theirs.model.named_parameters() if p.requires_grad}
    mine = dict(m.model.named_parameters())
    assert trained_params and all(torch.equal(mine[n], p) for n, p in trained_params.items())


@pytest.mark.parametrize("spec", ["lora:r=4", "freeze:train=mlp"])
def test_a_refused_load_leaves_the_model_as_it_was(spec, tmp_path, capsys):
    _, folder = trained(spec, tmp_path, seed=1)
    m = load_model("tiny-llama")
    before = {n: p.clone() for n, p in m.model.state_dict().items()}
    with pytest.raises(UserError, match=FORCE):
        load(m.model, folder)
    after = m.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[n], t) for n, t in before.items())
    load(m.model, folder, force_base=True)  # the same model, the same name: nothing was left behind
    assert len(warnings_in(capsys.readouterr().err)) == 1


# ---- no fingerprint: one warning, loads -------------------------------------------------

NO_FINGERPRINT = "the adapter records no fingerprint of its base model, so the base could not be checked"


def test_native_adapter_without_fingerprint_warns_once_and_loads(tmp_path, capsys):
    m, folder = trained("freeze:train=mlp", tmp_path)
    edit_config(folder / "peftlab_config.json", lambda c: c.pop("fingerprint"))
    fresh = load_model("tiny-llama")
    load(fresh.model, folder)
    assert warnings_in(capsys.readouterr().err) == [f"peftlab: warning: {folder}: {NO_FINGERPRINT}"]
    ids = sample_ids(m)
    torch.testing.assert_close(fresh.model(input_ids=ids).logits, m.model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_peft_adapter_without_fingerprint_warns_once_and_loads(tmp_path, capsys):
    m, folder = trained("lora:r=4", tmp_path)
    rewrite(folder / "adapter_model.safetensors", lambda t: None, keep_metadata=False)
    load(load_model("tiny-llama").model, folder)
    assert warnings_in(capsys.readouterr().err) == [f"peftlab: warning: {folder}: {NO_FINGERPRINT}"]


def test_adapter_written_by_peft_warns_once_and_loads(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(load_model("tiny-llama").model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(theirs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    m = load_model("tiny-llama")
    ids = sample_ids(m)
    load(m.model, tmp_path / "peft")
    assert warnings_in(capsys.readouterr().err) == [f"peftlab: warning: {tmp_path / 'peft'}: {NO_FINGERPRINT}"]
    torch.testing.assert_close(m.model(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_a_malformed_fingerprint_is_one_error(tmp_path):
    _, folder = trained("lora:r=4", tmp_path)
    f = folder / "adapter_model.safetensors"
    tensors, meta = load_file(str(f)), metadata(f)
    save_file(tensors, str(f), metadata=meta | {"peftlab_base_fingerprint": "{oops"})
    with pytest.raises(UserError, match="peftlab_base_fingerprint is not valid JSON"):
        load(load_model("tiny-llama").model, folder)
    save_file(tensors, str(f), metadata=meta | {"peftlab_base_fingerprint": '{"model.norm.weight": 5}'})
    with pytest.raises(UserError, match=r"fingerprint's entry for model.norm.weight should be \[shape, checksum\]"):
        load(load_model("tiny-llama").model, folder)


# ---- nothing non-finite loads -----------------------------------------------------------

@pytest.mark.parametrize("spec", ["lora:r=4", "freeze:train=mlp", "full"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_tensors_are_refused(spec, bad, tmp_path):
    _, folder = trained(spec, tmp_path)
    f = next(folder.glob("*.safetensors"))
    victim = sorted(load_file(str(f)))[-1]

    def spoil(tensors):
        tensors[victim].view(-1)[3] = bad

    rewrite(f, spoil)
    with pytest.raises(UserError, match=rf"^{re.escape(str(f))}: tensor {victim} holds NaN or Inf; refusing to load a broken adapter$"):
        load(load_model("tiny-llama").model, folder)


@pytest.mark.parametrize("key, value, says", [
    ("alpha_pattern", {"q_proj": math.nan}, "alpha_pattern.q_proj is nan"),
    ("lora_alpha", math.inf, "lora_alpha is inf"),
    ("lora_dropout", -math.inf, "lora_dropout is -inf"),
    ("rank_pattern", {"q_proj": math.nan}, "rank_pattern.q_proj is nan"),
])
def test_non_finite_numbers_in_peft_config_are_refused(key, value, says, tmp_path):
    _, folder = trained("lora:r=4", tmp_path)
    edit_config(folder / "adapter_config.json", lambda c: c.__setitem__(key, value))
    with pytest.raises(UserError, match=rf"^{re.escape(str(folder / 'adapter_config.json'))}: {says}, not a finite number"):
        load(load_model("tiny-llama").model, folder)


def test_non_finite_numbers_in_peftlab_config_are_refused(tmp_path):
    _, folder = trained("freeze:train=mlp", tmp_path)
    cfg = folder / "peftlab_config.json"
    edit_config(cfg, lambda c: c["fingerprint"]["model.norm.weight"].__setitem__(1, math.nan))
    with pytest.raises(UserError, match=rf"^{re.escape(str(cfg))}: fingerprint.model.norm.weight\[1\] is nan, not a finite number"):
        load(load_model("tiny-llama").model, folder)
    edit_config(cfg, lambda c: c["fingerprint"]["model.norm.weight"].__setitem__(1, 0.0))
    cfg.write_text(cfg.read_text().replace('"version": 1', '"version": 1e999'))  # json reads 1e999 as inf
    with pytest.raises(UserError, match=rf"^{re.escape(str(cfg))}: version is inf, not a finite number"):
        load(load_model("tiny-llama").model, folder)


@pytest.mark.parametrize("key, value", [
    ("target_modules", 5), ("target_modules", ["q_proj", 5]), ("target_modules", {"q_proj": 1}),
    ("r", "4"), ("r", 4.5), ("r", True), ("r", -1), ("r", None),
    ("lora_alpha", "8"), ("lora_alpha", [8]),
    ("layers_to_transform", "0"), ("layers_to_transform", [0, "1"]), ("layers_to_transform", -1),
    ("rank_pattern", ["q_proj"]), ("rank_pattern", {"q_proj": "x"}), ("rank_pattern", {"q_proj": 0}),
    ("alpha_pattern", "q_proj=4"), ("alpha_pattern", {"q_proj": "x"}),
    ("peft_type", 5),
])
def test_wrongly_typed_config_fields_are_one_error(key, value, tmp_path):
    _, folder = trained("lora:r=4", tmp_path)
    edit_config(folder / "adapter_config.json", lambda c: c.__setitem__(key, value))
    with pytest.raises(UserError, match=rf"^{re.escape(str(folder / 'adapter_config.json'))}: {key} is .*; it should be "):
        load(load_model("tiny-llama").model, folder)


def test_native_strategy_must_be_a_string(tmp_path):
    _, folder = trained("freeze:train=mlp", tmp_path)
    edit_config(folder / "peftlab_config.json", lambda c: c.__setitem__("strategy", 5))
    with pytest.raises(UserError, match="strategy should be a string"):
        load(load_model("tiny-llama").model, folder)


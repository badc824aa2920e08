"""The input gate of strategy specs: every mistake is one UserError, raised before anything
large is allocated; user regexes cannot backtrack catastrophically; a regex that matches
nothing, a method named twice, a rank beyond a layer, tokens beyond the positions and
non-finite numbers are refused. Property tests (hypothesis) over arbitrary and built specs."""

import re
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftlab import load_model, prepare
from peftlab.errors import UserError
from peftlab.methods import REGISTRY, parse_strategy, trainable_parameters
from peftlab.methods.protocol import Added
from peftlab.spec import REGEX_CHARS, split_lr, user_regex


def n_trainable(model):
    return sum(p.numel() for p in trainable_parameters(model).values())


def refused(spec, says, arch="tiny-llama", attaches=False):
    """prepare(spec) raises one UserError matching `says`, quickly, and (unless `attaches`: a
    check that an earlier step's modules are replaced runs after the later step) attaches nothing."""
    model = load_model(arch).model
    before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    with pytest.raises(UserError, match=says) as e:
        prepare(model, spec)
    assert time.perf_counter() - start < 5
    assert len(str(e.value).splitlines()) == 1
    if attaches:
        return str(e.value)
    assert sum(p.numel() for p in model.parameters()) == before, "something was attached before the refusal"
    assert not any(isinstance(m, Added) for m in model.modules())
    return str(e.value)


# ---- user regexes ---------------------------------------------------------------------------

CATASTROPHIC = [r"(.|.)*zzz", r"(a+)+b", r"(a*)*b", r"(a|ab)*c", r"(x+x+)+y", r"(.*a){3}zzz", r"(a|a)+",
                r"(\w+\s?)+$", r"(a?){25}", r"^(([a-z])+.)+[A-Z]([a-z])+$"]
TOO_COSTLY = [r".*.*.*.*zzz", "a?" * 24 + "a" * 24, r"\w*\w*\w*\w*\w*x"]
FINE = [r".*\.(q|v)_proj", r"(q_proj|v_proj)+", r"(.*\.)?q_proj$", r"model\.layers\.\d+\.self_attn\.(q|k)_proj",
        r"^(model\.layers\.0\.self_attn\.q_proj|model\.layers\.1\.mlp\.up_proj)$", r"(^|\.)(q_proj|v_proj)$",
        r"layers\.[0-9]{1,2}\.", r".*.*.*zzz", r"(\d{2})*x", r"(?i)Q_PROJ", r"(?=.*mlp).*up"]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_patterns_are_refused(pattern):
    with pytest.raises(UserError, match=r"^lora: bad target_regex '.*': it repeats a group") as e:
        user_regex(pattern, "lora: target_regex")
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("pattern", TOO_COSTLY)
def test_too_many_ways_are_refused(pattern):
    with pytest.raises(UserError, match="in too many ways"):
        user_regex(pattern, "lora: target_regex")


@pytest.mark.parametrize("pattern", FINE)
def test_accepted_patterns_compile_and_stay_fast_on_long_paths(pattern):
    rx = user_regex(pattern, "lora: target_regex")
    assert isinstance(rx, re.Pattern) and rx.pattern == pattern
    for text in ("a" * 199, "x" * 199, "model.layers.10.self_attn.q_proj." * 6):
        start = time.perf_counter()
        rx.search(text)
        assert time.perf_counter() - start < 1.0, (pattern, text[:20])


def test_length_syntax_and_nesting_depth_are_one_line_each():
    with pytest.raises(UserError, match=f"at most {REGEX_CHARS:,} are accepted"):
        user_regex("a" * (REGEX_CHARS + 1), "lora: target_regex")
    with pytest.raises(UserError, match=r"bad target_regex '\(': bad regular expression \(missing \)"):
        user_regex("(", "lora: target_regex")
    with pytest.raises(UserError, match="bad regular expression .*repetition number is too large"):
        user_regex("a{99999999999}", "lora: target_regex")
    with pytest.raises(UserError, match="nested too deeply"):
        user_regex("(" * 3000 + ")" * 3000, "lora: target_regex")
    with pytest.raises(UserError, match="must be text"):
        user_regex(5, "x.json: target_modules")


def test_the_helper_names_a_config_file_for_the_peft_reader():
    """The adapter-config reader calls it with 'FILE: target_modules'."""
    assert user_regex("^(q_proj|v_proj)$", "adapter_config.json: target_modules").fullmatch("q_proj")
    with pytest.raises(UserError, match=r"^adapter_config\.json: bad target_modules '\(a\+\)\+'"):
        user_regex("(a+)+", "adapter_config.json: target_modules")


def test_the_hanging_target_regex_is_refused_at_once():
    start = time.perf_counter()
    with pytest.raises(UserError, match="lora: bad target_regex"):
        parse_strategy("lora:target_regex=(.|.)*zzz")
    refused("lora:target_regex=(.|.)*zzz", "lora: bad target_regex")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("spec, says", [
    ("freeze:include=(a+)+", "freeze: bad include"),
    ("freeze:train=mlp,exclude=(.|.)*z", "freeze: bad exclude"),
    ("ia3:target_regex=(a|ab)*c", "ia3: bad target_regex"),
    ("ia3:feedforward_regex=(.*)*", "ia3: bad feedforward_regex"),
    ("loha:target_regex=(x+x+)+y", "loha: bad target_regex"),
    ("vera:target_regex=(a*)*", "vera: bad target_regex"),
    ("oft:target_regex=(a*)*", "oft: bad target_regex"),
    ("lora:rank_pattern=(a*)*=4", "lora: bad rank_pattern"),
    ("loha:alpha_pattern=(.|.)*=4", "loha: bad alpha_pattern"),
    ("lora:target_regex=" + "a" * (REGEX_CHARS + 1), "at most"),
])
def test_every_user_regex_goes_through_the_gate(spec, says):
    with pytest.raises(UserError, match=says):
        parse_strategy(spec)


def test_a_layer_regex_of_trainable_tokens_is_gated_too():
    refused("tokens:ids=5,layer=(a+)+", "names no module")
    model = load_model("tiny-llama").model
    prepare(model, r"tokens:ids=5,layer=model\.embed_.*")
    assert n_trainable(model) == 64


# ---- target_regex chooses alone, and must match ----------------------------------------------

def test_a_regex_that_matches_no_layer_is_refused():
    says = refused("lora:target_regex=zzz", r"lora: target_regex 'zzz' matches no linear layer of this model")
    assert "model.layers.0.self_attn.q_proj" in says
    refused("vera:target_regex=zzz", "vera: target_regex 'zzz' matches no linear layer")
    refused("ia3:target_regex=zzz", "ia3: target_regex 'zzz' matches no linear layer")
    refused("loha:targets=q_proj,target_regex=zzz", "loha: target_regex 'zzz' matches no linear layer")


def test_the_regex_alone_chooses_and_with_targets_either_picks():
    def hosts(spec):
        model = load_model("tiny-llama").model
        prepare(model, spec)
        return sorted({n.split(".lora.")[0] for n in trainable_parameters(model)})

    assert hosts(r"lora:r=2,target_regex=.*\.o_proj") == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert hosts(r"lora:r=2,targets=q_proj,target_regex=layers\.1\.mlp\.up") == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    assert hosts("lora:r=2") == [f"model.layers.{i}.self_attn.{x}_proj" for i in (0, 1) for x in "qv"]
    refused(r"lora:target_regex=layers\.0\.,layers=1", "no linear layer matches target_regex=layers.+ in blocks 1")


# ---- each method once ------------------------------------------------------------------------

@pytest.mark.parametrize("spec, method", [
    ("lora:r=2/lora:r=4", "lora"),
    ("lora:r=2,name=a/lora:r=4,name=b", "lora"),
    ("freeze:train=mlp/freeze:train=norm", "freeze"),
    ("prompt:tokens=2/targeted-qkv:from_layer=1/prompt:tokens=3", "prompt"),
    ("tokens:ids=5/tokens:ids=6", "tokens"),
])
def test_a_method_named_twice_is_refused(spec, method):
    with pytest.raises(UserError, match=f"^strategy names {method} twice"):
        parse_strategy(spec)


def test_methods_that_share_a_layer_slot_are_refused():
    refused("lora:r=2/dora:r=2", "lora and dora both put a lora module on model.layers.0.self_attn.q_proj", attaches=True)
    refused("lora:r=2,targets=q_proj/loraplus:r=2,targets=q_proj,name=other", "lora and loraplus both put a lora module",
            attaches=True)


def test_stacks_on_different_layers_still_work():
    model = load_model("tiny-llama").model
    prepare(model, "lora:r=2,targets=q_proj/dora:r=2,targets=v_proj")
    assert n_trainable(model) == 2 * (2 * 128 + 2 * 96 + 32)
    prepare(load_model("tiny-llama").model, "targeted-qkv:from_layer=1/lora:r=4")


# ---- sizes bounded by the model --------------------------------------------------------------

@pytest.mark.parametrize("spec, says", [
    ("lora:r=1000000", r"lora: r=1000000 is larger than v_proj's 32 outputs \(model\.layers\.0\.self_attn\.v_proj\); r must be ≤ 32"),
    ("lora:r=65,targets=q_proj", r"lora: r=65 is larger than q_proj's 64 inputs .*; r must be ≤ 64"),
    ("lora:r=33,targets=all-linear", r"k_proj's 32 outputs .*r must be ≤ 32"),
    ("lora:r=4,rank_pattern=q_proj=100", r"lora: rank_pattern gives model\.layers\.0\.self_attn\.q_proj rank 100, larger than its 64 inputs"),
    ("dora:r=1000000", r"dora: r=1000000 is larger than"),
    ("loraplus:r=1000000", r"loraplus: r=1000000 is larger than"),
    ("qlora:r=1000000", r"qlora: r=1000000 is larger than"),  # before the base is quantized
    ("lora:r=64,init=pissa", r"r must be ≤ 32"),
    ("loha:r=1000000", r"loha: r=1000000 is larger than v_proj's 32 outputs"),
    ("vera:r=1000000", r"vera: r=1000000 makes the shared projections A and B 128,000,000 values, more than the whole model"),
    ("adapter:r=1000000", r"adapter: r=1000000 is larger than the hidden size 64; a bottleneck must be ≤ 64"),
    ("oft:r=1000000", r"oft: r=1000000 blocks do not divide"),
    ("oft:block_size=1000000", r"oft: block_size=1000000 does not divide"),
    ("prompt:tokens=100000", r"prompt: tokens=100000 is not less than the model's 512 positions; tokens must be ≤ 511"),
    ("prefix:tokens=512", r"prefix: tokens=512 is not less than the model's 512 positions"),
    ("prefix:tokens=4,projection=1000000", r"prefix: projection=1000000 makes the reparametrisation MLP .* projection must be ≤"),
    ("lora:seed=99999999999999999999999", r"lora: seed=99999999999999999999999 is out of range; it must be ≥ 0 and ≤ 9223372036854775807"),
])
def test_sizes_beyond_the_model_are_refused_before_allocating(spec, says):
    refused(spec, says)


@pytest.mark.parametrize("spec", ["lora:r=32", "lora:r=64,targets=q_proj", "loha:r=32", "adapter:r=64", "prompt:tokens=511",
                                  "prefix:tokens=500", "vera", "vera:r=842", "oft:r=32,targets=q_proj"])
def test_the_limits_themselves_are_accepted(spec):
    prepare(load_model("tiny-llama").model, spec)


def test_a_limit_message_names_the_largest_rank_that_works():
    says = refused("lora:r=50,targets=all-linear", "r must be")
    limit = int(says.rsplit("≤ ", 1)[1])
    prepare(load_model("tiny-llama").model, f"lora:r={limit},targets=all-linear")
    for spec in ("vera:r=100000", "prefix:projection=100000"):
        limit = int(refused(spec, "must be").rsplit("≤ ", 1)[1])
        prepare(load_model("tiny-llama").model, spec.split("=")[0] + f"={limit}")


def test_gpt2_sequences_longer_than_the_positions_are_one_line():
    """GPT-2 indexes a learned position table: virtual tokens + text beyond it are refused by
    the hook, not an IndexError."""
    for spec in ("prompt:tokens=500", "prefix:tokens=500"):
        loaded = load_model("tiny-gpt2")
        prepare(loaded.model, spec)
        with pytest.raises(UserError, match=r"500 virtual tokens \+ 16 text tokens need 516 positions; the model has 512"):
            loaded.model(torch.zeros(1, 16, dtype=torch.long))
        assert loaded.model(torch.zeros(1, 12, dtype=torch.long)).logits.shape[1] in (12, 512)


# ---- non-finite numbers --------------------------------------------------------------------

@pytest.mark.parametrize("spec, says", [
    ("lora:alpha_pattern=q_proj=inf", r"lora: alpha_pattern: q_proj=inf must be a finite number"),
    ("lora:alpha_pattern=q_proj=nan", r"lora: alpha_pattern: q_proj=nan must be a finite number"),
    ("lora:alpha_pattern=q_proj=-1e400", r"must be a finite number"),
    ("lora:rank_pattern=q_proj=nan", r"lora: rank_pattern: in 'q_proj=nan', nan is not a number"),
    ("lora:rank_pattern=q_proj=inf", r"inf is not a number"),
    ("lora:rank_pattern=q_proj=1.5", r"1.5 is not a number; a rank is a whole number"),
    ("lora:alpha_pattern=q_proj=-2", r"lora: alpha_pattern: q_proj=-2 is out of range; it must be ≥ 0"),
    ("loha:alpha_pattern=v_proj=inf", r"loha: alpha_pattern: v_proj=inf must be a finite number"),
    ("lokr:rank_pattern=v_proj=nan", r"lokr: rank_pattern"),
    ("qlora:alpha_pattern=q_proj=nan", r"qlora: alpha_pattern"),
    ("lora:alpha=nan", r"lora: alpha=nan must be a finite number"),
    ("lora:alpha=1e400", r"lora: alpha=inf must be a finite number"),
    ("vera:d_initial=-inf", r"vera: d_initial=-inf must be a finite number"),
    ("oft:eps=nan", r"oft: eps=nan must be a finite number"),
    ("lora:rank_pattern=q_proj", r"pattern 'q_proj' is not PATTERN=VALUE"),
])
def test_non_finite_numbers_anywhere_are_refused_while_parsing(spec, says):
    with pytest.raises(UserError, match=says):
        parse_strategy(spec)


def test_a_rank_pattern_below_one_names_the_layer():
    refused("lora:rank_pattern=q_proj=0", r"lora: rank_pattern gives model\.layers\.0\.self_attn\.q_proj rank 0; ranks must be positive")
    refused("loha:rank_pattern=v_proj=-3", r"loha: rank_pattern gives model\.layers\.0\.self_attn\.v_proj rank -3")


def test_patterns_still_work():
    model = load_model("tiny-llama").model
    prepare(model, r"lora:r=4,rank_pattern=layers\.1\.self_attn\.q_proj=2,alpha_pattern=v_proj=3.5")
    shapes = {n: tuple(p.shape) for n, p in trainable_parameters(model).items()}
    assert shapes["model.layers.1.self_attn.q_proj.lora.default.A"] == (2, 64)
    assert shapes["model.layers.0.self_attn.q_proj.lora.default.A"] == (4, 64)
    delta = model.get_submodule("model.layers.0.self_attn.v_proj").lora["default"]
    assert delta.scaling == pytest.approx(3.5 / 4)


@pytest.mark.parametrize("spec", ["lora:r=8\nfull", "lora:name=a\x00b", "0\n0", "lora:target_regex=a\u2028b", "\tlora\x1b"])
def test_control_characters_are_refused_so_every_message_stays_one_line(spec):
    with pytest.raises(UserError, match="strategy holds the control character .* at position") as e:
        parse_strategy(spec)
    assert len(str(e.value).splitlines()) == 1


def test_a_strategy_file_that_cannot_be_read_is_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot read strategy file"):
        parse_strategy("a" * 5000 + ".toml")
    bad = tmp_path / "s.toml"
    bad.write_bytes(b"\xff\xfe strategy = 1")
    with pytest.raises(UserError, match="expected a TOML file"):
        parse_strategy(str(bad))


# ---- property tests ------------------------------------------------------------------------

def parses_or_refuses(spec: str) -> None:
    """What the command line does with -s SPEC before loading a model."""
    try:
        parse_strategy(split_lr(spec, 1e-3)[0])
    except UserError as e:
        assert len(str(e).splitlines()) == 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=120))
def test_any_text_parses_or_is_one_user_error(spec):
    parses_or_refuses(spec)


NAMES = sorted(REGISTRY) + ["", "lora ", "LORA", "x"]
KEYS = sorted({k for m in REGISTRY.values() for k in m.options}) + ["", "rank", "r ", "=", "x"]
VALUES = ["", "0", "1", "-1", "2", "4", "8", "64", "65", "1000000", "99999999999999999999999", "1e400", "-1e400", "nan",
          "inf", "-inf", "0.5", "1e-3", "true", "false", "maybe", "q_proj", "q_proj+v_proj", "all-linear", "mlp+norm",
          "0-1", "1", "0+1", "5-9", "q_proj=2", "q_proj=nan", "v_proj=inf", "(a+)+=2", ".*=3", "(", "(.|.)*zzz", "(a+)+",
          r".*\.o_proj", "zzz", "x=y=z", "random", "vocabulary", "text", "pissa", "houlsby", "pfeiffer", "lycoris",
          "64+68", "embed", "lm_head", "a" * 300, "é", "\x00", "1_000"]


@st.composite
def built_specs(draw):
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(NAMES))
        keys = list(REGISTRY[name].options) if name in REGISTRY else []
        items = []
        for _ in range(draw(st.integers(0, 4))):
            key = draw(st.sampled_from(keys + KEYS) if keys else st.sampled_from(KEYS))
            sep = draw(st.sampled_from(["=", "=", "=", "", "==", ":"]))
            items.append(key + sep + draw(st.sampled_from(VALUES) | st.text(max_size=8)))
        joiner = draw(st.sampled_from([",", ",", ", ", ",,", "+"]))
        steps.append(name + (":" + joiner.join(items) if items or draw(st.booleans()) else ""))
    return draw(st.sampled_from(["/", "/", " / ", "//"])).join(steps) + draw(st.sampled_from(["", "", "@1e-3", ".toml", "/"]))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(built_specs())
def test_built_specs_parse_or_are_one_user_error(spec):
    parses_or_refuses(spec)


def values_for(option):
    """A few values of the option's own kind, good and bad."""
    if option.kind == "int":
        return ["0", "1", "2", "4", "16", "33", "64", "100000", "-1"]
    if option.kind == "float":
        return ["0", "0.1", "0.5", "2", "16", "1e9", "-1"]
    if option.kind == "bool":
        return ["true", "false"]
    if option.kind == "choice":
        return list(option.choices)
    if option.kind in ("regex",):
        return [r".*\.o_proj", r"layers\.1\.", "zzz", "up_proj", "(a+)+"]
    if option.kind == "patterns":
        return ["q_proj=2", r"layers\.1\..*=4", "v_proj=100", "q_proj=0.5"]
    return ["q_proj", "q_proj+v_proj", "all-linear", "mlp+norm", "0-1", "1", "0+1", "64+68", "embed", "lm_head",
            "down_proj", "k_proj+v_proj+down_proj", "a"]


# qlora quantizes the whole base with bitsandbytes: its gate is the same as lora's (tested above),
# and it is kept out of the random draws for speed.
PREPARABLE = sorted(m for m in REGISTRY if m != "qlora")


@st.composite
def valid_looking_specs(draw):
    names = draw(st.lists(st.sampled_from(PREPARABLE), min_size=1, max_size=2, unique=True))
    steps = []
    for name in names:
        options = REGISTRY[name].options
        keys = draw(st.lists(st.sampled_from(sorted(options)), max_size=3, unique=True)) if options else []
        given_ = [f"{k}={draw(st.sampled_from(values_for(options[k])))}" for k in keys if k != "name"]
        steps.append(name + (":" + ",".join(given_) if given_ else ""))
    return "/".join(steps)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_looking_specs())
def test_valid_looking_specs_prepare_or_are_one_user_error(spec):
    model = load_model("tiny-llama").model
    try:
        prepare(model, spec)
    except UserError as e:
        assert len(str(e).splitlines()) == 1

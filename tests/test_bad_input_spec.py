"""Strategy-spec mistakes through the real command line (tests/bad_input.py): exit 2, one
`peftlab: error:` line saying what was wrong and what would be right, no traceback, every
input byte-identical and nothing written."""

import pytest

from bad_input import Case

P = ["params", "-m", "tiny-llama", "-s"]
T = ["-d", "{text}", "-o", "{tmp}/out", "--steps", "1", "--seq-len", "16", "--quiet"]


def train(spec, model="tiny-llama"):
    return ["train", "-m", model, "-s", spec, *T]


def toml(name, strategy):
    def setup(world):
        (world / name).write_text(f'strategy = "{strategy}"\n')
    return setup


CASES = [
    # user regexes: refused when they can backtrack catastrophically, or are too long or malformed
    Case("regex-nested-alternation", P + ["lora:target_regex=(.|.)*zzz"], 2,
         r"^peftlab: error: lora: bad target_regex '\(\.\|\.\)\*zzz': it repeats a group .* exponential time"),
    Case("regex-nested-repeat-freeze", P + ["freeze:include=(a+)+b"], 2, r"freeze: bad include '\(a\+\)\+b': it repeats a group"),
    Case("regex-exclude", P + ["freeze:train=mlp,exclude=(x+x+)+y"], 2, r"freeze: bad exclude"),
    Case("regex-ia3-feedforward", P + ["ia3:feedforward_regex=(.*)*"], 2, r"ia3: bad feedforward_regex"),
    Case("regex-rank-pattern", P + ["lora:rank_pattern=(a*)*=4"], 2, r"lora: bad rank_pattern '\(a\*\)\*'"),
    Case("regex-too-many-ways", P + ["lora:target_regex=.*.*.*.*zzz"], 2, r"lora: bad target_regex .* too many ways"),
    Case("regex-too-long", P + ["lora:target_regex=" + "a" * 40_000], 2, r"lora: bad target_regex: .* at most 32,768"),
    Case("regex-malformed", P + ["vera:target_regex=("], 2, r"vera: bad target_regex '\(': bad regular expression \(missing \)"),
    # a regex that matches no layer is refused instead of training the default q_proj, v_proj
    Case("regex-matches-nothing", P + ["lora:target_regex=zzz"], 2,
         r"lora: target_regex 'zzz' matches no linear layer of this model; .* model\.layers\.0\.self_attn\.q_proj"),
    Case("regex-matches-nothing-loha", P + ["loha:targets=q_proj,target_regex=zzz"], 2, r"loha: target_regex 'zzz' matches no"),
    Case("regex-outside-the-blocks", P + [r"lora:target_regex=layers\.0\.,layers=1"], 2,
         r"lora: no linear layer matches target_regex=layers\\\.0\\\. in blocks 1"),
    # each method once
    Case("method-twice", P + ["lora:r=2/lora:r=4"], 2, r"strategy names lora twice \(lora:r=2 and lora:r=4\); give each method once"),
    Case("method-twice-named", P + ["lora:r=2,name=a/lora:r=4,name=b"], 2, r"strategy names lora twice"),
    Case("method-twice-freeze", P + ["freeze:train=mlp/freeze:train=norm"], 2, r"strategy names freeze twice"),
    Case("method-twice-in-a-file", ["params", "-m", "tiny-llama", "-s", "{tmp}/dup.toml"], 2, r"strategy names prompt twice",
         setup=toml("dup.toml", "prompt:tokens=2/prompt:tokens=3")),
    Case("same-layers-two-methods", P + ["lora:r=2/dora:r=2"], 2,
         r"lora and dora both put a lora module on model\.layers\.0\.self_attn\.q_proj"),
    # sizes bounded by the model, checked before allocating
    Case("lora-rank-huge", P + ["lora:r=1000000"], 2,
         r"lora: r=1000000 is larger than v_proj's 32 outputs \(model\.layers\.0\.self_attn\.v_proj\); r must be ≤ 32"),
    Case("dora-rank", P + ["dora:r=65,targets=q_proj"], 2, r"dora: r=65 is larger than q_proj's 64 inputs .*; r must be ≤ 64"),
    Case("qlora-rank", P + ["qlora:r=1000000"], 2, r"qlora: r=1000000 is larger than"),
    Case("rank-pattern-too-big", P + ["lora:rank_pattern=q_proj=100"], 2,
         r"lora: rank_pattern gives model\.layers\.0\.self_attn\.q_proj rank 100, larger than its 64 inputs; its rank must be ≤ 64"),
    Case("loha-rank", P + ["loha:r=1000000"], 2, r"loha: r=1000000 is larger than"),
    Case("vera-rank", P + ["vera:r=1000000"], 2, r"vera: r=1000000 makes the shared projections .* more than the whole model .*; r must be ≤ 842"),
    Case("adapter-size", P + ["adapter:r=1000000"], 2, r"adapter: r=1000000 is larger than the hidden size 64; a bottleneck must be ≤ 64"),
    Case("oft-blocks", P + ["oft:r=1000000"], 2, r"oft: r=1000000 blocks do not divide .* 64 input features"),
    Case("prompt-tokens", P + ["prompt:tokens=100000"], 2,
         r"prompt: tokens=100000 is not less than the model's 512 positions; tokens must be ≤ 511"),
    Case("prefix-tokens", P + ["prefix:tokens=512"], 2, r"prefix: tokens=512 is not less than the model's 512 positions"),
    Case("prefix-projection", P + ["prefix:projection=1000000"], 2, r"prefix: projection=1000000 makes the reparametrisation MLP"),
    Case("seed-beyond-64-bits", P + ["lora:seed=99999999999999999999999"], 2, r"lora: seed=.* is out of range; it must be ≥ 0 and ≤ 9223372036854775807"),
    # non-finite numbers anywhere
    Case("rank-pattern-nan", P + ["lora:rank_pattern=q_proj=nan"], 2, r"lora: rank_pattern: in 'q_proj=nan', nan is not a number"),
    Case("alpha-pattern-inf", P + ["lora:alpha_pattern=q_proj=inf"], 2, r"lora: alpha_pattern: q_proj=inf must be a finite number"),
    Case("alpha-pattern-nan-loha", P + ["loha:alpha_pattern=v_proj=nan"], 2, r"loha: alpha_pattern: v_proj=nan must be a finite number"),
    Case("alpha-overflow", P + ["lora:alpha=1e400"], 2, r"lora: alpha=inf must be a finite number"),
    Case("strategy-file-name-too-long", P + ["a" * 5000 + ".toml"], 2, r"cannot read strategy file"),
    # the same through train: refused while parsing, or at prepare (before the model trains)
    Case("train-regex-nested", train("lora:target_regex=(.|.)*zzz"), 2, r"lora: bad target_regex"),
    Case("train-method-twice", train("lora:r=2/lora:r=4"), 2, r"strategy names lora twice"),
    Case("train-alpha-pattern-inf", train("lora:alpha_pattern=q_proj=inf"), 2, r"must be a finite number"),
    Case("train-regex-matches-nothing", train("lora:target_regex=zzz"), 2, r"lora: target_regex 'zzz' matches no linear layer"),
    Case("train-rank-huge", train("lora:r=1000000"), 2, r"lora: r=1000000 is larger than"),
    Case("train-prompt-tokens", train("prompt:tokens=100000"), 2, r"prompt: tokens=100000 is not less than"),
    Case("train-prompt-past-gpt2-positions", train("prompt:tokens=500", "tiny-gpt2"), 2,
         r"prompt: 500 virtual tokens \+ 16 text tokens need 516 positions; the model has 512"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_spec(case, bad_case):
    bad_case(case)

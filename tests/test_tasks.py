"""Task accuracy: teacher-forced scoring equals greedy decoding, multiple choice equals
log-likelihoods computed by hand, the statistics equal known values, built-in tasks are
deterministic with disjoint splits, and bad task files are one line."""

import json

import pytest
import torch

from peftlab import TrainConfig, load_blocks, load_model, prepare, train
from peftlab.errors import UserError
from peftlab.tasks import builtin, load, load_all
from peftlab.tasks.items import Choice
from peftlab.tasks.score import encode, row_scores, score
from peftlab.tasks.stats import mcnemar, wilson


@pytest.fixture(scope="module")
def arith_model():
    """tiny-llama trained until it gets some one-digit sums right and some wrong."""
    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "full")
    blocks = load_blocks(loaded, "arith:digits=1", 64)
    train(loaded.model, blocks, prepared, TrainConfig(steps=150, lr=3e-3, batch_size=8, seq_len=64, eval_every=0),
          show=False)
    loaded.model.eval()
    return loaded


def test_teacher_forced_equals_greedy_generate_item_by_item(arith_model):
    loaded = arith_model
    # The training split (mostly memorised) and the test split (mostly not): a real mix.
    items = [it for split in ("train", "test") for it in
             [builtin.Generation(({"role": "user", "content": p},), a, f"{split}{i}")
              for i, (p, a) in enumerate(builtin.arith(split, digits=1))]]
    assert len(items) >= 50
    rows = encode(loaded, items, 64)
    result = score(loaded.model, items, rows, torch.device("cpu"))
    special = list(loaded.tokenizer.all_special_ids)
    greedy = []
    for ids, start in zip(rows.ids, rows.start):
        gold = ids[start:]
        out = loaded.model.generate(input_ids=torch.tensor([ids[:start]]), attention_mask=torch.ones(1, start, dtype=torch.long),
                                    max_new_tokens=len(gold), do_sample=False, eos_token_id=special,
                                    pad_token_id=loaded.tokenizer.pad_token_id)
        greedy.append(out[0, start:].tolist() == gold)
    assert result["correct"] == greedy
    assert 5 <= sum(greedy) <= len(items) - 5, f"{sum(greedy)} of {len(items)} right: not a real mix"


def test_multiple_choice_equals_hand_computed_log_likelihoods():
    loaded = load_model("tiny-gpt2")
    items = [Choice("The whale was", ("white", "blue and vast", "a ship"), 1, "a"),
             Choice("Alice fell down the ", ("rabbit hole", "stairs"), 0, "b"),
             Choice("", ("x", "yy"), 1, "c")]
    rows = encode(loaded, items)
    result = score(loaded.model, items, rows, torch.device("cpu"))
    tok = loaded.tokenizer
    sums, norms = [], []
    for it in items:
        lls = []
        for c in it.choices:
            ctx, cont = it.prompt, " " + c
            if ctx.endswith(" "):
                ctx, cont = ctx.rstrip(" "), " " + cont
            head = tok(ctx, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
            whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
            whole = whole if ctx else head + whole
            logits = loaded.model(torch.tensor([whole])).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            lls.append(sum(float(lp[p - 1, whole[p]]) for p in range(len(head), len(whole))))
        sums.append(int(max(range(len(lls)), key=lambda k: lls[k])) == it.label)
        norms.append(int(max(range(len(lls)), key=lambda k: lls[k] / len(it.choices[k]))) == it.label)
        _, mine = row_scores(loaded.model, encode(loaded, [it]), torch.device("cpu"))
        assert mine == pytest.approx(lls, abs=1e-4)
    assert result["correct"] == [bool(x) for x in sums]
    assert result["correct_norm"] == [bool(x) for x in norms]


def test_wilson_and_mcnemar_against_known_values():
    # Wilson 95%: 81 of 263 -> (0.2553, 0.3662) (Newcombe 1998's worked example); 0 of 10 -> (0, 0.2775)
    assert wilson(81, 263) == pytest.approx((0.25527, 0.36622), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)
    # Exact McNemar: b=1, c=9 -> 2 * P[X <= 1 | n=10] = 22/1024 = 0.021484375
    a = [True] * 1 + [False] * 9 + [True] * 5
    b = [False] * 1 + [True] * 9 + [True] * 5
    m = mcnemar(a, b)
    assert (m["only_a"], m["only_b"]) == (1, 9) and m["p_value"] == pytest.approx(22 / 1024)
    assert m["difference"] == pytest.approx((6 - 14) / 15)
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0


def test_builtin_tasks_are_deterministic_and_train_test_disjoint():
    for opts in ({"digits": 2}, {"digits": 3, "op": "mul", "reverse": True}, {"digits": 2, "op": "sub"}):
        train_a, test_a = builtin.arith("train", **opts), builtin.arith("test", **opts)
        assert train_a == builtin.arith("train", **opts) and test_a == builtin.arith("test", **opts)
        assert len(test_a) == 500 and 4000 <= len(train_a) <= 5000  # 2-digit sub has only ~4,400 train pairs (a ≥ b)
        assert not {p for p, _ in train_a} & {p for p, _ in test_a}
    assert builtin.arith("test", digits=2, seed=1) != builtin.arith("test", digits=2, seed=0)  # seed changes the draw...
    assert not {p for p, _ in builtin.arith("train", digits=2, seed=1)} & {p for p, _ in builtin.arith("test", digits=2)}
    p, a = builtin.arith("test", digits=3, op="add", reverse=True)[0]
    x, y = map(int, p.removeprefix("What is ").split("?")[0].split(" + "))
    assert a == str(x + y)[::-1]


def test_which_book_is_disjoint_and_balanced():
    from conftest import need_assets

    need_assets("moby-dick", "alice")
    train_p, test_p = builtin.passages("train", n=100000), builtin.passages("test")
    assert not {t for t, _ in train_p} & {t for t, _ in test_p}
    assert abs(sum(b for _, b in test_p) * 2 - len(test_p)) <= 1
    assert builtin.test_items("which-book")[0].choices == tuple(builtin.BOOKS.values())


@pytest.mark.parametrize("record,line", [
    ({"answer": "4"}, r"t.jsonl:1: missing field 'prompt'"),
    ({"prompt": "2+2?", "answer": "  "}, r"t.jsonl:1: field 'answer' is empty"),
    ({"prompt": "Pick", "choices": [], "label": 0}, r"t.jsonl:1: field 'choices' must be a non-empty list"),
    ({"prompt": "Pick", "choices": ["a", "b"], "label": 2}, r"t.jsonl:1: field 'label' is 2, out of range for 2 choices"),
    ({"prompt": "Pick", "choices": ["a", "b"]}, r"t.jsonl:1: field 'label' must be the index"),
    ({"question": "?"}, r"t.jsonl:1: a task record needs 'prompt' and 'answer'"),
])
def test_bad_task_records_are_one_line(tmp_path, record, line):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match=line):
        load(str(f))


def test_an_item_longer_than_seq_len_is_refused(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"prompt": "x" * 100, "answer": "y"}) + "\n")
    with pytest.raises(UserError, match=r"t.jsonl:1: prompt and answer take \d+ tokens, more than --seq-len 64"):
        encode(load_model("tiny-llama"), load(str(f)).items, 64)


def test_task_names_and_sources():
    tasks = load_all(["arith:digits=1", "sums=arith:digits=2,op=mul,n=10"])
    assert [(t.name, t.source, len(t.items), t.kind) for t in tasks] == [
        ("arith", "arith:digits=1", 23, "generation"), ("sums", "arith:digits=2,op=mul,n=10", 10, "generation")]
    with pytest.raises(UserError, match="two tasks are named 'arith'"):
        load_all(["arith", "arith:digits=3"])
    with pytest.raises(UserError, match=r"arith: unknown option 'digit' \(did you mean: digits\?\)"):
        load("arith:digit=3")


def test_accuracy_lands_in_metrics_and_run_json(cli, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = cli("train", "-m", "tiny-llama", "-d", "arith:digits=1", "--task", "arith:digits=1",
                            "--steps", 4, "--seq-len", 64, "--eval-every", 2, "-o", out, "--quiet")
    assert code == 0, err
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "task/arith" in r] == [0, 2, 4]
    result = json.loads((out / "run.json").read_text())["result"]["tasks"]["arith"]
    assert result["n"] == 23 and len(result["correct"]) == 23 and result["curve"][0][0] == 0
    assert "task arith: accuracy" in stdout


def test_accuracy_in_compare_summary_report_and_peftlab_report(cli, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, err = cli("compare", "-m", "tiny-llama", "-d", "arith:digits=1", "--task", "arith:digits=1",
                            "-s", "full", "-s", "lora:r=4", "--steps", 4, "--seq-len", 64, "--eval-every", 2,
                            "--forget", "none", "--samples", 1, "--gen-tokens", 4, "-o", out, "--quiet")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    for r in results["strategies"]:
        t = r["tasks"]["arith"]
        assert t["n"] == 23 and len(t["correct"]) == 23 and [s for s, _ in t["curve"]] == [0, 2, 4]
    summary = (out / "summary.md").read_text()
    assert "| arith acc |" in summary and "McNemar" in summary and "| arith | full | lora:r=4 | 23 |" in summary
    page = (out / "report.html").read_text()
    assert 'id="fig-accuracy"' in page and 'id="paired-table"' in page
    run = tmp_path / "run"
    assert cli("train", "-m", "tiny-llama", "-d", "arith:digits=1", "--task", "arith:digits=1", "--steps", 2,
               "--seq-len", 64, "-o", run, "--quiet")[0] == 0
    code, stdout, err = cli("report", out, run, "-o", tmp_path / "all.html")
    assert code == 0, err
    assert "arith acc" in stdout and stdout.count("→") >= 3
    assert 'id="fig-accuracy"' in (tmp_path / "all.html").read_text()


def test_bad_task_files_on_the_command_line(cli, tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"prompt": "Pick", "choices": ["a", "b"], "label": 5}) + "\n")
    code, _, err = cli("train", "-m", "tiny-llama", "-d", "arith:digits=1", "--task", f, "--steps", 2, "-o",
                       tmp_path / "run", "--quiet")
    assert code == 2 and err.strip().endswith("t.jsonl:1: field 'label' is 5, out of range for 2 choices (0 to 1)")
    assert not (tmp_path / "run").exists()
    code, _, err = cli("train", "-m", "tiny-llama", "-d", "arith:digits=1", "--task", tmp_path / "nope.jsonl",
                       "--steps", 2, "-o", tmp_path / "run", "--quiet")
    assert code == 2 and "no such file" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("strategy", ["full", "lora:r=4", "prompt:tokens=4", "prefix:tokens=4", "ia3", "adapter:r=4"])
@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_the_shared_prefix_cache_changes_no_score(strategy, arch, monkeypatch):
    """Scoring with the chat template's shared prefix computed once (its KV cache reused) gives
    the scores of computing every row whole, for methods that act on the cache and the inputs."""
    from conftest import perturb
    from peftlab.tasks import score as score_mod

    loaded = load_model(arch)
    prepare(loaded.model, strategy)
    perturb(loaded.model, 0.05)
    loaded.model.eval()
    items = load("arith:digits=2,n=12").items
    rows = encode(loaded, items)
    assert score_mod.shared_prefix(rows) > 3
    shared = row_scores(loaded.model, rows, torch.device("cpu"), budget=200)
    monkeypatch.setattr(score_mod, "shared_prefix", lambda rows: 0)
    whole = row_scores(loaded.model, rows, torch.device("cpu"), budget=200)
    assert shared[0] == whole[0]
    assert shared[1] == pytest.approx(whole[1], abs=1e-3)


def test_last_number_match_decodes_for_real(arith_model, tmp_path):
    """match=last-number: what greedy decoding wrote, compared by its last number: an answer
    wrapped in words counts, a wrong number does not; exact matching refuses the wrapping."""
    loaded = arith_model
    rows_items = [it for it in load("arith:digits=1").items]
    exact = score(loaded.model, rows_items, encode(loaded, rows_items), torch.device("cpu"))
    task = load("arith:digits=1,match=last-number")
    assert task.match == "last-number" and task.source == "arith:digits=1"
    loose = score(loaded.model, task.items, encode(loaded, task.items), torch.device("cpu"), loaded, task.match)
    assert [a <= b for a, b in zip(exact["correct"], loose["correct"])] == [True] * len(task.items)
    from peftlab.tasks.score import last_number

    assert last_number("The answer is 1,234.") == "1234" and last_number("-5 then 7") == "7"
    assert last_number("no number") is None
    f = tmp_path / "words.jsonl"
    f.write_text(json.dumps({"prompt": "?", "answer": "It is 12."}) + "\n")
    assert load(f"{f}:match=last-number").match == "last-number"
    with pytest.raises(UserError, match="match=fuzzy is not one of exact, last-number"):
        load(f"{f}:match=fuzzy")

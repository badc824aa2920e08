"""lm-evaluation-harness agrees: an adapter trained by peftlab, loaded by lm-eval's `hf` model
with its `peft=` argument and scored through a local task definition, gets the same acc and
acc_norm as peftlab's scorer on the same items."""

import json
import textwrap

import torch

from conftest import PARAGRAPH
from peftlab import load_model
from peftlab.artifacts import load as load_adapter
from peftlab.tasks import load as load_task
from peftlab.tasks.score import encode, score


def test_lm_eval_scores_a_peftlab_adapter_like_peftlab(cli, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    text = tmp_path / "t.txt"
    text.write_text(PARAGRAPH * 40)
    assert cli("train", "-m", "tiny-llama", "-d", text, "-s", "lora:r=4,targets=all-linear", "--steps", 30,
               "--seq-len", 64, "--lr", 3e-3, "-o", tmp_path / "run", "--quiet")[0] == 0
    adapter = tmp_path / "run" / "adapter"
    base = load_model("tiny-llama")
    base.model.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")

    words = PARAGRAPH.split()
    items = [{"prompt": " ".join(words[i : i + 6]), "choices": [words[i + 6], words[i + 9], words[(i * 7) % len(words)]],
              "label": 0} for i in range(0, 40)]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in items))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "peftlab_mc.yaml").write_text(textwrap.dedent(f"""\
        task: peftlab_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{prompt}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        target_delimiter: " "
        metric_list:
          - metric: acc
          - metric: acc_norm
        """))
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'base'},peft={adapter},dtype=float32",
                                  tasks=["peftlab_mc"], task_manager=TaskManager(include_path=str(tasks)), batch_size=1,
                                  device="cpu", log_samples=True)
    theirs = out["results"]["peftlab_mc"]

    mine_model = load_model("tiny-llama")
    load_adapter(mine_model.model, adapter)
    task = load_task(str(data))
    mine = score(mine_model.model.eval(), task.items, encode(mine_model, task.items), torch.device("cpu"))
    assert 0 < mine["accuracy"] < 1 or 0 < mine["acc_norm"] < 1, "a task every model gets all right or all wrong proves little"
    assert mine["accuracy"] == theirs["acc,none"]
    assert mine["acc_norm"] == theirs["acc_norm,none"]
    per_item = [s["acc"] for s in sorted(out["samples"]["peftlab_mc"], key=lambda s: s["doc_id"])]
    assert [float(c) for c in mine["correct"]] == per_item

"""results.json -> summary.md (one table) and report.html (one self-contained file: plots
embedded as PNG data, values on hover from a few lines of inline script, no network).

A report may hold one comparison or several runs merged across time (`peftlab report`):
every entry carries its own date, versions and configuration, shown in the runs table.
"""

import html
import json
from datetime import datetime, timezone
from pathlib import Path

from ..files import write_text
from . import accuracy
from .figures import figures, final as _final


def _mb(x):
    return f"{x / 1e6:,.1f}" if x is not None else "—"


def _num(x, fmt):
    return format(x, fmt) if x is not None else "—"


def rows(summary: dict) -> list[dict]:
    """One flat row of headline numbers per entry (shared by summary.md and the HTML); what an
    entry did not measure (a plain train run has no style or drift) shows as —."""
    out = []
    names = accuracy.task_names(summary["strategies"])
    for r in summary["strategies"]:
        st, fg = r.get("style"), r.get("forgetting") or {}
        tps = sorted(r.get("tokens_per_s") or [0])
        wc = r.get("weight_change")
        evals = r.get("eval_loss") or []
        out.append({
            "strategy": r["label"],
            "trainable": _num(r.get("trainable"), ","),
            "trainable %": f"{100 * r['trainable'] / r['total']:.2f}" if r.get("trainable") and r.get("total") else "—",
            "step s (median)": _num(r.get("step_time_median_s"), ".3f"),
            "tokens/s (median)": f"{tps[len(tps) // 2]:,.0f}",
            "peak MB": _mb(r.get("peak_memory_bytes")),
            "optimizer MB": _mb(r.get("optimizer_state_bytes")),
            "train loss (last)": f"{_final(r['train_loss']):.3f}",
            "held-out loss": f"{evals[0][1]:.3f} → {_final(evals):.3f}" if evals else "—",
            "style p": (f"{st['before']['mean']:.3f}±{st['before']['std']:.3f} → {st['after']['mean']:.3f}±{st['after']['std']:.3f}"
                        if st else "—"),
            "forgetting loss": (f"{fg['before']:.3f} → {fg['after']:.3f}" if fg.get("before") is not None else "—"),
            "artifact MB": _mb(r.get("artifact_bytes")),
            "tracking % of step": f"{100 * wc['tracking_share_of_step_time']:.1f}" if wc else "—",
        } | accuracy.columns(r, names))
    return out


def run_rows(summary: dict) -> list[dict]:
    """Where each entry comes from: its folder, date, versions and configuration."""
    out = []
    for r in summary["strategies"]:
        c, v = r.get("config") or {}, r.get("versions") or {}
        out.append({
            "strategy": r["label"], "from": r.get("source", "—"), "finished": r.get("finished_at") or "—",
            "steps": c.get("steps", "—"), "batch × seq": f"{c.get('batch_size', '?')} × {c.get('seq_len', '?')}",
            "lr": c.get("lr", "—"), "dtype": c.get("dtype", "—"), "seed": c.get("seed", "—"),
            "peftlab": v.get("peftlab", "—"), "torch": v.get("torch", "—"), "transformers": v.get("transformers", "—"),
        })
    return out


def markdown_table(table: list[dict]) -> str:
    head = list(table[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(row[h]) for h in head) + " |" for row in table]
    return "\n".join(lines) + "\n"


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>peftlab comparison</title><style>
body{{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1280px;color:#222}}
table{{border-collapse:collapse;font-size:12px;margin:12px 0}} td,th{{border:1px solid #ccc;padding:4px 6px;text-align:right}}
th{{background:#f3f3f3}} td:first-child,th:first-child{{text-align:left}} figure{{margin:18px 0}} img{{max-width:100%}}
.samples td{{text-align:left;vertical-align:top;white-space:pre-wrap;max-width:520px}} .meta{{color:#666}}
figure{{position:relative}} #tip{{position:fixed;pointer-events:none;background:#fff;border:1px solid #999;padding:4px 6px;
font-size:12px;display:none;box-shadow:0 1px 4px #0003;white-space:pre;z-index:9}}
</style></head><body data-figures="{nfig}">
<h1>{title}</h1>
<p class="meta">model <b>{model}</b> · data <b>{data}</b> · unrelated text <b>{forget}</b> · {steps} steps ·
batch {batch} × seq {seq} · dtype {dtype} · identical initial weights: <b>{identical}</b> · {hardware} · report made {made}</p>
{table}
{paired}
<h2 id="runs">Runs</h2>
{runs}
<p class="meta">Move the pointer over a curve to read its values.</p>
{figures}
<h2 id="samples">Sample generations (greedy), before → after</h2>
<p class="meta">prompt: <code>{prompt}</code></p>
<table class="samples" id="samples-table"><tr><th>strategy</th><th>before</th><th>after</th></tr>{samples}</table>
<div id="tip"></div>
<script>
// Hover: each line plot's <img> carries its axes boxes (fractions of the image) and series.
function fmt(v) {{ return Number.isInteger(v) ? String(v) : v.toPrecision(4); }}
document.querySelectorAll("img[data-hover]").forEach(function (img) {{
  var boxes = JSON.parse(img.getAttribute("data-hover")), tip = document.getElementById("tip");
  img.addEventListener("mousemove", function (e) {{
    var r = img.getBoundingClientRect(), fx = (e.clientX - r.left) / r.width, fy = (e.clientY - r.top) / r.height;
    var box = boxes.find(function (b) {{ return fx >= b.box[0] && fx <= b.box[2] && fy >= b.box[1] && fy <= b.box[3]; }});
    if (!box || !box.series.length) {{ tip.style.display = "none"; return; }}
    var t = (fx - box.box[0]) / (box.box[2] - box.box[0]), lo = box.x[0], hi = box.x[1];
    var x = box.xlog ? Math.pow(10, Math.log10(lo) + t * (Math.log10(hi) - Math.log10(lo))) : lo + t * (hi - lo);
    var lines = box.series.map(function (s) {{
      var best = 0;
      s.x.forEach(function (v, i) {{ if (Math.abs(v - x) < Math.abs(s.x[best] - x)) best = i; }});
      return s.label + ": " + (s.y[best] === null ? "—" : fmt(s.y[best])) + "  (" + (box.xlabel || "x") + " " + fmt(s.x[best]) + ")";
    }});
    tip.textContent = box.title + "\\n" + lines.join("\\n");
    tip.style.left = (e.clientX + 14) + "px"; tip.style.top = (e.clientY + 14) + "px"; tip.style.display = "block";
  }});
  img.addEventListener("mouseleave", function () {{ tip.style.display = "none"; }});
}});
window.addEventListener("load", function () {{
  var ok = Array.prototype.filter.call(document.images, function (i) {{ return i.complete && i.naturalWidth > 0; }});
  document.body.setAttribute("data-figures-loaded", String(ok.length));
}});
</script></body></html>
"""


def html_table(table: list[dict], id_: str = "summary") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>" for row in table)
    return f'<table id="{id_}"><tr>{head}</tr>{body}</table>'


def _common(values, fmt=str):
    values = {fmt(v) for v in values}
    return values.pop() if len(values) == 1 else "mixed"


def page(summary: dict, title: str = "peftlab comparison") -> str:
    """The whole self-contained HTML page."""
    res = summary["strategies"]
    cfgs = [r.get("config") or summary.get("config") or {} for r in res]
    figs = figures(summary)
    fig_html = "\n".join(
        f'<figure id="{i}"><img alt="{html.escape(c)}" src="data:image/png;base64,{b}"'
        + (f" data-hover='{html.escape(json.dumps(hover), quote=True)}'" if any(h["series"] for h in hover) else "")
        + f"><figcaption>{html.escape(c)}</figcaption></figure>" for i, c, b, hover in figs)
    sampled = [r for r in res if r.get("samples")]
    samples = "".join(f"<tr><td>{html.escape(r['label'])}</td><td>{html.escape(r['samples']['before'])}</td>"
                      f"<td>{html.escape(r['samples']['after'])}</td></tr>" for r in sampled)
    hw = (res[0].get("hardware") or {})
    return PAGE.format(
        title=html.escape(title), nfig=len(figs), model=html.escape(summary["model"]), data=html.escape(summary["data"]),
        forget=html.escape(str(summary.get("forget") or "—")), steps=_common(c.get("steps") for c in cfgs),
        batch=_common(c.get("batch_size") for c in cfgs), seq=_common(c.get("seq_len") for c in cfgs),
        dtype=_common(c.get("dtype") for c in cfgs), identical=summary.get("identical_initial_weights", "—"),
        hardware=html.escape(f"{hw.get('cpu')} · {hw.get('cores')} cores"),
        made=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), table=html_table(rows(summary)),
        paired=accuracy.html_section(res, html_table),
        runs=html_table(run_rows(summary), "runs-table"), figures=fig_html,
        prompt=html.escape(sampled[0]["samples"]["prompt"] if sampled else "—"), samples=samples)


def write_report(summary: dict, out: Path) -> None:
    """A comparison's summary.md and report.html in folder `out`."""
    table = rows(summary)
    cfg = summary["config"]
    head = (f"# peftlab comparison\n\nmodel `{summary['model']}`, data `{summary['data']}`, {cfg['steps']} steps, "
            f"batch {cfg['batch_size']} × seq {cfg['seq_len']}, dtype {cfg['dtype']}; identical initial weights: "
            f"{summary['identical_initial_weights']}.\n\n")
    pairs = accuracy.paired(summary["strategies"])
    paired = "\n## Task accuracy, paired (McNemar, exact)\n\n" + markdown_table(pairs) if pairs else ""
    write_text(Path(out) / "summary.md", head + markdown_table(table) + paired)
    write_text(Path(out) / "report.html", page(summary))

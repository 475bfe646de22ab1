"""`rayalign report RUN_DIR`: one self-contained HTML page for a run directory.

Sections: the pairs (chosen against rejected as a word-level diff, contrast statistics, the
reviser's output; sortable, filterable by source and by reject reason), the rejects with their
reasons and raw text, contrast histograms per pair source (across every CLAIR output of the run),
the training curves (the training stage's own `curves.png`), and evaluation.

Prompts and answers are untrusted text: every piece of it is HTML-escaped on the server side,
and the page's one inline script only filters and sorts rows that are already there. Plots are
embedded as PNG data URIs: no server, no network, no external script or font.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import json
import random
import re
from pathlib import Path

from rayalign import records

_WORD = re.compile(r"\s+|\w+|[^\w\s]")


def word_diff(rejected: str, chosen: str) -> str:
    """HTML of the edit from rejected to chosen: deleted words in <del>, inserted in <ins>."""
    old, new = _WORD.findall(rejected), _WORD.findall(chosen)
    parts = []
    for op, a1, a2, b1, b2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if op == "equal":
            parts.append(html.escape("".join(old[a1:a2])))
            continue
        if a2 > a1:
            parts.append(f"<del>{html.escape(''.join(old[a1:a2]))}</del>")
        if b2 > b1:
            parts.append(f"<ins>{html.escape(''.join(new[b1:b2]))}</ins>")
    return "".join(parts)


def _text(value) -> str:
    if isinstance(value, list):
        return "\n".join(f"[{m['role']}] {m['content']}" for m in value)
    return "" if value is None else str(value)


def _completion(value) -> str:
    return value[-1]["content"] if isinstance(value, list) else str(value)


def _read(folder: Path) -> list[dict]:
    if not folder.exists() or not any(folder.iterdir()):
        return []
    return [r.value for r in records.read_records(folder) if r.value is not None]


def _clair_dirs(run: Path) -> list[Path]:
    # manifest.json, or summary.json in an output made before stage manifests
    return sorted({p.parent for p in run.rglob("pairs") if p.is_dir() and any(
        (p.parent / name).exists() for name in ("manifest.json", "summary.json"))})


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _plots():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def contrast_plot(pairs: list[dict]) -> str | None:
    if not pairs:
        return None
    plt = _plots()
    sources = sorted({p.get("source") or "unknown" for p in pairs})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for key, ax, label in (("jaccard", axes[0], "token Jaccard (higher = more minimal)"),
                           ("levenshtein", axes[1], "character Levenshtein (lower = more minimal)")):
        for source in sources:
            values = [p[key] for p in pairs if (p.get("source") or "unknown") == source and p.get(key) is not None]
            if values:
                ax.hist(values, bins=20, alpha=0.6, label=f"{source} ({len(values)})")
        ax.set_xlabel(label)
        ax.set_ylabel("pairs")
        ax.legend()
    fig.tight_layout()
    uri = _png(fig)
    plt.close(fig)
    return uri


def embedded_png(path: Path) -> str | None:
    """A PNG a stage drew (training's curves.png), as a data URI the page carries with it."""
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _throughput(metrics: list[dict]) -> str:
    from rayalign.train.logs import throughput, throughput_line

    speed = throughput(metrics)
    return f"<p>Throughput (median step): {html.escape(throughput_line(speed))}</p>" if speed else ""


def _pairs_table(pairs: list[dict], total: int) -> str:
    rows = []
    for p in pairs:
        meta = p.get("metadata") or {}
        if isinstance(meta, str):
            meta = json.loads(meta)
        source = html.escape(p.get("source") or "unknown")
        rows.append(
            f'<tr data-source="{source}">'
            f'<td>{html.escape(str(p["id"]))}</td><td>{source}</td>'
            f'<td class="text">{html.escape(_text(p["prompt"]))}</td>'
            f'<td class="text diff">{word_diff(_completion(p["rejected"]), _completion(p["chosen"]))}</td>'
            f'<td class="num" data-value="{p.get("jaccard", "")}">{_num(p.get("jaccard"), 3)}</td>'
            f'<td class="num" data-value="{p.get("levenshtein", "")}">{_num(p.get("levenshtein"), 0)}</td>'
            f'<td class="text small">{html.escape(str(meta.get("reviser_output", "")))}</td></tr>')
    sampled = f"a random sample of {len(pairs)} of {total} pairs" if len(pairs) < total else f"all {total} pairs"
    sources = sorted({p.get("source") or "unknown" for p in pairs})
    options = "".join(f'<option value="{html.escape(s)}">{html.escape(s)}</option>' for s in sources)
    return (f'<p>Showing {sampled}. Deleted words are <del>struck</del>, inserted words '
            f'<ins>underlined</ins> (rejected to chosen).</p>'
            f'<label>Source <select id="source-filter" data-table="pairs"><option value="">all</option>{options}'
            f'</select></label>'
            f'<table id="pairs" class="sortable"><thead><tr><th>id</th><th>source</th><th>prompt</th>'
            f'<th>rejected &rarr; chosen</th><th data-sort="num">Jaccard</th><th data-sort="num">Levenshtein</th>'
            f'<th>reviser output</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _rejects_table(rejects: list[dict], total: int) -> str:
    reasons = sorted({r.get("reason", "") for r in rejects})
    options = "".join(f'<option value="{html.escape(r)}">{html.escape(r)}</option>' for r in reasons)
    rows = "".join(
        f'<tr data-reason="{html.escape(r.get("reason", ""))}"><td>{html.escape(str(r.get("id", "")))}</td>'
        f'<td>{html.escape(r.get("reason", ""))}</td><td class="text">{html.escape(str(r.get("detail", "")))}</td>'
        f'<td class="text">{html.escape(_text(r.get("answer", "")))}</td>'
        f'<td class="text small">{html.escape(str(r.get("raw", "")))}</td></tr>' for r in rejects)
    shown = f"a random sample of {len(rejects)} of {total}" if len(rejects) < total else f"all {total}"
    return (f'<p>Showing {shown} rejects.</p><label>Reason <select id="reason-filter" data-table="rejects">'
            f'<option value="">all</option>{options}</select></label>'
            f'<table id="rejects" class="sortable"><thead><tr><th>id</th><th>reason</th><th>detail</th>'
            f'<th>answer</th><th>raw output</th></tr></thead><tbody>{rows}</tbody></table>')


def _eval_section(run: Path, sample: int) -> str:
    # manifest.json, or results.json in an evaluation made before stage manifests
    results_file = next(iter(sorted(run.rglob("eval/manifest.json")) + sorted(run.rglob("eval/results.json"))), None)
    if results_file is None:
        return "<p>No evaluation in this run.</p>"
    summary = json.loads(results_file.read_text())
    head = "<tr><th>model</th><th>score</th><th>95% CI</th><th>details</th></tr>"
    rows = []
    for name, r in summary.get("results", {}).items():
        score = r.get("accuracy", r.get("win_rate"))
        ci = r.get("ci95") or [None, None]
        details = ", ".join(f"{k} {v}" for k, v in r.items() if isinstance(v, int))
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{_pct(score)}</td>"
                    f"<td>{_pct(ci[0])} &ndash; {_pct(ci[1])}</td><td>{html.escape(details)}</td></tr>")
    examples_file = results_file.parent / "examples.jsonl"
    examples = [json.loads(line) for line in examples_file.read_text().splitlines()] if examples_file.exists() else []
    shown = random.Random(0).sample(examples, sample) if len(examples) > sample else examples
    columns = sorted({k for e in shown for k in e})
    body = "".join("<tr>" + "".join(f'<td class="text">{html.escape(_text(e.get(c, "")))}</td>' for c in columns)
                   + "</tr>" for e in shown)
    return (f"<p>{html.escape(summary.get('kind', ''))} evaluation of {html.escape(str(summary.get('data', '')))}"
            f"</p><table>{head}{''.join(rows)}</table>"
            f"<h3>Per-example outputs ({len(shown)} of {len(examples)})</h3>"
            f'<table id="examples" class="sortable"><thead><tr>'
            + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + f"</tr></thead><tbody>{body}</tbody></table>")


def _num(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _image(uri: str | None, alt: str) -> str:
    return f'<img alt="{alt}" src="{uri}">' if uri else f"<p>No data for {alt}.</p>"


_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222} table{border-collapse:collapse;margin:.5em 0;width:100%}
th,td{border:1px solid #ccc;padding:4px 6px;vertical-align:top;font-size:13px} th{background:#eee;cursor:pointer}
td.text{white-space:pre-wrap;max-width:32em;overflow-wrap:anywhere} td.small{font-size:11px;color:#555}
del{background:#fdd;color:#900} ins{background:#dfd;color:#060;text-decoration:underline} img{max-width:100%}
"""

# Filtering and sorting only: rows are already in the page, escaped.
_SCRIPT = """
document.querySelectorAll('select[data-table]').forEach(function (select) {
  select.addEventListener('change', function () {
    var key = select.id === 'source-filter' ? 'source' : 'reason';
    document.querySelectorAll('#' + select.dataset.table + ' tbody tr').forEach(function (row) {
      row.style.display = (!select.value || row.dataset[key] === select.value) ? '' : 'none';
    });
  });
});
document.querySelectorAll('table.sortable th').forEach(function (th, index) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], numeric = th.dataset.sort === 'num';
    var up = th.dataset.dir !== 'up'; th.dataset.dir = up ? 'up' : 'down';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[index], y = b.cells[index];
      var c = numeric ? parseFloat(x.dataset.value || 'NaN') - parseFloat(y.dataset.value || 'NaN')
                      : x.textContent.localeCompare(y.textContent);
      return up ? c : -c;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def write_report(run_dir: str | Path, out: str | Path | None = None, sample: int = 500) -> Path:
    """Write `report.html` for a run directory (or `out`); returns its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(2, "run directory not found", str(run))
    pairs, rejects = [], []
    for folder in _clair_dirs(run):
        pairs += _read(folder / "pairs")
        rejects += _read(folder / "rejects")
    rng = random.Random(0)
    shown_pairs = rng.sample(pairs, sample) if len(pairs) > sample else pairs
    shown_rejects = rng.sample(rejects, sample) if len(rejects) > sample else rejects
    metrics_files = sorted(run.rglob("train/metrics.jsonl"))
    metrics = [json.loads(line) for line in metrics_files[-1].read_text().splitlines()] if metrics_files else []
    curves = embedded_png(metrics_files[-1].parent / "curves.png") if metrics_files else None
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>rayalign report: {html.escape(run.name)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>rayalign report: {html.escape(str(run))}</h1>"
        f"<h2>Pairs</h2>{_pairs_table(shown_pairs, len(pairs))}"
        f"<h2>Rejects</h2>{_rejects_table(shown_rejects, len(rejects))}"
        f"<h2>Contrast</h2>{_image(contrast_plot(pairs), 'contrast histograms')}"
        f"<h2>Training</h2>{_throughput(metrics)}{_image(curves, 'training curves')}"
        f"<h2>Evaluation</h2>{_eval_section(run, sample)}"
        f"<script>{_SCRIPT}</script></body></html>")
    path = Path(out) if out else run / "report.html"
    path.write_text(page, encoding="utf-8")
    return path

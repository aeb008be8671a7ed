"""The improvement report: did the new version get better, against the parent and against the baseline the
literature compares with? Rendered from the improvement record alone (no model, no MLflow)."""

from __future__ import annotations

import html
import math

import jinja2

TEMPLATE = jinja2.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Improvement: {{ s.use_case }} ({{ s.method }})</title>
<style>
 body { font-family: "DejaVu Sans", sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
 table { border-collapse: collapse; width: 100%; margin: 1em 0; }
 th, td { border: 1px solid #ccc; padding: .35em .5em; text-align: left; vertical-align: top; font-size: 90%; }
 th { background: #f3f3f3; }
 .PASS { color: #176b2c; font-weight: bold; } .FAIL { color: #a31515; font-weight: bold; }
 .INCONCLUSIVE { color: #8a6d00; font-weight: bold; }
 tr.regression { background: #fdecea; } tr.improvement { background: #eaf7ee; }
 .note { color: #555; }
</style></head><body>
<h1>Improvement of {{ s.use_case }}: method {{ s.method }}</h1>
<p>Parent version <b>{{ s.parent }}</b>; improved version <b>{{ s.versions.improved }}</b>; baseline version
<b>{{ s.versions.baseline }}</b> ({{ baseline_text }}). Same plan, same seed ({{ s.seed }}).
The version holding the qualification alias is now <b>{{ s.qualified or "none" }}</b>.</p>
<p>{{ headline }}</p>
<h2>Claims: parent, improved, baseline</h2>
<p class="note">Each value with its confidence interval; a claim passes only on the pessimistic end of its interval.
Regressions of the improved version against the parent come first.</p>
<table><tr><th>claim</th><th>requirement</th><th>parent</th><th>improved</th><th>baseline</th><th>change</th></tr>
{% for r in s.claims %}<tr class="{{ 'regression' if r.regression else ('improvement' if r.improvement else '') }}">
<td>{{ r.claim }}{% if not r.mandatory %} (advisory){% endif %}</td><td>{{ r.text }}</td>
{% for v in (r.parent, r.improved, r.baseline) %}<td>{{ cell(v) | safe }}</td>{% endfor %}
<td>{% if r.regression %}regression{% elif r.improvement %}improved{% elif r.worse %}value worse{% else %}same verdict
{% endif %}</td>
</tr>{% endfor %}</table>
{% if s.clusters %}
<h2>Root-cause clusters (HUDD)</h2>
<p>{{ s.clusters.k }} clusters of the parent's test errors (relevance at layer {{ s.clusters.layer }}).
{{ s.clusters.pool_within_reach }} of {{ s.clusters.pool_items }} pool items lie within a cluster's reach;
the unsafe set holds {{ s.clusters.selected }} copies ({{ s.clusters.selected_clusters | join(", ") }} per cluster,
of {{ s.clusters.distinct_per_cluster | join(", ") }} distinct items: the rest are bootstrap copies).
{{ (s.clusters.figure or 'accuracy') | capitalize }} on the held-out test items within each cluster's reach (never the
selected pool items):</p>
<table><tr><th>cluster</th><th>errors clustered</th><th>held-out items</th><th>parent</th><th>improved</th>
<th>baseline</th></tr>
{% for c in range(s.clusters.k) %}<tr><td>{{ c }}</td><td>{{ s.clusters.sizes[c] }}</td>
<td>{{ s.clusters.heldout[c|string] }}</td>
{% for m in ("parent", "improved", "baseline") %}<td>{{ measure(s.clusters.accuracy[m][c]) | safe }}</td>
{% endfor %}</tr>{% endfor %}
</table>
<p class="note">{{ s.clusters.comparison }}</p>{% endif %}
<p class="note">Runs: parent {{ s.runs.parent }}, improved {{ s.runs.improved }}, baseline {{ s.runs.baseline }}.</p>
</body></html>
""", autoescape=True)


def _num(v: float | None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "not measured"
    return f"{v:.3g}"


def cell(v: dict | None) -> str:
    if v is None:
        return "not assessed"
    iv = v.get("interval")
    band = f" [{_num(iv[0])}, {_num(iv[1])}]" if iv else ""
    return f'<span class="{v["verdict"]}">{v["verdict"]}</span> {html.escape(_num(v["value"]))}{band}'


def measure(m: dict) -> str:
    if m.get("value") is None:
        return html.escape(m.get("details", {}).get("undefined", "not measured"))
    iv = m.get("interval")
    band = f" [{_num(iv['lower'])}, {_num(iv['upper'])}]" if iv else ""
    return f"{_num(m['value'])}{band} (n = {m.get('n')})"


def headline(s: dict) -> str:
    rows = s["claims"]
    reg = [r["claim"] for r in rows if r["regression"]]
    up = [r["claim"] for r in rows if r["improvement"]]
    words = [f"The improved version improves the verdict of {len(up)} claim(s)" + (f" ({', '.join(up)})" if up else "")]
    words.append(f"and regresses on {len(reg)}" + (f" ({', '.join(reg)})" if reg else "") + ".")
    if s.get("clusters"):
        acc = s["clusters"]["accuracy"]
        pairs = list(zip(acc["improved"], acc["baseline"], strict=True))
        better = sum(1 for a, b in pairs if None not in (a["value"], b["value"]) and a["value"] > b["value"])
        above = sum(1 for a, b in pairs if a.get("interval") and b.get("interval")
                    and a["interval"]["lower"] > b["interval"]["upper"])
        words.append(f"On the root-cause clusters, the unsafe-set retraining is above the random baseline with "
                     f"disjoint intervals on {above} of {s['clusters']['k']} cluster(s) (its point estimate is higher "
                     f"on {better}); the parent's figure there is biased low by selection.")
    return " ".join(words)


def render(summary: dict) -> str:
    baseline = {"hudd": "the same number of pool items drawn at random",
                "noise": "the same schedule without noise", "adversarial": "the same schedule without the attack",
                "lipschitz": "the training script's default architecture from scratch, same epochs and seed; the "
                             "1-Lipschitz version is another architecture, trained from scratch too: the parent's "
                             "weights do not carry over"}
    return TEMPLATE.render(s=summary, cell=cell, measure=measure, headline=headline(summary),
                           baseline_text=baseline.get(summary["method"], "the same schedule without the method"))

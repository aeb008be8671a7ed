"""The trust profile: one normalised score per trust attribute, for orientation on the first page.

Normalisation (stated in the report): each claim scores 1 when it PASSES, 0.5 when INCONCLUSIVE and
0 when it FAILS; an attribute's score is the mean over the claims allotted to it, in [0, 1]. An
attribute with measurements but no claim is "measured, not claimed"; one with neither is "not assessed".
No verdict is ever computed from these scores: verdicts come from the claims (argument rule R7).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from trustcase.schemas import Assessment, Stage, Verdict

ATTRIBUTES = ["performance", "calibration", "robustness", "certified robustness", "OOD/ODD monitoring",
              "explainability quality", "data quality"]
POINTS = {Verdict.PASS: 1.0, Verdict.INCONCLUSIVE: 0.5, Verdict.FAIL: 0.0}
NORMALISATION = ("Each claim scores 1 (PASS), 0.5 (INCONCLUSIVE) or 0 (FAIL); an attribute's score is the mean "
                 "over its claims, in [0, 1]. Claims are allotted by the stage of the check that measured them "
                 "and by their metric (data stage: data quality; formal stage: certified robustness; deployment "
                 "stage or ODD/OOD monitors: monitoring; attribution checks: explainability; calibration metrics; "
                 "perturbation scopes or attacks: robustness; anything else: performance). This aggregate is for "
                 "orientation only: no verdict is computed from it.")


def attribute(stage: Stage | None, check: str | None, metric: str, perturbed: bool) -> str:
    text = f"{check or ''} {metric}".lower()
    if stage == "data":
        return "data quality"
    if stage == "formal" or re.search(r"certif|smoothing|lipschitz|verif", text):
        return "certified robustness"
    if stage == "deployment" or re.search(r"\bood\b|odd|monitor|novelty|out_of_distribution", text):
        return "OOD/ODD monitoring"
    if re.search(r"explain|attribution|saliency|faithful|xai|deletion|insertion", text):
        return "explainability quality"
    if re.search(r"\bece\b|^ece|calib|brier|nll", metric.lower()) or "calibration" in (check or ""):
        return "calibration"
    if perturbed or re.search(r"adversar|attack|robust|sweep|perturb|corrupt", text):
        return "robustness"
    return "performance"


@dataclass
class Score:
    attribute: str
    score: float | None = None
    claims: list[str] = field(default_factory=list)
    verdicts: dict[str, int] = field(default_factory=dict)
    measured: bool = False

    @property
    def status(self) -> str:
        if self.claims:
            return f"{self.score:.2f} from {len(self.claims)} claim(s)"
        return "measured, not claimed" if self.measured else "not assessed"


def scores(a: Assessment, claim_stage: dict[str, Stage | None]) -> list[Score]:
    out = {name: Score(name) for name in ATTRIBUTES}
    req = {r.id: r for r in a.requirements}
    for e in a.evidence:
        r = req.get(e.claim_id or "")
        if r is None:
            continue
        s = out[attribute(claim_stage.get(r.id), e.check, r.metric, r.scope.perturbation is not None)]
        s.claims.append(r.id)
        s.verdicts[e.verdict.value] = s.verdicts.get(e.verdict.value, 0) + 1
    for s in out.values():
        if s.claims:
            s.score = sum(POINTS[Verdict(v)] * n for v, n in s.verdicts.items()) / len(s.claims)
    for o in a.outcomes:
        for m in o.measurements:
            out[attribute(o.stage, o.check, m.metric, m.scope.perturbation is not None)].measured = True
    return list(out.values())


def chart(profile: list[Score], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trustcase.reports.plots import COLOURS, _save

    fig, ax = plt.subplots(figsize=(7.2, 2.9))
    names = [s.attribute for s in profile][::-1]
    for y, s in enumerate(profile[::-1]):
        if s.score is None:
            ax.barh(y, 1.0, color="#f6f8fa", edgecolor="#d0d7de", hatch="//")
            ax.text(0.5, y, s.status, ha="center", va="center", fontsize=8, color="#59636e")
            continue
        worst = next(v for v in ("FAIL", "INCONCLUSIVE", "PASS") if s.verdicts.get(v))
        ax.barh(y, max(s.score, 0.01), color=COLOURS[worst], alpha=0.85)
        tally = ", ".join(f"{n} {v.lower()}" for v, n in sorted(s.verdicts.items()))
        ax.text(min(s.score, 1.0) + 0.01 if s.score < 0.7 else 0.01, y, f"{s.score:.2f}  ({tally})", va="center",
                fontsize=8, color="black" if s.score < 0.7 else "white")
    ax.set_yticks(range(len(names)), names, fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel("score: mean over claims of PASS = 1, INCONCLUSIVE = 0.5, FAIL = 0", fontsize=8)
    ax.set_title("Trust profile (orientation only: verdicts come from the claims)", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    return _save(fig, path)

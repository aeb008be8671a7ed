"""The evidence in words a quality manager reads: readable names, values in the requirement's units, one card
per claim, and the findings as plain sentences. From the Assessment alone, like the rest of the report.

Nothing here judges: verdicts come from the evidence records and the argument; this module only says them.
A name this module does not know is shown with its underscores turned into spaces, never as a raw key.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

from trustcase.schemas import (
    Assessment,
    ClaimChange,
    Evidence,
    Finding,
    Measurement,
    Requirement,
    Scope,
    Stage,
    Topic,
    Verdict,
)

# metrics whose values are proportions, shown in percent (as requirement texts state them)
PROPORTION = re.compile(r"accuracy|recall|precision|(^|_)rate$|share|coverage|pointing_game|relevance_mass"
                        r"|suspected_labels|feature_leakage")
METRICS = {
    "accuracy": "accuracy", "recall": "recall", "precision": "precision", "false_negative_rate": "false-negative rate",
    "ece": "expected calibration error", "cost": "mean cost", "flip_rate": "share of predictions changed",
    "adversarial_accuracy": "accuracy under attack", "attack_success_rate": "attack success rate",
    "lipschitz_certified_accuracy": "certified accuracy (Lipschitz bound)",
    "smoothing_certified_accuracy": "certified accuracy (randomized smoothing)",
    "smoothing_accuracy": "accuracy of the smoothed classifier", "smoothing_abstain_rate": "abstention rate",
    "accuracy_accepted": "accuracy on the inputs the monitor accepts",
    "accuracy_stopped": "accuracy on the inputs the monitor stops",
    "detection_rate": "share of out-of-ODD inputs stopped",
    "detection_rate_alert": "share of out-of-ODD inputs alerted or stopped", "false_alarm_rate": "false-alarm rate",
    "stop_rate": "share of inputs stopped", "alert_rate": "share of inputs alerted",
    "odd_share": "share inside the ODD",
    "auroc": "area under the ROC curve", "fpr_at_95tpr": "false-alarm rate at 95% detection",
    "recommended_methods": "attribution methods recommended", "relevance_mass": "share of relevance on the region",
    "leakage": "test items duplicating a training or validation item", "unreadable": "unreadable items",
    "imbalance_ratio": "class imbalance ratio (largest / smallest)", "odd_coverage": "share inside the ODD range",
    "drift_pvalue": "drift p-value (two-sample Kolmogorov-Smirnov)", "class_share": "class share", "items": "items",
    "constant_images": "constant images", "out_of_range": "items out of the value range", "duplicates": "duplicates",
    "near_duplicates": "near duplicates", "mean": "mean", "deletion_auc": "deletion area (lower is better)",
    "insertion_auc": "insertion area (higher is better)", "faithfulness": "faithfulness (insertion - deletion)",
    "infidelity": "infidelity", "sensitivity_max": "maximal sensitivity", "pointing_game": "pointing game hits",
    "sanity_rank_correlation": "rank correlation after weight randomisation",
    "ig_convergence_delta": "integrated-gradients convergence gap",
    "suspected_labels": "share of labels suspected wrong",
    "feature_leakage": "share of items the model takes for a training item", "poisoning_alarms": "poisoning alarms",
    "feature_drift_pvalue": "drift p-value (MMD in the model's feature space)",
    "iou": "IoU", "dice": "Dice", "pixel_precision": "pixel precision", "pixel_recall": "pixel recall",
    "mean_iou": "mean IoU over the classes", "mean_dice": "mean Dice over the classes",
    "image_recall": "share of defective images set aside", "image_false_alarm_rate": "false alarms on defect-free "
    "images", "bad_masks": "items refused for their mask", "empty_masks": "masks without a defect pixel",
    "full_masks": "masks of defect pixels only",
}
CLASS_METRICS = {"recall", "precision", "false_negative_rate", "class_share", "suspected_labels", "iou", "dice",
                 "pixel_precision", "pixel_recall"}
CHECKS = {"odd_monitor": "ODD monitor", "data_quality": "Data quality", "perturbation_sweep": "Perturbation sweep",
          "randomized_smoothing": "Randomized smoothing", "lipschitz": "Lipschitz certificate",
          "adversarial": "Adversarial attacks", "explainability": "Explanation quality", "root_causes": "Root causes",
          "performance": "Performance", "formal_properties": "Formal properties",
          "local_robustness": "Local robustness proofs", "label_issues": "Label issues",
          "component_outputs": "Component outputs"}
# the headings of the findings, in the order the body shows them
TOPICS = {Topic.FAILS: "What is shown not to hold", Topic.BREAKS: "What breaks the model, and from which amplitude",
          Topic.SUBGROUPS: "Which subgroups are weaker", Topic.MONITOR: "What the monitor stops",
          Topic.EXPLANATIONS: "Which explanations can be trusted", Topic.GAPS: "What could not be shown, and why",
          Topic.DATA: "What the data shows"}


FILE_SUFFIXES = {"json", "yaml", "yml", "html", "pdf", "zip", "png", "gif", "jpg", "jpeg", "csv", "pt", "pth", "py",
                 "safetensors", "sha256", "svg", "dot", "txt", "onnx", "nnet", "vnnlib", "npz", "npy"}
_DOTTED = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+\b")


def plain(text: str) -> str:
    """Free text a check wrote (validity conditions, limitations), with no raw key or None left for the reader:
    a dotted field path becomes words, None becomes 'none'; file names stay as they are."""
    def key(m: re.Match) -> str:
        k = m.group(0)
        return k if k.rsplit(".", 1)[1].lower() in FILE_SUFFIXES or k in ("e.g", "i.e") else k.replace(".", " ")
    return re.sub(r"\bNone\b", "none", _DOTTED.sub(key, str(text)))


METHODS = {"clopper-pearson": "Clopper-Pearson", "wilson": "Wilson", "t": "Student-t", "bootstrap": "bootstrap"}


def cap(text: str) -> str:
    """First letter up, the rest as written (ODD, Kolmogorov-Smirnov stay as they are)."""
    return text[:1].upper() + text[1:]


def words(name: str) -> str:
    return re.sub(r"[_.]+", " ", str(name)).strip()


def check_name(check: str | None) -> str:
    if check is None:
        return "no check"
    return CHECKS.get(check, words(check).capitalize())


def metric_name(metric: str) -> str:
    base, _, qualifier = metric.partition(":")
    head, _, tail = base.partition(".")
    label = METRICS.get(head, words(head))
    if tail:
        label += f" ({words(tail)})"
    if qualifier:
        label += f" of class {qualifier}" if head in CLASS_METRICS else f" ({words(qualifier)})"
    return label


def proportion(metric: str) -> bool:
    return bool(PROPORTION.search(metric.partition(":")[0]))


def number(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "not available"
    if isinstance(v, float) and math.isnan(v):
        return "undefined"
    if isinstance(v, float) and math.isinf(v):
        return "infinite" if v > 0 else "minus infinite"
    if isinstance(v, float) and v == int(v) and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def value(metric: str, v: float | None, unit: str = "") -> str:
    """A value in the requirement's units: proportions in percent, other figures with their unit."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return number(v)
    if proportion(metric) and -1e-9 <= v <= 1 + 1e-9:
        return f"{v * 100:.3g}%"
    return number(float(v)) + (f" {unit}" if unit and unit != "per item" else "")


def interval(metric: str, lower: float, upper: float) -> str:
    lo, hi = value(metric, lower), value(metric, upper)
    return f"{lo.rstrip('%')}–{hi}" if lo.endswith("%") and hi.endswith("%") else f"{lo} to {hi}"


def comparator(c: str) -> str:
    return {">=": "at least", ">": "above", "<=": "at most", "<": "below"}[c]


def subgroup(sub: dict[str, str]) -> str:
    return ", ".join(f"{words(k)} {v}" for k, v in sorted(sub.items()))


def human_error(error: str) -> str:
    """'label: Type: message (+ traceback)' from the flow -> a sentence; never a traceback."""
    first = error.splitlines()[0] if error else "unknown error"
    label, _, rest = first.partition(": ")
    kind, _, message = rest.partition(": ")
    what = re.sub(r"(?<!^)(?=[A-Z])", " ", kind).lower() if kind and kind[0].isupper() and message else ""
    name = check_name(label.split("[")[0]) + (f" ({words(label.split('[')[1].rstrip(']'))})" if "[" in label else "")
    reason = f"{what}: {message}" if what else rest or "no reason recorded"
    return plain(f"The {name} check did not finish ({reason.rstrip('.')}); nothing it would have measured is "
                 "available.")


class Units:
    """Units of the perturbation amplitudes, as the checks declared them (else as their curves' axes say)."""

    def __init__(self, a: Assessment):
        self.units: dict[str, str] = {}
        for o in a.outcomes:
            for key, unit in o.units.items():
                self.units.setdefault(key, unit)
            names = {m.scope.perturbation.name for m in o.measurements if m.scope.perturbation}
            for name in sorted(names):
                curve = next((c for c in o.curves if name in c.id or name in c.title), None)
                curve = curve or (o.curves[0] if len(names) == 1 and o.curves else None)
                if curve and name not in self.units:
                    m = re.search(r"\((.*)\)\s*$", curve.x_label)
                    self.units[name] = m.group(1) if m else curve.x_label

    def amplitudes(self, perturbation: str, vs: list[float]) -> str:
        """'0, 0.5 and 1% of pixels': the numbers, then the unit once."""
        if not vs:
            return "no amplitude"
        unit = self.units.get(perturbation, "")
        pct = unit.startswith("fraction of")
        nums = [f"{v * 100:.3g}" if pct else number(v) for v in vs]
        text = nums[0] if len(nums) == 1 else ", ".join(nums[:-1]) + " and " + nums[-1]
        if pct:
            return f"{text}% {unit.removeprefix('fraction ')}"
        if not unit:
            return text
        return f"{text} {unit}" if len(unit) <= 24 and "," not in unit else f"{text} ({unit})"

    def amplitude(self, perturbation: str, v: float | None) -> str:
        if v is None:
            return "not available"
        unit = self.units.get(perturbation, "")
        if unit.startswith("fraction of"):
            return f"{v * 100:.3g}% {unit.removeprefix('fraction ')}"
        if not unit:
            return number(v)
        return f"{number(v)} {unit}" if len(unit) <= 24 and "," not in unit else f"{number(v)} ({unit})"


def scope(s: Scope, units: Units, up_to: bool = True) -> str:
    parts = [f"{s.split} split"]
    if s.subgroup:
        parts.append(subgroup(s.subgroup))
    if s.perturbation:
        amp = units.amplitude(s.perturbation.name, s.perturbation.max_amplitude)
        parts.append(f"under {words(s.perturbation.name)}" + (f" up to {amp}" if up_to else ""))
    return ", ".join(parts)


@dataclass
class Card:
    """One claim as the body shows it."""

    r: Requirement
    e: Evidence | None
    stage: str
    verdict: Verdict
    measured: str
    rule: str
    amplitude: str | None
    validity: str
    check: str | None
    plot: str | None = None
    previous: ClaimChange | None = None
    facts: list[tuple[str, str]] = field(default_factory=list)
    rests_on: str = "nothing measured"  # the kind of figure the verdict rests on, in words (`rests_on`)


def rests_on(e: Evidence | None) -> str:
    """What kind of figure a claim's verdict rests on: a census, an estimate (on its interval) or a bound."""
    if e is None or not e.measured:
        return "nothing measured"
    if e.value is None or math.isnan(e.value):
        return "no figure: it is undefined"
    if e.kind == "estimate" and e.interval is None:
        return "an estimate without an interval (it cannot pass)"
    return {"census": "a census: exact over the whole split", "bound": "a certified bound",
            "estimate": "an estimate, judged on its interval's pessimistic end"}.get(e.kind, "not recorded")


def _measurements(a: Assessment) -> dict[str, list[Measurement]]:
    by_check: dict[str, list[Measurement]] = defaultdict(list)
    for o in a.outcomes:
        by_check[o.check] += o.measurements
    return by_check


def sweep_of(r: Requirement, ms: list[Measurement]) -> list[Measurement]:
    """The claim's metric on its split and subgroup over the whole amplitude grid of its perturbation."""
    p = r.scope.perturbation
    return sorted((m for m in ms if p and m.metric == r.metric and m.scope.split == r.scope.split
                   and m.scope.subgroup == r.scope.subgroup and m.scope.perturbation
                   and m.scope.perturbation.name == p.name), key=lambda m: m.amplitude or 0.0)


def _validity(a: Assessment, r: Requirement, e: Evidence | None, units: Units, confidence: float) -> str:
    if e is None or not e.measured:
        return "No evidence: nothing to qualify."
    n = next((m.n for o in a.outcomes if o.check == e.check for m in o.measurements
              if m.metric == r.metric and m.scope.split == r.scope.split and m.scope.subgroup == r.scope.subgroup
              and m.n), None)
    where = f"the {r.scope.split} split" + (f", {subgroup(r.scope.subgroup)}" if r.scope.subgroup else "")
    where += f" (n = {n})" if n else ""
    first = f"Measured on {where}"
    if r.scope.perturbation:
        amps = e.details.get("amplitudes") or []
        first += (f", {words(r.scope.perturbation.name)} at {units.amplitudes(r.scope.perturbation.name, amps)}"
                  if amps else "")
    if e.interval:
        first += f"; {confidence:.0%} {METHODS.get(e.interval.method, e.interval.method)} interval"
    second = next((o.caveat for o in a.outcomes if o.check == e.check and o.caveat), None)
    if second is None and e.validity:
        first_condition = plain(e.validity[0])
        second = first_condition if len(first_condition) <= 180 else first_condition[:177].rsplit(" ", 1)[0] + "…"
        second = second[0].upper() + second[1:]
    return first + "." + (f" {second.rstrip('.')}." if second else "")


def card(a: Assessment, r: Requirement, e: Evidence | None, stage: Stage | None, units: Units,
         previous: ClaimChange | None, why_missing: str) -> Card:
    conf = a.use_case.get("plan", {}).get("confidence", 0.95)
    thr = value(r.metric, r.threshold)
    want = f"{metric_name(r.metric)} {comparator(r.comparator)} {thr}"
    stage_title = stage.title if stage else "Not measured"
    if e is None or not e.measured:
        reason = why_missing or (e.rationale if e else "no evidence record")
        return Card(r, e, stage_title, Verdict.INCONCLUSIVE, "Not measured.",
                    f"INCONCLUSIVE: nothing measured this claim ({reason}).", None,
                    "No evidence: nothing to qualify.", None, previous=previous, facts=[("Requirement", want)],
                    rests_on=rests_on(e))
    v = value(r.metric, e.value)
    iv = f" (interval {interval(r.metric, e.interval.lower, e.interval.upper)})" if e.interval else ""
    at = ""
    if r.scope.perturbation and e.details.get("worst_amplitude") is not None:
        worst = units.amplitude(r.scope.perturbation.name, e.details["worst_amplitude"])
        at = f", its worst within the claim at {worst}"
    measured = f"{cap(metric_name(r.metric))} {v}{iv}{at}."
    if e.value is None or (isinstance(e.value, float) and math.isnan(e.value)):
        measured = f"{cap(metric_name(r.metric))} could not be computed."
    bound = "lower" if r.comparator in (">=", ">") else "upper"
    if e.verdict is Verdict.PASS:
        exact = {"census": "a census, exact over the whole split", "bound": "a certified bound"}.get(e.kind or "")
        rule = (f"PASS: the value satisfies {comparator(r.comparator)} {thr} ({exact})." if exact else
                f"PASS: the whole {conf:.0%} interval satisfies {comparator(r.comparator)} {thr}." if e.interval
                else f"PASS: the value satisfies {comparator(r.comparator)} {thr} (no sampling interval for this "
                     "figure).")
    elif e.verdict is Verdict.FAIL:
        rule = f"FAIL: the measured value {v} is not {comparator(r.comparator)} {thr}."
    elif e.value is None or (isinstance(e.value, float) and math.isnan(e.value)):
        rule = f"INCONCLUSIVE: the figure is undefined ({e.rationale})."
    else:
        end = (e.interval.lower if bound == "lower" else e.interval.upper) if e.interval else None
        rule = (f"INCONCLUSIVE: the value {v} meets {comparator(r.comparator)} {thr}, but the {bound} end of its "
                f"{conf:.0%} interval ({value(r.metric, end)}) does not: more items would decide.") if e.interval \
            else f"INCONCLUSIVE: {e.rationale}."
    amplitude = None
    if r.scope.perturbation:
        name, claimed = r.scope.perturbation.name, r.scope.perturbation.max_amplitude
        held = e.details.get("breaking_amplitude")
        claimed_s = units.amplitude(name, claimed)
        if held is None:
            amplitude = f"Does not hold even without {words(name)} (amplitude 0); claimed up to {claimed_s}."
        elif held >= claimed - 1e-12:
            amplitude = f"Holds at every measured amplitude up to the claimed {claimed_s}."
        else:
            grid = [x for x in e.details.get("amplitudes", []) if x > held]
            from_s = f"; fails to hold from {units.amplitude(name, grid[0])}" if grid else ""
            upto = f"up to {units.amplitude(name, held)}" if held > 0 else f"only without {words(name)}"
            amplitude = f"Holds {upto}{from_s}, short of the claimed {claimed_s}."
    return Card(r, e, stage_title, e.verdict, measured, rule, amplitude, _validity(a, r, e, units, conf), e.check,
                previous=previous, facts=[("Requirement", want + " on the " + scope(r.scope, units)),
                                          ("Rests on", rests_on(e))], rests_on=rests_on(e))


def cards(a: Assessment, claim_stage: dict[str, Stage | None], comparison: list[ClaimChange],
          units: Units) -> list[Card]:
    """Every claim, regressions first, then FAIL, INCONCLUSIVE, PASS (mandatory before advisory), then by id."""
    ev = {e.claim_id: e for e in a.evidence if e.claim_id}
    changes = {c.claim_id: c for c in comparison}
    failed = [human_error(x) for x in a.errors]
    out = []
    for r in a.requirements:
        e = ev.get(r.id)
        why = ""
        if e is None or not e.measured:
            why = f"no check of the plan measures {metric_name(r.metric)} on the {scope(r.scope, units)}"
            if failed:
                why += "; " + " ".join(failed).rstrip(".")
        out.append(card(a, r, e, claim_stage.get(r.id), units, changes.get(r.id), why))
    order = {Verdict.FAIL: 0, Verdict.INCONCLUSIVE: 1, Verdict.PASS: 2}
    return sorted(out, key=lambda c: (not (c.previous and c.previous.regression), not c.r.mandatory,
                                      order[c.verdict], c.r.id))


# --- findings ----------------------------------------------------------------------------------------------------

def _at(ms: list[Measurement], metric: str, amplitude: float | None, pert: str | None) -> Measurement | None:
    for m in ms:
        if (m.metric == metric and not m.scope.subgroup and m.scope.split == "test"
                and (m.amplitude or 0.0) == (amplitude or 0.0)
                and (m.scope.perturbation.name if m.scope.perturbation else None) == pert):
            return m
    return None


def _collapse(a: Assessment, ms: list[Measurement], amplitude: float | None, pert: str | None) -> str:
    """' and the model then calls nearly every input <class>' when one class takes (almost) all predictions."""
    classes = a.use_case.get("model", {}).get("class_names", [])
    rec = {c: _at(ms, f"recall:{c}", amplitude, pert) for c in classes}
    if len(classes) < 2 or any(m is None or m.value is None for m in rec.values()):
        return ""
    top = [c for c, m in rec.items() if m.value >= 0.95]
    if len(top) == 1 and all(m.value <= 0.05 for c, m in rec.items() if c != top[0]):
        return f"; the model then calls nearly every input '{top[0]}'"
    return ""


def say(f: Finding, units: Units) -> str:
    """A check's finding in the report's words: each cited measurement's value and interval in its units."""
    text = f.text
    for key, m in f.cites.items():
        p = m.scope.perturbation
        amp = units.amplitude(p.name, m.amplitude) if p else number(m.amplitude)
        iv = f" (interval {interval(m.metric, m.interval.lower, m.interval.upper)})" if m.interval else ""
        text = text.replace(f"{{{key}.amplitude}}", amp).replace(f"{{{key}}}", value(m.metric, m.value, m.unit) + iv)
    return plain(text)


def findings(a: Assessment, arg_verdict: Verdict, claim_stage: dict[str, Stage | None], units: Units
             ) -> list[tuple[str, list[str]]]:
    """The findings a manager needs, as sentences generated from the claims and said by the checks (their typed
    `findings`, the same for every check), under plain headings."""
    req = {r.id: r for r in a.requirements}
    ev = {e.claim_id: e for e in a.evidence if e.claim_id in req}
    by_check = _measurements(a)
    said: dict[Topic, list[str]] = defaultdict(list)
    for o in a.outcomes:
        for f in o.findings:
            said[f.topic].append(say(f, units))
    whole = [m for o in a.outcomes for m in o.measurements]
    out: list[tuple[str, list[str]]] = []

    # what fails on the data as it is (claims under perturbations are said below, with their amplitude)
    fails = []
    for r in a.requirements:
        e = ev.get(r.id)
        if e is None or e.verdict is not Verdict.FAIL or r.scope.perturbation:
            continue
        iv = f" (interval {interval(r.metric, e.interval.lower, e.interval.upper)})" if e.interval else ""
        fails.append(f"{r.id}: {metric_name(r.metric)} {value(r.metric, e.value)}{iv} on the {scope(r.scope, units)}, "
                     f"required {comparator(r.comparator)} {value(r.metric, r.threshold)}"
                     + ("." if r.mandatory else " (advisory claim)."))
    collapse = _collapse(a, whole, None, None)
    if collapse:
        fails.append(f"On the test data as it is, the model{collapse.removeprefix('; the model then')}.")
    fails += said[Topic.FAILS]
    if fails:
        out.append((TOPICS[Topic.FAILS], fails))

    # what breaks the model (claims under perturbations, then perturbations measured without a claim)
    breaks, holds = [], []
    claimed = set()
    for r in a.requirements:
        e = ev.get(r.id)
        p = r.scope.perturbation
        if p is None or e is None or not e.measured:
            continue
        claimed.add(p.name)
        name = words(p.name)
        if e.verdict is Verdict.PASS:
            holds.append(f"{name} up to {units.amplitude(p.name, p.max_amplitude)} ({r.id})")
            continue
        held = e.details.get("breaking_amplitude")
        amps = [x for x in e.details.get("amplitudes", []) if held is None or x > held]
        first = amps[0] if amps else e.details.get("worst_amplitude")
        m = next((m for m in sweep_of(r, by_check.get(e.check, [])) if (m.amplitude or 0.0) == first), None)
        shown = m or Measurement(check=e.check, metric=r.metric, value=e.value, interval=e.interval)
        iv = f" (interval {interval(r.metric, shown.interval.lower, shown.interval.upper)})" if shown.interval else ""
        start = (f"{cap(words(p.name))} at {units.amplitude(p.name, first)}" if first
                 else f"Already at {name} 0")
        verb = "breaks" if e.verdict is Verdict.FAIL else "puts in doubt"
        out_of = f" (the claim covers up to {units.amplitude(p.name, p.max_amplitude)})"
        breaks.append(f"{start}{out_of} {verb} {r.id}: {metric_name(r.metric)} {value(r.metric, shown.value)}{iv} "
                      f"against {comparator(r.comparator)} {value(r.metric, r.threshold)}"
                      f"{_collapse(a, by_check.get(e.check, []), first, p.name)}."
                      + ("" if r.mandatory else " (advisory claim)"))
    breaks += said[Topic.BREAKS]
    if holds:
        breaks.append("The model holds its claims under " + "; ".join(holds) + ".")
    if breaks:
        out.append((TOPICS[Topic.BREAKS], breaks))

    # weaker subgroups: per metric claimed on a subgroup (or the critical class's recall), weakest vs strongest
    subs = []
    critical = a.use_case.get("model", {}).get("critical_class")
    metrics = {r.metric for r in a.requirements if r.scope.subgroup} | ({f"recall:{critical}"} if critical else set())
    for metric in sorted(metrics) + ["accuracy"]:
        ms = [m for m in whole if m.metric == metric and m.scope.subgroup and m.scope.perturbation is None
              and m.scope.split == "test" and m.value is not None and not math.isnan(m.value) and m.interval]
        if len(ms) < 2:
            continue
        seen = {}
        for m in ms:
            seen.setdefault(tuple(sorted(m.scope.subgroup.items())), m)
        ms = sorted(seen.values(), key=lambda m: m.value)
        lo, hi = ms[0], ms[-1]
        text = (f"{cap(metric_name(metric))}: {value(metric, lo.value)} for {subgroup(lo.scope.subgroup)} "
                f"against {value(metric, hi.value)} for {subgroup(hi.scope.subgroup)}")
        if lo.interval.upper < hi.interval.lower:
            subs.append(text + f"; {subgroup(lo.scope.subgroup)} is weaker (the intervals do not overlap).")
        else:
            subs.append(text + "; the intervals overlap, so no subgroup is shown to be weaker.")
        if len(subs) >= 3:
            break
    subs += said[Topic.SUBGROUPS]
    if subs:
        out.append((TOPICS[Topic.SUBGROUPS], subs))
    for topic in (Topic.DATA, Topic.MONITOR, Topic.EXPLANATIONS):  # said by the checks alone
        if said[topic]:
            out.append((TOPICS[topic], said[topic]))

    # what could not be shown, and why
    gaps = []
    for r in a.requirements:
        e = ev.get(r.id)
        if e is not None and e.verdict is not Verdict.INCONCLUSIVE:
            continue
        if e is None or not e.measured:
            gaps.append(f"{r.id} ({r.text.rstrip('.')}) was not measured: no check of the plan measures "
                        f"{metric_name(r.metric)} on the {scope(r.scope, units)}.")
        elif e.value is None or (isinstance(e.value, float) and math.isnan(e.value)):
            gaps.append(f"{r.id}: the figure is undefined ({e.rationale}).")
        elif e.interval:
            end = e.interval.lower if r.comparator in (">=", ">") else e.interval.upper
            gaps.append(f"{r.id}: {metric_name(r.metric)} {value(r.metric, e.value)} meets "
                        f"{comparator(r.comparator)} {value(r.metric, r.threshold)}, but its interval reaches "
                        f"{value(r.metric, end)}: more items would decide.")
        else:
            gaps.append(f"{r.id}: {e.rationale}.")
    gaps += [f"The {check_name(o.check)} check was not run: {o.skipped}." for o in a.outcomes if o.skipped]
    gaps += [human_error(x) for x in a.errors] + said[Topic.GAPS]
    if gaps:
        out.append((TOPICS[Topic.GAPS], gaps))
    return out


def decision(a: Assessment, arg_verdict: Verdict, cards_: list[Card]) -> str:
    """The decision in one or two sentences."""
    fails = [c.r.id for c in cards_ if c.verdict is Verdict.FAIL and c.r.mandatory]
    open_ = [c.r.id for c in cards_ if c.verdict is Verdict.INCONCLUSIVE and c.r.mandatory]
    n = sum(1 for r in a.requirements if r.mandatory)
    if arg_verdict is Verdict.PASS:
        return f"Every one of the {n} mandatory claims is shown to hold, and every AMLAS stage is supported."
    if fails:
        text = (f"Not acceptable as assessed: {len(fails)} of {n} mandatory claims are shown not to hold "
                f"({', '.join(fails)}).")
    else:
        text = "Not shown to be acceptable: no mandatory claim fails"
        text += f", but {len(open_)} could not be shown either way ({', '.join(open_)})." if open_ else \
            ", but the argument has goals without judged evidence."
    if not a.complete:
        text += " The assessment is incomplete: some checks did not finish."
    return text


def facts(a: Assessment) -> dict[str, int]:
    """Readable items per split, as the data fingerprint counted them."""
    return dict(a.provenance.data_items)

"""Judge each requirement against what the checks measured, conservatively, by the kind of figure.

A census (exact over the whole split) and a bound (a certificate) are judged on their value: PASS if it
satisfies the claim, FAIL if not. An estimate `metric >= t` PASSES only if the lower bound of its interval
is >= t (the whole interval satisfies it), FAILS if the point estimate violates it, and is INCONCLUSIVE in
between (more data would decide); an estimate without an interval is INCONCLUSIVE (it can neither pass nor
fail on a point), and so is a claim nothing measured. Under a perturbation scope, the claim must hold at
every amplitude up to the declared maximum: the worst amplitude decides. An undefined figure (no value,
NaN, or an interval bound that is NaN: e.g. a recall with no item of the class) cannot PASS or FAIL: the
claim is INCONCLUSIVE and its rationale says why the figure is undefined.
"""

from __future__ import annotations

import math
import operator

from trustcase.schemas import CheckOutcome, Evidence, Measurement, Requirement, Verdict
from trustcase.schemas.evidence import KINDS

OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def _nan(x: float | None) -> bool:
    return x is not None and math.isnan(x)


def undefined(m: Measurement) -> bool:
    lo, hi = _bounds(m)
    return m.value is None or math.isnan(m.value) or _nan(lo) or _nan(hi)


def verdict(value: float | None, comparator: str, threshold: float, lower: float | None,
            upper: float | None, kind: str = "estimate") -> Verdict:
    if value is None or math.isnan(value) or math.isnan(threshold) or _nan(lower) or _nan(upper):
        return Verdict.INCONCLUSIVE
    ok = OPS[comparator]
    if kind in ("census", "bound"):  # exact over the split, or a certificate: the figure itself decides
        return Verdict.PASS if ok(value, threshold) else Verdict.FAIL
    # an estimate: the pessimistic end of its interval decides a PASS; with no interval, nothing can
    bound = lower if comparator in (">=", ">") else upper
    if bound is None:
        return Verdict.INCONCLUSIVE
    if not ok(value, threshold):
        return Verdict.FAIL
    return Verdict.PASS if ok(bound, threshold) else Verdict.INCONCLUSIVE


def bare(m: Measurement) -> bool:
    """An estimate with no interval: no claim can pass (or fail) on it."""
    return m.kind == "estimate" and m.interval is None


def why_bare(m: Measurement) -> str:
    if m.details.get("no_interval"):  # its check says why (e.g. a count over a sample)
        return str(m.details["no_interval"])
    return "it is a sampling estimate without an interval, and a claim passes only on its interval's pessimistic end"


def why_undefined(m: Measurement) -> str:
    """Why a figure has no value, in the reader's words: its check says it (details["undefined"], as
    `measurement.proportion` writes it), else the metric does."""
    if m.details.get("undefined") and m.details["undefined"] != "no item (n = 0)":
        return str(m.details["undefined"])
    family, _, cls = m.metric.partition(":")
    where = m.scope.label()
    if m.n == 0 and family in ("recall", "false_negative_rate", "class_share"):
        return f"no {cls} item in the {where}"
    if m.n == 0 and family == "precision":
        return f"the model predicted no {cls} item on the {where}"
    if m.n == 0:
        return f"no item to compute it on in the {where} (n = 0)"
    return f"the measurement has no defined value on the {where} (n = {m.n})"


def _bounds(m: Measurement) -> tuple[float | None, float | None]:
    return (m.interval.lower, m.interval.upper) if m.interval else (None, None)


def _pessimism(m: Measurement, comparator: str) -> tuple[float, float]:  # defined measurements only
    """Sort key: the larger, the worse for the claim (an estimate by its interval's pessimistic end, ties by the
    value itself: bounds clipped at a metric's floor tie often, e.g. IoU 0.009 (0-0.015) and 0 (0-0))."""
    lo, hi = _bounds(m) if m.kind == "estimate" else (None, None)
    if comparator in (">=", ">"):
        return -(lo if lo is not None else m.value), -m.value
    return hi if hi is not None else m.value, m.value


def matches(r: Requirement, m: Measurement) -> bool:
    if m.metric != r.metric or m.scope.split != r.scope.split or m.scope.subgroup != r.scope.subgroup:
        return False
    rp, mp = r.scope.perturbation, m.scope.perturbation
    if rp is None:
        return mp is None
    return mp is not None and mp.name == rp.name and (m.amplitude or 0.0) <= rp.max_amplitude + 1e-12


def breaking_amplitude(r: Requirement, ms: list[Measurement]) -> float | None:
    """The largest grid amplitude up to which the claim holds (PASS) at every amplitude; None if never."""
    best = None
    for m in sorted(ms, key=lambda m: m.amplitude or 0.0):
        lo, hi = _bounds(m)
        if verdict(m.value, r.comparator, r.threshold, lo, hi, m.kind) is not Verdict.PASS:
            break
        best = m.amplitude or 0.0
    return best


def judge(requirements: list[Requirement], outcomes: list[CheckOutcome]) -> list[Evidence]:
    measured = [(o, m) for o in outcomes for m in o.measurements]
    evidence = []
    for r in requirements:
        found = [(o, m) for o, m in measured if matches(r, m)]
        if not found:
            evidence.append(Evidence(
                claim_id=r.id, check=None, metric=r.metric, value=None, threshold=r.threshold,
                comparator=r.comparator, verdict=Verdict.INCONCLUSIVE, scope=r.scope,
                rationale=f"no check of the plan measured {r.metric} on {r.scope.label()}",
            ))
            continue
        defined = [(o, m) for o, m in found if not undefined(m)]
        hole = next(((o, m) for o, m in found if undefined(m)), None)
        if defined:
            # full ties: the smallest amplitude (max keeps the first), where the claim is first that bad
            defined.sort(key=lambda om: om[1].amplitude or 0.0)
            o, worst = max(defined, key=lambda om: _pessimism(om[1], r.comparator))
            lo, hi = _bounds(worst)
            v = verdict(worst.value, r.comparator, r.threshold, lo, hi, worst.kind)
            if v is Verdict.PASS:  # an estimate without an interval elsewhere in the sweep cannot pass either
                o, worst = next(((o2, m) for o2, m in defined if bare(m)), (o, worst))
                lo, hi = _bounds(worst)
                v = verdict(worst.value, r.comparator, r.threshold, lo, hi, worst.kind)
        if hole and (not defined or v is not Verdict.FAIL):  # a hole can hide a failure: never a PASS
            o, m = hole
            at = f" at amplitude {m.amplitude:g}" if m.amplitude is not None else ""
            evidence.append(Evidence(
                claim_id=r.id, check=o.check, metric=r.metric, value=None, threshold=r.threshold,
                comparator=r.comparator, verdict=Verdict.INCONCLUSIVE, kind=m.kind, scope=r.scope,
                rationale=f"{r.metric} is undefined{at}: {why_undefined(m)}; claim {r.comparator} {r.threshold:g}: "
                          f"INCONCLUSIVE", validity=list(o.validity), details={"undefined": why_undefined(m)},
            ))
            continue
        details = dict(worst.details)
        if r.scope.perturbation:
            sweep = [m for _, m in found]
            details = {
                "worst_amplitude": worst.amplitude,
                "breaking_amplitude": breaking_amplitude(r, sweep),
                "amplitudes": sorted(m.amplitude or 0.0 for m in sweep),
            }
        bound = "lower" if r.comparator in (">=", ">") else "upper"
        ivtext = f", {bound} bound {lo if bound == 'lower' else hi:.4g}" if worst.interval else ""
        if worst.kind != "estimate":
            ivtext = f", {KINDS[worst.kind]}"
        where = f" at amplitude {worst.amplitude:g}" if r.scope.perturbation and worst.amplitude is not None else ""
        why = f": {why_bare(worst)}" if bare(worst) else ""
        evidence.append(Evidence(
            claim_id=r.id, check=o.check, metric=r.metric, value=worst.value, threshold=r.threshold,
            comparator=r.comparator, verdict=v, interval=worst.interval, kind=worst.kind, scope=r.scope,
            rationale=f"{r.metric} = {worst.value:.4g}{ivtext}{where}{'' if worst.n is None else f' (n = {worst.n})'}; "
                      f"claim {r.comparator} {r.threshold:g}: {v.value}{why}",
            validity=list(o.validity), details=details,
        ))
    return evidence


def overall(evidence: list[Evidence], requirements: list[Requirement]) -> Verdict:
    """One FAIL of a mandatory claim fails; any other non-PASS makes the whole INCONCLUSIVE."""
    mandatory = {r.id for r in requirements if r.mandatory}
    vs = [e.verdict for e in evidence if e.claim_id in mandatory]
    if Verdict.FAIL in vs:
        return Verdict.FAIL
    if Verdict.INCONCLUSIVE in vs or not vs:
        return Verdict.INCONCLUSIVE
    return Verdict.PASS


def rank_methods(methods: list[str], measurements: list[Measurement],
                 rules: list[tuple[str, str, float, str]]) -> list[dict]:
    """Explanation methods judged like claims, on intervals: each rule (metric family, comparator, threshold,
    what it means) is a claim about `<family>:<method>`. A method is "recommended" only when every rule
    PASSES (the pessimistic end of its interval satisfies it); otherwise "warned", with the reason: a FAIL,
    or an INCONCLUSIVE the data cannot decide. Best first: recommended, then by the lower bound of faithfulness."""
    by_metric = {m.metric: m for m in measurements}
    rows = []
    for name in methods:
        reasons = []
        for family, comparator, threshold, meaning in rules:
            m = by_metric.get(f"{family}:{name}")
            if m is None:  # as for a claim: nothing measured it, so it cannot pass
                reasons.append(f"{meaning}: INCONCLUSIVE (not measured)")
                continue
            if undefined(m):  # no value to print or judge: the reason instead
                reasons.append(f"{meaning}: INCONCLUSIVE ({family} is undefined: {why_undefined(m)})")
                continue
            lo, hi = _bounds(m)
            v = verdict(m.value, comparator, threshold, lo, hi, m.kind)
            iv = f" [{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None else ""
            if v is Verdict.FAIL:
                reasons.append(f"{meaning}: FAIL ({family} {m.value:.3g}{iv}, required {comparator} {threshold:.3g})")
            elif v is Verdict.INCONCLUSIVE and bare(m):
                reasons.append(f"{meaning}: INCONCLUSIVE ({family} {m.value:.3g}: {why_bare(m)})")
            elif v is Verdict.INCONCLUSIVE:
                reasons.append(f"{meaning}: INCONCLUSIVE ({family} {m.value:.3g}{iv} straddles {threshold:.3g}; "
                               "more items would decide)")
        faith = by_metric.get(f"faithfulness:{name}")
        key = faith.interval.lower if faith and faith.interval else (faith.value if faith else None)
        rows.append({"method": name, "status": "warned" if reasons else "recommended", "reasons": reasons,
                     "_key": key})
    rows.sort(key=lambda r: (r["status"] != "recommended", -(r["_key"] if r["_key"] is not None else -math.inf)))
    for r in rows:
        del r["_key"]
    return rows

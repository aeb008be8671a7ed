"""The report says which kind of figure each claim rests on: a census, an estimate (on its interval's
pessimistic end) or a certified bound, on the claim card and in the all-claims table."""

from __future__ import annotations

import re
from html import unescape
from pathlib import Path

from test_argument import assessment

from trustcase.reports.render import render


def _row(html: str, claim: str) -> str:
    """The visible text of a claim's row in the all-claims table."""
    table = html[html.index('id="claims-table"'):]
    row = re.search(rf'<tr[^>]*><td><a href="#claim-{claim}">.*?</tr>', table, re.S).group(0)
    return unescape(re.sub(r"<[^>]+>", " ", row))


def test_each_claim_says_what_kind_of_figure_it_rests_on(tmp_path):
    a = assessment(verdicts={"M-ood": "INCONCLUSIVE", "D-cov": "INCONCLUSIVE"})
    kinds = {"D-leak": ("census", True), "F-cert": ("bound", False), "L-acc": ("estimate", True),
             "M-ood": ("estimate", False), "D-cov": ("estimate", False)}
    a = a.model_copy(update={"evidence": [
        e.model_copy(update={"kind": kinds[e.claim_id][0], "interval": e.interval if kinds[e.claim_id][1] else None,
                             "value": None if e.claim_id == "D-cov" else e.value})
        if e.claim_id in kinds else e for e in a.evidence]})
    html = Path(render(a, tmp_path, pdf=False)["html"]).read_text()
    assert "<th>Rests on</th>" in html
    assert "a census: exact over the whole split" in _row(html, "D-leak")
    assert "a certified bound" in _row(html, "F-cert")
    assert "an estimate, judged on its interval's pessimistic end" in _row(html, "L-acc")
    assert "an estimate without an interval (it cannot pass)" in _row(html, "M-ood")
    assert "no figure: it is undefined" in _row(html, "D-cov")
    assert "not recorded" in _row(html, "D-read")  # a record written before kinds existed
    text = " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())
    assert "Rests on: a census: exact over the whole split." in text  # on the claim card
    assert "PASS: the value satisfies at most 0 (a census, exact over the whole split)." in text

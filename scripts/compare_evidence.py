"""Compare the evidence of two assessments (e.g. the demo before and after a refactoring):

    .venv/bin/python scripts/compare_evidence.py OLD_OUT_DIR NEW_OUT_DIR

Claims (verdict and value) and every measurement (check, metric, scope, amplitude -> value): identical,
different, or present on one side only.
"""

import json
import math
import sys
from collections import Counter
from pathlib import Path


def same(x, y) -> bool:
    if x is None or y is None:
        return x is None and y is None
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return x == y or abs(x - y) <= 1e-9 * max(1.0, abs(x))


def measurements(a: dict) -> dict:
    return {(m["check"], m["metric"], json.dumps(m.get("scope"), sort_keys=True), m.get("amplitude")): m["value"]
            for o in a["outcomes"] for m in o["measurements"]}


def main(old: str, new: str) -> None:
    a, b = (json.loads((Path(d) / "assessment.json").read_text()) for d in (old, new))
    ca, cb = ({e["claim_id"]: e for e in x["evidence"] if e.get("claim_id")} for x in (a, b))
    identical = 0
    for cid in sorted(set(ca) | set(cb)):
        ea, eb = ca.get(cid), cb.get(cid)
        if ea is None or eb is None:
            print(f"claim {cid}: only {'before' if ea else 'after'}")
        elif ea["verdict"] == eb["verdict"] and same(ea["value"], eb["value"]):
            identical += 1
        else:
            print(f"claim {cid}: {ea['verdict']} {ea['value']} -> {eb['verdict']} {eb['value']}")
    print(f"{identical} claims identical")
    ma, mb = measurements(a), measurements(b)
    common = set(ma) & set(mb)
    diff = sorted((k for k in common if not same(ma[k], mb[k])), key=str)
    print(f"measurements: {len(ma)} before, {len(mb)} after; {len(common) - len(diff)} identical, {len(diff)} differ")
    for k in diff[:25]:
        print("  ", k[0], k[1], k[2][:60], k[3], ma[k], "->", mb[k])
    for label, keys in (("only before", set(ma) - set(mb)), ("only after", set(mb) - set(ma))):
        print(f"{label}:", Counter((k[0], k[1].split(":")[0]) for k in keys).most_common(15))


if __name__ == "__main__":
    main(*sys.argv[1:3])

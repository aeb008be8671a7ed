"""Data evidence: what each data check costs next to one forward pass over the same items, and its validation on
the real ELPV labels.

    .venv/bin/python bench/bench_data.py [--model PATH] [--quick]

1. label_issues: the check's time / one forward pass over the same items (validation and test splits, both
   reading the images); the enrichment of suspected cells among the cells an expert rated uncertain (defect
   probability 0.33 or 0.67: the 0.5 threshold made a hard label of a hesitant rating) against the certain ones
   (risk ratio, 95% Katz interval; target >= 2x); precision and recall on 5% planted flips of certain labels.
Without --model, the bundled solar CNN when its file exists, else a pooled CNN trained here for 10 epochs
(`train.py --arch pooled --ibp-eps 0`), kept in .trustcase/bench/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from trustcase.checks import Context
from trustcase.checks.label_issues import LabelIssues
from trustcase.data import labels as L
from trustcase.data.streaming import DataSource
from trustcase.models.loading import load_classifier
from trustcase.schemas import load_use_case

ROOT = Path(__file__).resolve().parent.parent
USE_CASE = ROOT / "use_cases" / "solar_cells" / "use_case.yaml"
HELD_OUT = ["validation", "test"]
UNCERTAIN = {"0.33", "0.67"}


def model_path(given: Path | None, uc) -> Path:
    if given:
        return given
    if Path(uc.model.path).is_file():
        return Path(uc.model.path)
    out = ROOT / ".trustcase" / "bench" / "solar_pooled_10.pt"
    if not out.is_file():
        spec = importlib.util.spec_from_file_location("solar_train", USE_CASE.parent / "train.py")
        train = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train)
        print(f"training {out.name} (10 epochs, pooled CNN) ...", flush=True)
        train.train(out, epochs=10, arch="pooled", ibp_eps=0.0, log=lambda *_: None)
    return out


def forward_pass(uc, clf, roles) -> tuple[float, dict]:
    """One forward pass over the items (reading included), and what the validations need of it."""
    t = time.perf_counter()
    y, probs, marks = [], [], []
    for role in roles:
        for b in DataSource(uc.data, model=uc.model).stream(role).batches():
            probs.append(L.softmax(clf.logits(b.images)))
            y.append(b.labels)
            marks += b.meta["defect_probability"]
    return time.perf_counter() - t, {"labels": np.concatenate(y), "probs": np.concatenate(probs),
                                     "uncertain": np.array([m in UNCERTAIN for m in marks])}


def label_issues(uc, clf, seeds) -> dict:
    fwd, got = forward_pass(uc, clf, HELD_OUT)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(uc, clf, DataSource(uc.data, model=uc.model), seed=0, workdir=Path(tmp) / "label_issues")
        check = LabelIssues(LabelIssues.Params(splits=HELD_OUT))
        t = time.perf_counter()
        out = check(ctx)
        cost = time.perf_counter() - t
    runs = [L.validate(got["labels"], got["probs"], got["uncertain"], 0.05, s, 0.95) for s in seeds]
    first = runs[0]
    print(f"label_issues: {cost:.2f} s, one forward pass {fwd:.2f} s over {first['items']} items: ratio "
          f"{cost / fwd:.2f}")
    print(f"  suspected {first['suspected']} of {first['items']} held-out cells; among the {first['uncertain']} "
          f"uncertain ratings {first['suspected_uncertain']}, among the certain {first['suspected_certain']}")
    print(f"  enrichment among uncertain ratings: {first['enrichment']:.2f}x "
          f"(95% interval {first['enrichment_interval'][0]:.2f}-{first['enrichment_interval'][1]:.2f}; target >= 2x)")
    for s, r in zip(seeds, runs):
        prec = "n/a" if r["precision"] is None else \
            f"{r['precision']:.2f} ({r['precision_interval'][0]:.2f}-{r['precision_interval'][1]:.2f})"
        print(f"  planted flips (seed {s}): {r['planted_found']} of {r['planted']} found, recall {r['recall']:.2f} "
              f"({r['recall_interval'][0]:.2f}-{r['recall_interval'][1]:.2f}), precision {prec}")
    return {"seconds": cost, "forward_seconds": fwd, "ratio": cost / fwd, "validation": runs,
            "suspected_labels": [m.model_dump(include={"metric", "scope", "value", "interval", "n"})
                                 for m in out.measurements if m.metric == "suspected_labels"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="one seed of planted flips")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    uc = load_use_case(USE_CASE)
    path = model_path(args.model, uc)
    uc = uc.model_copy(update={"model": uc.model.model_copy(update={"path": path})})
    clf = load_classifier(uc.model)
    print(f"model {path}")
    figures = {"label_issues": label_issues(uc, clf, [0] if args.quick else [0, 1, 2])}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()

"""The `formal_properties` check: VNN-LIB safety properties proved, falsified or left unknown (science in
`certification.properties`).

Summary keys: properties (name -> verdict, seconds, boxes, counterexample, reason), timeout, outputs.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import field_validator

from trustcase.certification.bab import INPUT_SPLIT_MAX, MARGIN_RULE
from trustcase.certification.properties import check_property, expand
from trustcase.certification.vnnlib import read_vnnlib
from trustcase.checks import Check, Context, Params, Produces
from trustcase.measurement import bound, census
from trustcase.schemas import CheckOutcome, Scope, Stage


class FormalParams(Params):
    properties: list[str]  # VNN-LIB files; ${TRUSTCASE_ACASXU} and other environment variables expanded
    timeout: float = 60.0  # seconds per property
    outputs: Literal["scores", "negated_scores"] = "scores"  # negated: the model outputs -Y (argmax = argmin Y)
    split: str = "test"  # the scope the measurements are reported on

    @field_validator("properties")
    @classmethod
    def _exist(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one VNN-LIB property file")
        for p in v:
            path = expand(p)
            if not path.is_file():
                hint = " (set TRUSTCASE_ACASXU to the ACAS Xu data folder)" if "TRUSTCASE_ACASXU" in p else ""
                raise ValueError(f"property file not found: {path}{hint}")
            read_vnnlib(path)  # unsupported constructs are reported before any work starts
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("timeout must be > 0 seconds")
        return v


class FormalProperties(Check):
    name = "formal_properties"
    Params = FormalParams
    stage = Stage.FORMAL

    @classmethod
    def produces(cls, params, use_case):
        """On the params' split: one `property_holds.<file stem>` per property (1 holds, 0 violated, no value when
        unknown; a claim: `metric: property_holds.prop_1, comparator: ">=", threshold: 1`), `properties_holding`
        (the share proved) and `properties_violated` (a count)."""
        return [Produces(m, params.split) for m in ("property_holds.*", "properties_holding", "properties_violated")]

    def shards(self) -> list[Check]:
        p: FormalParams = self.params
        return [FormalProperties(p.model_copy(update={"properties": [f]})) for f in p.properties]

    def run(self, ctx: Context) -> CheckOutcome:
        p: FormalParams = self.params
        sign = -1.0 if p.outputs == "negated_scores" else 1.0
        module = ctx.model.module if ctx.model.module is not None else ctx.model.forward
        n_out = ctx.model.n_classes
        shape = ctx.model.spec.input_shape
        ms, rows, limits = [], {}, []
        scope = Scope(split=p.split)
        for spec in p.properties:
            path = expand(spec)
            prop = read_vnnlib(path)
            if prop.n_inputs != int(np.prod(shape)) or prop.n_outputs != n_out:
                raise ValueError(f"{path.name} has {prop.n_inputs} inputs and {prop.n_outputs} outputs; the model "
                                 f"takes {shape} and gives {n_out}")
            r = check_property(module, prop, p.timeout, ctx.seed, sign, tuple(shape) if len(shape) > 1 else None)
            name = path.stem
            rows[name] = r
            value = {"holds": 1.0, "violated": 0.0}.get(r["verdict"], float("nan"))
            ms.append(bound(check=self.name, metric=f"property_holds.{name}", value=value, scope=scope, n=1,
                                  details={k: r[k] for k in ("verdict", "seconds", "boxes", "method",
                                                             "counterexample", "reason")}))
            if r["verdict"] == "unknown":
                limits.append(f"{name}: unknown after {p.timeout:g} s ({r['reason']})")
        verdicts = [r["verdict"] for r in rows.values()]
        ms += [
            census(check=self.name, metric="properties_holding", value=verdicts.count("holds") / len(verdicts),
                        n=len(verdicts), scope=scope),
            census(check=self.name, metric="properties_violated", value=float(verdicts.count("violated")),
                        n=len(verdicts), scope=scope),
        ]
        return CheckOutcome(
            check=self.name, measurements=ms, limitations=limits,
            caveat="A proof over the whole input region the property states.",
            summary={"properties": rows, "timeout": p.timeout, "outputs": p.outputs},
            validity=[
                "VNN-LIB properties on the model's normalised inputs and outputs"
                + (" (the model outputs -Y: constraints are applied to its negated outputs)" if sign < 0 else ""),
                "holds: proved for every input of the region on the model's layer graph by CROWN / alpha-CROWN "
                f"linear relaxations with branch and bound (input splitting for at most {INPUT_SPLIT_MAX} inputs, "
                f"else ReLU splitting with beta-CROWN), float64 arithmetic: {MARGIN_RULE}",
                "violated: the counterexample was re-checked by a plain float32 forward pass of the model",
                f"unknown: no proof and no counterexample within {p.timeout:g} s per property",
            ],
        )


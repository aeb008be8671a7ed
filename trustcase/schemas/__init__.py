"""Contracts: the use case, its requirements, and the evidence records every check emits."""

from trustcase.schemas.evidence import (
    Artefact,
    Assessment,
    CheckOutcome,
    ClaimChange,
    ConfusionMatrix,
    Curve,
    CurveOverlay,
    Evidence,
    Finding,
    Histogram,
    Histograms,
    Interval,
    Measurement,
    MethodStanding,
    Provenance,
    ReliabilityDiagram,
    Series,
    Stage,
    Topic,
    Verdict,
    compare_claims,
)
from trustcase.schemas.loading import Problem, UseCaseError, load_use_case, parse_use_case
from trustcase.schemas.training import ExtraItem, TrainingRequest, TrainingResult
from trustcase.schemas.use_case import (
    ODD,
    AssessmentPlan,
    CheckSpec,
    Confidentiality,
    Criticality,
    DataSpec,
    Descriptor,
    ModelSpec,
    PerturbationScope,
    Requirement,
    Scope,
    TrainingSpec,
    UseCase,
)

__all__ = [
    "ODD", "Artefact", "Assessment", "AssessmentPlan", "CheckOutcome", "CheckSpec", "ClaimChange", "Confidentiality",
    "Curve", "Series", "ConfusionMatrix", "CurveOverlay", "Finding", "Histogram", "Histograms", "ReliabilityDiagram",
    "Topic",
    "Criticality", "DataSpec", "Descriptor", "Evidence", "Interval", "Measurement", "MethodStanding", "ModelSpec",
    "PerturbationScope", "Problem", "Provenance", "Requirement", "Scope", "Stage", "TrainingSpec", "UseCase",
    "UseCaseError", "ExtraItem", "TrainingRequest", "TrainingResult",
    "Verdict", "compare_claims", "load_use_case", "parse_use_case",
]

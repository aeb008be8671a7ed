"""The training contract: how trustcase asks a use case's own training code for a new model version.

A use case names a function in `training.entry`; `trustcase improve` calls it with one `TrainingRequest` and
expects one `TrainingResult`:

    def fit(request: TrainingRequest) -> TrainingResult: ...

The function trains from `request.init` (the parent version's model file, same format as `model.path`) or
from scratch when it is None, on the data roles `request.roles` plus the `request.extra` items (items of
other roles, each with the label to learn and a number of copies: HUDD's bootstrap-balanced unsafe set),
with the augmentation asked for (`lipschitz`: the script's 1-Lipschitz architecture, from scratch),
deterministically for `request.seed`, and writes the model to `request.out`. It returns the file and a
training log (parameters and validation figures, JSON-ready).

Cross-validation (the `label_issues` check's out-of-fold probabilities) asks for a model trained without the
items at `request.held_out` (positions in a role's split); the function says how many it left out in
`TrainingResult.held_out`, so a function that does not know the field (0) is not trusted with a fold. A
function that cannot leave items out raises `trustcase.errors.Unsupported` (the one fallback: the train split
is then not screened, and says why); anything else it raises is an error, not a fallback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ExtraItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str = Field(description="the data role the item is read from, e.g. the pool")
    index: int = Field(ge=0, description="its position in that split")
    label: int | None = Field(None, ge=0, description="the class to learn; None: the item's own annotation in its "
                              "split (a detector's boxes, a segmenter's mask)")
    copies: int = Field(1, ge=1, description="how many times it counts (bootstrap balance)")


class TrainingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    out: Path
    use_case: Path = Field(description="the use-case file the model serves (its input contract)")
    seed: int = 0
    init: Path | None = Field(None, description="weights to start from; None trains from scratch")
    roles: list[str] = ["train"]
    extra: list[ExtraItem] = []
    augment: Literal["none", "noise", "adversarial", "lipschitz"] = "none"
    noise_sigma: float = Field(0.0, ge=0, description="Gaussian noise, standard deviation in pixel units")
    epsilon: float = Field(0.0, ge=0, description="L-inf radius of PGD adversarial training, pixel units")
    l2_radius: float = Field(0.0, ge=0, description="lipschitz: a 1-Lipschitz architecture trained from scratch "
                             "with Lipschitz margins at this L2 radius, pixel units")
    epochs: int | None = Field(None, ge=1, description="None: the script's own default")
    held_out: dict[str, list[int]] = Field({}, description="role -> positions in its split left out of training "
                                                           "(a cross-validation fold)")
    params: dict[str, Any] = {}


class TrainingResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Path
    log: dict[str, Any] = {}
    held_out: int = Field(0, ge=0, description="how many items of request.held_out the training left out")

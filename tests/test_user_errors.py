"""One user-error base class, one 'module:attr' resolver, one validation message (issue 23)."""

from __future__ import annotations

import logging
import textwrap

import pytest
import torch
from pydantic import BaseModel, Field, ValidationError

from trustcase.errors import CheckError, Unsupported, UserError, validation_message, validation_problems
from trustcase.flows.logs import OneLine
from trustcase.registry import resolve

USER_FACING = [
    ("trustcase.schemas.loading", "UseCaseError"), ("trustcase.data.streaming", "DataError"),
    ("trustcase.models.classifier", "ModelError"), ("trustcase.registry", "RegistryError"),
    ("trustcase.robustness.perturbations", "PerturbationError"), ("trustcase.certification.vnnlib", "VnnlibError"),
    ("trustcase.certification.nnet", "NetworkFormatError"), ("trustcase.certification.graph", "GraphError"),
    ("trustcase.certification.lipschitz", "LipschitzError"),
    ("trustcase.odd.specification", "MonitorError"), ("trustcase.flows.watch", "WatchError"),
    ("trustcase.flows.improve", "ImproveError"), ("trustcase.flows.assess", "OutputFolderError"),
    ("trustcase.flows.rerender", "RunNotFound"), ("trustcase.flows.runners", "RunnerError"),
    ("trustcase.flows.tracking", "TrackingError"), ("trustcase.reports.pack", "PackError"),
    ("trustcase.explore.store", "StoreError"), ("trustcase.explore.lab", "LabError"),
    ("trustcase.reports.compliance", "CatalogueError"), ("trustcase.flows.rerender", "RecordMismatch"),
]


@pytest.mark.parametrize("module,name", USER_FACING)
def test_every_user_facing_error_is_a_user_error(module, name):
    import importlib

    assert issubclass(getattr(importlib.import_module(module), name), UserError)


def test_a_decline_is_not_a_user_error():
    assert issubclass(CheckError, UserError) and not issubclass(Unsupported, UserError)


@pytest.fixture
def partner(tmp_path):
    files = {
        "fine.py": "def build():\n    return 1\n",
        "boom.py": "x = 1\nraise RuntimeError('licence server down')\n",
        "needs.py": "import not_an_installed_package  # noqa\n",
        "typo.py": "value = object().nope\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


class PartnerError(UserError):
    pass


@pytest.mark.parametrize("ref,fragment", [
    ("fine:build", None),
    ("nowhere_at_all:build", "model factory: cannot import module 'nowhere_at_all' of 'nowhere_at_all:build'"),
    ("fine:nope", "model factory: module 'fine' has no attribute 'nope' (from 'fine:nope')"),
    ("boom:build", "importing module 'boom' of 'boom:build' raised RuntimeError: licence server down ({d}/boom.py:2)"),
    ("needs:build", "raised ModuleNotFoundError: No module named 'not_an_installed_package' ({d}/needs.py:1)"),
    ("typo:build", "raised AttributeError: 'object' object has no attribute 'nope' ({d}/typo.py:1)"),
    ("fine", "model factory: 'fine' is not a 'module:attribute' reference"),
])
def test_the_resolver_says_which_of_three_things_went_wrong_and_where(partner, monkeypatch, ref, fragment):
    monkeypatch.syspath_prepend(str(partner))
    if fragment is None:
        assert resolve(ref, partner, "model factory", PartnerError)() == 1
        return
    with pytest.raises(PartnerError) as e:  # the caller's kind of user error
        resolve(ref, partner, "model factory", PartnerError)
    assert fragment.format(d=partner) in str(e.value)


def test_a_broken_model_factory_is_a_model_error_not_a_data_error(partner, monkeypatch):
    from trustcase.models.classifier import ModelError
    from trustcase.models.loading import load_classifier
    from trustcase.schemas import ModelSpec

    monkeypatch.syspath_prepend(str(partner))
    torch.save(torch.nn.Linear(2, 2).state_dict(), partner / "w.pt")
    spec = ModelSpec(format="state_dict", path=partner / "w.pt", factory="boom:build", input_shape=[2],
                     class_names=["ok", "defect"], critical_class="defect")
    with pytest.raises(ModelError, match="model factory: importing module 'boom' of 'boom:build' raised"):
        load_classifier(spec)


class Options(BaseModel):
    sigma: float = Field(gt=0)
    steps: int


def test_a_validation_error_is_one_line_or_located_problems():
    with pytest.raises(ValidationError) as e:
        Options(sigma=-1)
    assert validation_message(e.value) == "sigma: Input should be greater than 0; steps: Field required"
    assert validation_message(e.value, limit=1) == "sigma: Input should be greater than 0 (and 1 more)"
    assert validation_problems(e.value) == [(("sigma",), "Input should be greater than 0"),
                                            (("steps",), "Field required")]
    with pytest.raises(ValidationError) as whole:
        Options.model_validate(3)
    assert validation_message(whole.value, "options").startswith("options: ")


def test_prefect_logs_a_partners_user_error_in_one_line(tmp_path, monkeypatch):
    """A partner's own UserError subclass is a user error like the built-in ones: one line, and its second
    report ('Finished in state Failed') is not repeated; an internal error keeps its traceback in the log file."""
    monkeypatch.chdir(tmp_path)
    f = OneLine()

    def record(msg, exc=None):
        info = (type(exc), exc, None) if exc else None
        return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, msg, (), info)

    r = record("Task run failed", PartnerError("layer 'x' has no weights"))
    assert f.filter(r) and r.getMessage() == "PartnerError: layer 'x' has no weights"
    assert not f.filter(record("Finished in state Failed('Task run encountered an exception PartnerError: x')"))
    assert f.filter(record("Finished in state Failed('Task run encountered an exception KeyError: x')"))
    r = record("Task run failed", KeyError("x"))
    assert f.filter(r) and r.getMessage().startswith("internal error: KeyError: 'x' (traceback in")

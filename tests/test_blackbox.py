"""Black-box components: the Confiance.ai welding-challenge interface and a plain `predict` object.

A synthetic component with closed-form answers checks abstentions, OOD monitoring and the deletion
scores exactly; the tiny CNN wrapped in the challenge interface is assessed through the real flow,
and gives the same performance evidence as the white box, with the gradient check skipped."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_use_case, write_yaml

from trustcase.checks import Check, Context, Params
from trustcase.checks.component_outputs import ComponentOutputs, ComponentParams
from trustcase.data.streaming import DataSource
from trustcase.models.blackbox import BlackBox, validate_answer
from trustcase.models.classifier import ModelError
from trustcase.models.loading import load_classifier
from trustcase.performance import Tally
from trustcase.schemas import CheckOutcome, UseCase, load_use_case

_ids = itertools.count()

LOADER = """
import numpy as np
from trustcase.data.streaming import Item

class Split:
    # item i: left half at L = 12 i + 6, right half at 255 - L; label 'bad' from i = 10
    def __len__(self):
        return 20
    def __getitem__(self, i):
        img = np.empty((8, 8), np.float32)
        img[:, :4], img[:, 4:] = 12 * i + 6, 255 - (12 * i + 6)
        return Item(image=img, label=int(i >= 10), id=f"s{i}")

def load_split(split, **_):
    return Split()
"""

COMPONENT = """
import numpy as np

class Component:
    # q = P(bad) = mean of the left half / 255; UNKNOWN when 0.4 <= q <= 0.6;
    # OOD score: max(L / 200, std of the left half / 20); explanation: the left half
    def load_model(self, config_file=None):
        self.loaded = config_file
    def predict(self, input_images, images_meta_informations):
        assert len(input_images) == len(images_meta_informations)
        left = [np.asarray(im, np.float64)[:, :4] for im in input_images]
        q = [float(l.mean()) / 255 for l in left]
        return {
            "predictions": ["UNKNOWN" if 0.4 <= p <= 0.6 else ("bad" if p > 0.6 else "ok") for p in q],
            "probabilities": [[1 - p, p] for p in q],
            "OOD_scores": [max(l.mean() / 200, l.std() / 20) for l in left],
            "explainability": [np.concatenate([np.ones((8, 4)), np.zeros((8, 4))], axis=1) for _ in q],
        }
"""


def _package(folder: Path, name: str, text: str) -> str:
    """Write a module under a fresh name (modules are cached by name across tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    module = f"{name}_{next(_ids)}"
    (folder / f"{module}.py").write_text(textwrap.dedent(text))
    return module


def synthetic_case(tmp_path: Path, component: str = COMPONENT, **model) -> UseCase:
    loader = _package(tmp_path / "data", "synth_loader", LOADER)
    entry = _package(tmp_path / "component", "synth_component", component)
    raw = {
        "id": "welding", "title": "t", "owner": "o", "criticality": "high", "intended_function": "f",
        "confidentiality": "confidential",
        "model": {"format": "challenge", "path": str(tmp_path / "component"), "entry": f"{entry}:Component",
                  "input_shape": [1, 8, 8], "class_names": ["ok", "bad"], "critical_class": "bad", **model},
        "data": {"loader": f"{loader}:load_split", "path": str(tmp_path / "data"), "splits": {"test": "test"}},
        "requirements": [], "plan": {"checks": [{"check": "component_outputs"}]},
    }
    return load_use_case(write_yaml(tmp_path / "use_case.yaml", raw))


def _value(outcome: CheckOutcome, metric: str, perturbation: str | None = None) -> float:
    (m,) = [m for m in outcome.measurements if m.metric == metric
            and (m.scope.perturbation.name if m.scope.perturbation else None) == perturbation]
    return m.value


def test_challenge_component_abstentions_ood_and_explanations_in_closed_form(tmp_path):
    uc = synthetic_case(tmp_path)
    model = load_classifier(uc.model)
    assert isinstance(model, BlackBox) and not model.differentiable and model.component.loaded is None
    check = ComponentOutputs(ComponentParams(ood_perturbations={"gaussian_noise": 0.2}))
    ctx = Context(use_case=uc, model=model, data=DataSource(uc.data, 0), seed=0, workdir=tmp_path / "w")
    out = check(ctx)
    # UNKNOWN for L in [102, 153]: items 8, 9 (ok) and 10, 11, 12 (bad); every other answer is right
    assert _value(out, "abstention_rate") == 5 / 20
    assert _value(out, "abstention_rate:ok") == 2 / 10 and _value(out, "abstention_rate:bad") == 3 / 10
    assert _value(out, "answered_accuracy") == 1.0
    assert _value(out, "undetected_rate:bad") == 0.0
    # the component's OOD score as a monitor: L >= 200 on clean data (items 17-19) are false alarms
    assert _value(out, "ood_alarm_rate") == 3 / 20
    assert _value(out, "ood_detection_rate", "gaussian_noise") == 1.0
    assert _value(out, "ood_auroc", "gaussian_noise") == 1.0  # every noisy item scores above every clean one
    # deleting the k top pixels (all in the left half) moves L towards 127.5 by k/32 of the gap
    L = 12 * np.arange(20) + 6
    ks = np.array([3, 6, 13, 19])  # round(f * 64) for the default fractions
    expected = ks / 32 * np.abs(L - 127.5).mean() / 255
    np.testing.assert_allclose(out.summary["deletion"]["top"], expected, rtol=1e-9)
    assert all(r < t for r, t in zip(out.summary["deletion"]["random"], expected, strict=True))
    assert _value(out, "explanation_deletion_gain") > 0
    assert out.curves[0].id == "component_outputs/deletion"
    assert out.summary["decisions_differ_from_argmax"] == 0 and out.artefacts == []
    # the probabilities, as logits, give the component's argmax to every other check
    batch = next(ctx.batches())
    np.testing.assert_allclose(np.exp(model.logits(batch.images)).sum(axis=1), 1.0, rtol=1e-6)


BAD_ANSWERS = {
    "missing": ({"predictions": ["ok"]}, r"missing \['probabilities'\]"),
    "unknown key": ({"predictions": ["ok"], "probabilities": [[1, 0]], "OOD_score": [0]}, r"unknown \['OOD_score'\]"),
    "length": ({"predictions": ["ok", "ok"], "probabilities": [[1, 0]]}, "'predictions' has 2 entries for a batch"),
    "sum": ({"predictions": ["ok"], "probabilities": [[0.7, 0.7]]}, "do not sum to 1"),
    "range": ({"predictions": ["ok"], "probabilities": [[1.5, -0.5]]}, r"outside \[0, 1\]"),
    "label": ({"predictions": ["weld"], "probabilities": [[1, 0]]}, r"\['weld'\] are not among"),
    "classes": ({"predictions": ["ok"], "probabilities": [[1.0]]}, r"shape \(1, 1\), expected \(1, 2\)"),
    "map": ({"predictions": ["ok"], "probabilities": [[1, 0]], "explainability": [np.full((8, 8), 2.0)]},
            r"map 0 has values outside \[0, 1\]"),
    "map shape": ({"predictions": ["ok"], "probabilities": [[1, 0]], "explainability": [np.zeros((4, 4))]},
                  r"map 0 has shape \(4, 4\), expected \(8, 8\)"),
    "not a dict": ([[1, 0]], "expected a dict"),
}


@pytest.mark.parametrize("case", sorted(BAD_ANSWERS))
def test_wrong_answers_are_named(case):
    answer, message = BAD_ANSWERS[case]
    with pytest.raises(ModelError, match=message):
        validate_answer(answer, 1, ["ok", "bad"], (8, 8), ["item-7"])


def test_a_bad_component_fails_when_loaded_not_mid_assessment(tmp_path):
    bad = COMPONENT.replace('"probabilities": [[1 - p, p] for p in q]', '"probabilities": [[p, 1.3 - p] for p in q]')
    with pytest.raises(ModelError, match="do not sum to 1"):
        load_classifier(synthetic_case(tmp_path / "a", bad).model)
    no_load = COMPONENT.replace("def load_model(self, config_file=None):", "def setup(self, config_file=None):")
    with pytest.raises(ModelError, match="no load_model"):
        load_classifier(synthetic_case(tmp_path / "b", no_load).model)
    with pytest.raises(ModelError, match="model.config_file not found"):
        load_classifier(synthetic_case(tmp_path / "c", config_file="settings.yaml").model)
    (tmp_path / "d" / "component").mkdir(parents=True)
    (tmp_path / "d" / "component" / "settings.yaml").write_text("threshold: 0.5\n")
    model = load_classifier(synthetic_case(tmp_path / "d", config_file="settings.yaml").model)
    assert model.component.loaded == str(tmp_path / "d" / "component" / "settings.yaml")


def test_python_predict_object_and_uint8_pixels(tmp_path):
    plain = """
    import numpy as np

    class Component:
        def predict(self, images):
            self.dtype = images.dtype
            q = images[:, :, :4, 0].mean(axis=(1, 2)) / 255
            return np.stack([1 - q, q], axis=1)
    """
    uc = synthetic_case(tmp_path, plain, format="python", input_dtype="uint8")
    model = load_classifier(uc.model)
    batch = next(DataSource(uc.data, 0).stream("test").batches())
    probs = np.exp(model.logits(batch.images))
    assert model.component.dtype == np.uint8
    np.testing.assert_allclose(probs[:, 1], (12 * np.arange(20) + 6) / 255, rtol=1e-5)
    with pytest.raises(Exception, match="challenge interface"):
        ComponentOutputs(ComponentParams())(Context(use_case=uc, model=model, data=DataSource(uc.data, 0), seed=0,
                                                    workdir=tmp_path / "w"))


# --- the tiny CNN in the challenge interface, through the real flow -------------------------------

WRAPPED = """
import numpy as np
import torch

class TinyWeldingAI:
    def load_model(self, config_file=None):
        from pathlib import Path
        self.net = torch.jit.load(str(Path(__file__).parent / "tiny.pt")).eval()
    def predict(self, input_images, images_meta_informations):
        x = (torch.as_tensor(np.stack(input_images)).float()[:, None] / 255 - 0.60) / 0.16
        with torch.inference_mode():
            p = torch.softmax(self.net(x).double(), dim=1).numpy()
        names = np.array(["functional", "defective"])
        decisions = [("UNKNOWN" if row.max() < 0.55 else str(names[row.argmax()])) for row in p]
        return {"predictions": decisions, "probabilities": p.tolist(),
                "OOD_scores": [float(abs(im.mean() - 150) / 60) for im in input_images],
                "explainability": [np.abs(im - im.mean()) / max(float(np.abs(im - im.mean()).max()), 1e-9)
                                   for im in input_images]}
"""


class NeedsGradients(Check):
    name = "needs_gradients"
    Params = Params
    needs_gradients = True

    def run(self, ctx):  # pragma: no cover - never reached with a black box
        raise AssertionError("a black box has no gradients")


@pytest.mark.slow
def test_challenge_component_assessed_through_the_flow(prefect_harness, tmp_path, tiny_model, tracking_uri):
    from trustcase.flows.runners import run

    folder = tmp_path / "component"
    entry = _package(folder, "tiny_welding_ai", WRAPPED)
    (folder / "tiny.pt").write_bytes(tiny_model.read_bytes())
    raw = tiny_use_case(tmp_path, folder)
    raw["model"].update(format="challenge", entry=f"{entry}:TinyWeldingAI")
    raw["plan"]["checks"] = [
        {"check": "data_quality"}, {"check": "performance"},
        {"check": "perturbation_sweep", "params": {"perturbations": {"gaussian_blur": [1.0]}}},
        {"check": "component_outputs", "params": {"ood_perturbations": {"gaussian_noise": 0.3}, "explain_items": 8}},
        {"check": "test_blackbox:NeedsGradients"},
    ]
    case = write_yaml(tmp_path / "use_case.yaml", raw)
    result = run(str(case), str(tmp_path / "out"), tracking_uri=tracking_uri)
    assert result.complete, result.errors
    from trustcase.schemas import Assessment

    a = Assessment.model_validate_json((tmp_path / "out" / "assessment.json").read_text())
    by = {o.check: o for o in a.outcomes}
    assert "needs gradients" in by["needs_gradients"].skipped
    assert by["needs_gradients"].measurements == []
    comp = by["component_outputs"]
    assert {m.metric for m in comp.measurements} >= {"abstention_rate", "ood_alarm_rate", "ood_detection_rate",
                                                     "explanation_deletion_gain"}
    # prediction-only evidence of the black box equals the white box's
    white = load_use_case(write_yaml(tmp_path / "white.yaml", tiny_use_case(tmp_path, tiny_model)))
    tally, clf = Tally(white), load_classifier(white.model)
    for b in DataSource(white.data, 0).stream("test").batches():
        tally.update(clf.logits(b.images), b.labels, b.meta)
    expected = {(m.metric, tuple(sorted(m.scope.subgroup.items()))): m.value
                for m in tally.compute("performance", "test", 0.95) if m.metric != "ece"}
    got = {(m.metric, tuple(sorted(m.scope.subgroup.items()))): m.value for m in by["performance"].measurements
           if (m.metric, tuple(sorted(m.scope.subgroup.items()))) in expected}
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, nan_ok=True), k

"""The conformance suite (trustcase.testing) over every registered check, and the suite itself catching a
check that breaks each of its promises."""

from __future__ import annotations

import numpy as np
import pytest

from trustcase.checks import REGISTRY, Check, Params, Produces
from trustcase.schemas import CheckOutcome, Measurement, Scope
from trustcase.testing import ConformanceError, black_box_of, check_conformance, synthetic_case

VNNLIB = """; the synthetic MLP on a small box of its 4 features: class 0 stays above class 1 (or a counterexample)
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const X_2 Real)
(declare-const X_3 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (>= X_0 0.0))
(assert (<= X_0 0.1))
(assert (>= X_1 0.0))
(assert (<= X_1 0.1))
(assert (>= X_2 0.4))
(assert (<= X_2 0.6))
(assert (>= X_3 0.4))
(assert (<= X_3 0.6))
(assert (<= Y_0 Y_1))
"""

# small parameters per check, on the case it is made for ("image", "tabular" or "challenge")
CASES = {
    "adversarial": ("image", {"attacks": ["fgsm_linf", "pgd_l2"], "steps": 2, "restarts": 1, "max_items": 6,
                              "distance": False}),
    "component_outputs": ("challenge", {"ood_perturbations": {"brightness": 0.6}, "explain_items": 4}),
    "data_quality": ("image", {}),
    "explainability": ("image", {"methods": ["saliency", "smoothgrad"], "options": {"smoothgrad": {"samples": 4}},
                                 "items": 6, "sensitivity_items": 2, "sensitivity_samples": 2,
                                 "infidelity_samples": 2, "mufidelity_samples": 4, "gallery": 1}),
    "feature_drift": ("image", {"permutations": 49}),
    "feature_leakage": ("image", {}),
    "formal_properties": ("tabular", {"timeout": 0.5}),
    "global_explanations": ("image", {"items": 20, "randoms": 3, "steps": 8, "channels": 2, "top_images": 2,
                                      "paths": 1, "representation": False, "batch_size": 8}),
    "label_issues": ("image", {"thumbnails": 4}),
    "lipschitz": ("image", {"ascent_points": 4, "ascent_steps": 3}),
    "local_robustness": ("tabular", {"radii": [0.01, 0.05], "max_items": 4, "timeout": 0.5}),
    "odd_monitor": ("image", {"perturbations": {"brightness": [0.4]}}),
    "performance": ("image", {}),
    "perturbation_sweep": ("image", {"perturbations": {"gaussian_blur": [1.0], "gaussian_noise": [0.05]}}),
    "poisoning_screen": ("image", {}),
    "randomized_smoothing": ("image", {"n0": 8, "n": 32, "max_items": 8}),
    "root_causes": ("image", {"k_max": 4, "representatives": 2}),
}
# a property a check does not keep yet, with why (strict: the test says when it is fixed)
KNOWN: dict[tuple[str, str], str] = {}


def test_every_registered_check_has_a_conformance_case():
    assert set(CASES) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(CASES))
def test_conformance(name, tmp_path):
    kind, params = CASES[name]
    if name == "formal_properties":
        (tmp_path / "p.vnnlib").write_text(VNNLIB)
        params = {**params, "properties": [str(tmp_path / "p.vnnlib")]}
    uc, model = synthetic_case([{"check": name, "params": params}], tabular=kind == "tabular")
    if kind == "challenge":
        model = black_box_of(model, challenge=True)
    known = {prop for (check, prop) in KNOWN if check == name}
    report = check_conformance(name, params, use_case=uc, model=model, workdir=tmp_path / "runs",
                               properties=tuple({"deterministic", "batching", "shards", "streams", "records",
                                                 "produces", "black_box", "tabular", "empty"} - known))
    assert all(v.startswith(("ok", "skipped")) for v in report.values()), report
    for prop in known:
        with pytest.raises(ConformanceError, match=prop):
            check_conformance(name, params, use_case=uc, model=model, workdir=tmp_path / "known",
                              properties=(prop,))


# --- the suite catches each broken promise ----------------------------------------------------------

class Broken(Params):
    flaw: str = ""


class Sloppy(Check):
    """A partner's check with one planted flaw at a time."""

    name = "sloppy"
    Params = Broken

    @classmethod
    def produces(cls, params, use_case):
        return None if params.flaw == "produces" else [Produces("accuracy", "test")]

    def run(self, ctx):
        flaw = self.params.flaw
        if flaw == "tabular" and ctx.model.tabular:
            raise IndexError("tuple index out of range")
        correct = n = 0
        sizes = []
        batches = [ctx.data.stream("test").batches(10_000)] if flaw == "streams" else [ctx.batches("test")]
        for batch in batches[0]:
            sizes.append(len(batch))
            correct += int((ctx.model.logits(batch.images).argmax(1) == batch.labels).sum())
            n += len(batch)
        value = correct / n if n else None
        if flaw == "batching":
            value = float(np.mean([s / 100 for s in sizes])) if sizes else None
        if flaw == "random":
            value = float(np.random.default_rng().random())
        if flaw == "empty":
            value = correct / max(n, 1)
        ms = [Measurement(check=self.name if flaw != "records" else "other", metric="accuracy", value=value, n=n,
                          scope=Scope(split="test"))]
        return CheckOutcome(check=self.name, measurements=ms, validity=["synthetic"])


@pytest.mark.parametrize(("flaw", "prop"), [("random", "deterministic"), ("batching", "batching"),
                                            ("streams", "streams"), ("records", "records"), ("tabular", "tabular"),
                                            ("empty", "empty"), ("produces", "produces")])
def test_the_suite_catches_a_broken_check(flaw, prop):
    ref = f"{__name__}:Sloppy"
    assert check_conformance(ref, {})["deterministic"] == "ok"
    with pytest.raises(ConformanceError, match=prop):
        check_conformance(ref, {"flaw": flaw})


# --- a real ONNX export, run by onnxruntime ---------------------------------------------------------

ONNX_CHECKS = ["data_quality", "explainability", "odd_monitor", "performance", "perturbation_sweep",
               "randomized_smoothing"]


@pytest.fixture(scope="module")
def onnx_case(tmp_path_factory):
    """The synthetic image model exported to ONNX (legacy exporter) and loaded through the onnx loader."""
    import torch

    from trustcase.models.loading import load_classifier

    uc, eager = synthetic_case()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    torch.onnx.export(eager.module, torch.zeros(1, 1, 16, 16), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
    uc = uc.model_copy(update={"model": uc.model.model_copy(update={"format": "onnx", "path": path})})
    return uc, load_classifier(uc.model), eager


def test_onnx_export_runs_in_onnxruntime_like_the_torch_model(onnx_case):
    uc, onnx, eager = onnx_case
    assert onnx.session is not None and not onnx.differentiable
    x = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 1)).astype(np.float32)
    assert np.allclose(onnx.logits(x), eager.logits(x), atol=1e-5)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "explainability" else n
                                  for n in ONNX_CHECKS])
def test_checks_accept_an_onnx_model(name, onnx_case, tmp_path):
    uc, onnx, _ = onnx_case
    params = dict(CASES[name][1])
    if name == "explainability":
        params["methods"] = ["occlusion", "rise"]
        params["options"] = {"occlusion": {"window": 4, "stride": 4}, "rise": {"masks": 16}}
    uc = uc.model_copy(update={"plan": uc.plan.model_copy(update={"checks": []})})
    report = check_conformance(name, params, use_case=uc, model=onnx, workdir=tmp_path,
                               properties=("deterministic", "records", "streams"))
    assert all(v.startswith(("ok", "skipped")) for v in report.values()), report

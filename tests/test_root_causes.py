"""HUDD root-cause clustering: planted failure causes are separated, k is right, the ODD names them.

The model is built by hand so its behaviour is known: it flags a cell as defective when its texture
(Laplacian energy) plus its brightness exceed a threshold. Two planted causes make defective cells
look functional: a dark patch over the left half (less light, less texture there) and a blur (less
texture everywhere). Errors of the same cause rest on the same internal evidence, so HUDD must find
two clusters, one per cause.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from trustcase.checks import CheckError, Context, Unsupported, build
from trustcase.data.streaming import DataSource, Item
from trustcase.explain import root_causes as R
from trustcase.models.classifier import Classifier
from trustcase.schemas import CheckSpec, UseCase

HERE = Path(__file__).resolve().parent
SIDE = 16
SPLITS = {"test": {"functional": 30, "defective": 30, "dark": 24, "blur": 24},
          "improve": {"functional": 20, "defective": 20, "dark": 15, "blur": 15},
          "clean": {"functional": 20, "defective": 20}}


def planted_image(rng: np.random.Generator, kind: str) -> np.ndarray:
    base = 0.6 + rng.normal(0, 0.03)
    if kind == "functional":
        return np.clip(base + rng.normal(0, 0.01, (SIDE, SIDE)), 0, 1)
    x = np.clip(base + rng.normal(0, 0.15, (SIDE, SIDE)), 0, 1)
    if kind == "dark":
        x[:, :SIDE // 2] = 0.05 + rng.normal(0, 0.005, (SIDE, SIDE // 2))
    elif kind == "blur":
        x = ndimage.gaussian_filter(x, 1.5)
    return x


class PlantedSplit:
    def __init__(self, split: str, seed: int = 0):
        rng = np.random.default_rng([seed, len(split)])
        self.items = []
        for kind, n in SPLITS[split].items():
            for i in range(n):
                # dark cells are all mono: the ODD description of their cluster must say so
                cell = "mono" if kind == "dark" else ("poly" if i % 2 else "mono")
                self.items.append(Item(image=planted_image(rng, kind).astype(np.float32),
                                       label=int(kind != "functional"), id=f"{kind}-{i}", meta={"cell_type": cell}))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def load(split: str, seed: int = 0) -> PlantedSplit:
    return PlantedSplit(split, seed)


def texture_model() -> nn.Module:
    """Defective iff texture / texture_0 + brightness / brightness_0 > 1.5 (calibrated on clean defective cells)."""
    lap = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float32)
    conv = nn.Conv2d(1, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight[:] = torch.stack([lap, -lap, torch.full((3, 3), 1 / 9)])[:, None]
    features = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    rng = np.random.default_rng(123)
    calib = torch.as_tensor(np.stack([planted_image(rng, "defective") for _ in range(64)]), dtype=torch.float32)
    f = features(calib[:, None]).detach().mean(0)
    head = nn.Linear(3, 2)
    with torch.no_grad():
        w = torch.tensor([1 / float(f[0] + f[1])] * 2 + [1 / float(f[2])])
        head.weight[:] = torch.stack([-w, w])
        head.bias[:] = torch.tensor([1.5, -1.5])
    return nn.Sequential(*features, head).eval()


def use_case(tmp_path: Path, confidential: bool = False, splits: dict | None = None) -> UseCase:
    return UseCase.model_validate({
        "id": "planted", "title": "planted causes", "owner": "tests", "criticality": "high",
        "intended_function": "flag defective cells",
        "confidentiality": "confidential" if confidential else "public",
        "model": {"format": "torchscript", "path": str(tmp_path / "unused.pt"), "input_shape": [1, SIDE, SIDE],
                  "value_range": [0, 1], "class_names": ["functional", "defective"],
                  "critical_class": "defective"},
        "data": {"loader": "test_root_causes:load", "path": str(HERE),
                 "splits": splits or {"test": "test", "improve": "improve"}, "batch_size": 32},
        "odd": {"descriptors": [{"name": "cell_type", "source": "metadata", "values": ["mono", "poly"]},
                                {"name": "brightness", "min": 0, "max": 1},
                                {"name": "sharpness", "min": 0, "max": 10}]},
        "requirements": [], "plan": {"checks": []},
    })


def context(tmp_path: Path, uc: UseCase, module: nn.Module | None = None) -> Context:
    clf = Classifier(uc.model, module=module if module is not None else texture_model())
    return Context(use_case=uc, model=clf, data=DataSource(uc.data, 0), seed=0, workdir=tmp_path / "root_causes")


def run(tmp_path, params=None, **kw):
    check = build(CheckSpec(check="root_causes", params={"noun": "cells", **(params or {})}))
    return check(context(tmp_path, use_case(tmp_path, **kw)))


def purity(clusters: list[dict]) -> float:
    """Share of errors whose cluster's majority cause is their own cause (ids are '<cause>-<i>')."""
    right = total = 0
    for c in clusters:
        causes = [m.split("-")[0] for m in c["members"]]
        right += max(causes.count(k) for k in set(causes))
        total += len(causes)
    return right / total


def test_planted_causes_are_separated_and_described(tmp_path):
    out = run(tmp_path, {"improvement_split": "improve", "unsafe_budget": 10})
    s = out.summary
    assert s["errors"] == 48 and s["relevance"] == "lrp"  # every planted item, and only those, is an error
    assert abs(s["k"] - 2) <= 1
    assert purity(s["clusters"]) >= 0.9
    by_cause = {c["members"][0].split("-")[0]: c for c in s["clusters"][:2]}
    assert set(by_cause) == {"dark", "blur"}
    assert "dark" in by_cause["dark"]["text"] and "mono" in by_cause["dark"]["text"]
    assert "blurred" in by_cause["blur"]["text"] and "dark" not in by_cause["blur"]["text"]
    assert by_cause["dark"]["descriptors"]["brightness"]["standardised_shift"] < -0.5
    m = {x.metric: x for x in out.measurements}
    assert m["root_cause_clusters"].value == s["k"] and m["root_cause_clusters"].n == 48
    assert m["errors"].value == 48 and m["errors"].n == sum(SPLITS["test"].values())
    # the unsafe set: balanced, and each cluster pulls the improvement items of its own cause
    assert m["unsafe_set_size"].value == 10
    for c in s["clusters"][:2]:
        cause = c["members"][0].split("-")[0]
        picked = s["unsafe_set"][str(c["id"])]["ids"]
        assert len(picked) == 10 // s["k"]
        assert all(i.startswith(cause) for i in picked)
    kinds = {a.kind for a in out.artefacts}
    assert "image" in kinds and any(a.path.endswith(".gif") for a in out.artefacts)
    assert (tmp_path / "root_causes" / "unsafe_set.csv").read_text().count("\n") == 11


def test_deterministic_and_no_pictures_when_confidential(tmp_path):
    a = run(tmp_path / "a", confidential=True)
    b = run(tmp_path / "b", confidential=True)
    assert [c["members"] for c in a.summary["clusters"]] == [c["members"] for c in b.summary["clusters"]]
    assert all(x.kind != "image" for x in a.artefacts)
    assert any("confidential" in lim for lim in a.limitations)


def test_grad_cam_relevance_also_separates_the_causes(tmp_path):
    out = run(tmp_path, {"relevance": "grad_cam", "layers": ["0"]})
    assert out.summary["relevance"] == "grad_cam"
    assert purity(out.summary["clusters"]) >= 0.9


def test_zero_errors_is_said_not_failed(tmp_path):
    out = run(tmp_path, splits={"test": "clean"})
    assert out.summary["clusters"] == [] and "no misclassified item" in out.summary["message"]
    assert {m.metric: m.value for m in out.measurements}["root_cause_clusters"] == 0


def test_bad_layer_and_black_box_are_clear(tmp_path):
    with pytest.raises(CheckError, match=r"layer 'nope' does not exist; layers: \['0 \(Conv2d\)'"):
        run(tmp_path, {"layers": ["nope"]})
    uc = use_case(tmp_path)
    ctx = context(tmp_path, uc)
    ctx.model.module = None
    ctx.model.session = None
    with pytest.raises(Unsupported, match="black box"):
        build(CheckSpec(check="root_causes"))(ctx)


# --- the clustering core, on exact geometry -------------------------------------------------------

def blobs(centres: list[np.ndarray], n: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + rng.normal(0, spread, (n, len(c))) for c in centres])
    return x, np.repeat(np.arange(len(centres)), n)


@pytest.mark.parametrize("k_true", [2, 3, 4])
def test_knee_finds_the_number_of_blobs(k_true):
    centres = [np.eye(8)[i] * 10 for i in range(k_true)]
    x, truth = blobs(centres, 40, 0.5)
    res = R.cluster(x, k_max=12)
    assert abs(res["k"] - k_true) <= 1
    # Ward on well separated blobs: every cluster is one blob
    assert all(len(set(truth[res["labels"] == c])) == 1 for c in range(res["k"]))


def test_within_curve_matches_the_sum_of_squares_of_the_cut():
    x, _ = blobs([np.zeros(3), np.full(3, 5.0), np.array([5.0, 0, 0])], 15, 1.0)
    z = R.ward(x)
    curve = R.within_curve(z, 6)
    for k in range(1, 7):
        labels = R.fcluster(z, k, criterion="maxclust") - 1
        ess, _ = R.sum_squares(x, labels)
        assert curve[k - 1] == pytest.approx(ess.sum(), rel=1e-9)


def test_compactness_prefers_the_structured_layer():
    x, truth = blobs([np.zeros(4), np.full(4, 8.0)], 30, 0.5)
    noise = np.random.default_rng(1).normal(size=x.shape)
    assert R.compactness(x, truth) < 0.2 < R.compactness(noise, truth)


def test_hudd_rule_is_exact():
    """Reach and single-linkage assignment by hand; an item beyond its nearest cluster's reach is never
    selected, however large the budget; an equal share per cluster; a short cluster gets bootstrap copies."""
    members = np.array([[0.0, 0], [0, 1], [0, 3], [10, 0], [10, 2]])
    labels = np.array([0, 0, 0, 1, 1])
    radii = R.cluster_radii(members, labels, 2)
    assert radii.tolist() == [2.0, 2.0]  # member (0, 3) is 2 from its nearest; the pair in cluster 1 is 2 apart
    q = np.array([[0.0, 4.5], [0, 6], [10, 3], [10, 5], [5, 0], [1, 0]])
    best, dist, inside = R.assign(q, members, labels, 2, radii, chunk=4)
    assert best.tolist() == [0, 0, 1, 1, 0, 0]
    assert dist.tolist() == pytest.approx([1.5, 3.0, 1.0, 3.0, 5.0, 1.0])
    assert inside.tolist() == [True, False, True, False, False, True]
    pos, copies = R.hudd_selection(best, dist, inside, 2, 4, seed=0)
    assert pos.tolist() == [5, 0, 2] and copies.tolist() == [1, 1, 2]  # closest first; cluster 1 bootstrapped
    pos, copies = R.hudd_selection(best, dist, inside, 2, 7, seed=0)
    assert sorted(pos.tolist()) == [0, 2, 5] and copies.sum() == 7 and (copies >= 1).all()
    assert {c: int(copies[best[pos] == c].sum()) for c in (0, 1)} == {0: 4, 1: 3}
    assert R.hudd_selection(best, dist, np.zeros(6, bool), 2, 4, 0)[0].size == 0  # nothing within any reach


def test_improve_selects_the_unsafe_set_the_check_reports(tmp_path):
    """One HUDD pipeline (`explain.root_causes.analyse`): `trustcase improve --method hudd` retrains on exactly the
    unsafe set the root_causes check reports, from the same model file, data and seed."""
    from trustcase.flows.improve import select_unsafe
    from trustcase.models.loading import load_classifier

    uc = use_case(tmp_path)
    torch.jit.script(texture_model()).save(uc.model.path)
    params = {"noun": "cells", "improvement_split": "improve", "unsafe_budget": 10}
    ctx = Context(use_case=uc, model=load_classifier(uc.model), data=DataSource(uc.data, 0), seed=0,
                  workdir=tmp_path / "root_causes")
    out = build(CheckSpec(check="root_causes", params=params))(ctx)
    rows = (tmp_path / "root_causes" / "unsafe_set.csv").read_text().splitlines()[1:]
    reported = {r.split(",")[0]: int(r.split(",")[3]) for r in rows}
    chosen = select_unsafe.fn(uc, Path(uc.model.path), "improve", params, 10, 0, tmp_path / "improve")
    assert (chosen["layer"], chosen["k"]) == (out.summary["layer"], out.summary["k"])
    assert dict(zip(chosen["improved_ids"], [x.copies for x in chosen["improved"]], strict=True)) == reported
    assert sum(reported.values()) == 10

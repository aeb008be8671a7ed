"""label_issues: confident learning on exact cases, the check's artefacts and confidentiality, and the validation
on the real ELPV labels (slow): suspected cells enriched among the expert's uncertain ratings, planted flips found."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trustcase.checks import CheckError, Context
from trustcase.checks.label_issues import LabelIssues, train_folds
from trustcase.data import labels as L
from trustcase.data.streaming import DataSource
from trustcase.errors import Unsupported
from trustcase.models.classifier import Classifier
from trustcase.models.loading import load_classifier
from trustcase.schemas import Confidentiality, Topic, TrainingRequest, TrainingResult, UseCase, load_use_case
from trustcase.testing import synthetic_case, synthetic_images

SOLAR = Path(__file__).resolve().parent.parent / "use_cases" / "solar_cells"
FLIPPED = [3, 10, 17, 30, 41, 56, 62, 77, 88, 95]  # train positions whose label the loader flips
COPIES = [21, 43, 65]  # train positions that `near_copies` makes near-copies of item 0


def confident(labels: np.ndarray, classes: int, p: float = 0.95) -> np.ndarray:
    probs = np.full((len(labels), classes), (1 - p) / (classes - 1))
    probs[np.arange(len(labels)), labels] = p
    return probs


def test_the_items_the_model_contradicts_with_confidence_are_exactly_the_suspects():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 300)
    probs = confident(truth, 3)
    given = truth.copy()
    wrong = np.array([3, 50, 120, 200, 299])
    given[wrong] = (truth[wrong] + 1) % 3
    found = L.find(given, probs)
    assert np.flatnonzero(found.suspected).tolist() == wrong.tolist()
    assert found.suggested[wrong].tolist() == truth[wrong].tolist()
    assert np.allclose(found.quality[wrong], 0.025) and np.allclose(np.delete(found.quality, wrong), 0.95)


def test_labels_the_model_agrees_with_are_never_suspected():
    y = np.repeat([0, 1], 50)
    assert not L.find(y, confident(y, 2, 0.7)).suspected.any()
    assert L.find(np.zeros(0, np.int64), np.zeros((0, 2))).suspected.shape == (0,)


def test_risk_ratio_and_its_katz_interval_by_hand():
    rr, lo, hi = L.risk_ratio(20, 100, 10, 200, 0.95)
    assert rr == pytest.approx(4.0)
    se = np.sqrt(1 / 20 - 1 / 100 + 1 / 10 - 1 / 200)
    assert lo == pytest.approx(4.0 * np.exp(-1.959964 * se), rel=1e-6)
    assert hi == pytest.approx(4.0 * np.exp(1.959964 * se), rel=1e-6)
    rr0, lo0, hi0 = L.risk_ratio(0, 10, 5, 100, 0.95)  # a zero cell: Haldane's 0.5 keeps it finite
    assert 0 < lo0 < rr0 < hi0 < np.inf


def test_the_least_confident_items_do_not_depend_on_batch_order():
    q = np.array([0.5, 0.1, 0.1, 0.9, 0.3, 0.2])
    ids = [f"i{k}" for k in range(6)]
    x = np.arange(6)[:, None]
    a, b = L.LowestConfidence(3), L.LowestConfidence(3)
    a.update(q, ids, x)
    for j in (5, 4, 3, 2, 1, 0):
        b.update(q[j:j + 1], ids[j:j + 1], x[j:j + 1])
    assert [i for _, i, _ in a.items()] == [i for _, i, _ in b.items()] == ["i1", "i2", "i5"]


def test_planted_flips_are_found_when_the_model_is_right():
    truth = np.repeat([0, 1], 200)
    v = L.validate(truth, confident(truth, 2), np.zeros(400, bool), 0.05, 0, 0.95)
    assert v["planted"] == 20 and v["planted_found"] == 20 and v["precision"] == 1.0 and v["recall"] == 1.0


def run_check(uc, clf, tmp_path, **params):
    ctx = Context(uc, clf, DataSource(uc.data, model=uc.model), seed=0, workdir=tmp_path / "label_issues")
    return LabelIssues(LabelIssues.Params(**params))(ctx)


def test_the_check_shows_the_suspects_and_says_how_many_in_words(tmp_path):
    uc, clf = synthetic_case(n=40)
    out = run_check(uc, clf, tmp_path, thumbnails=64)
    shares = {m.scope.split: m for m in out.measurements if m.metric == "suspected_labels"}
    assert set(shares) == {"validation", "test"}  # never the split the model learnt from
    for role, m in shares.items():
        assert m.kind == "estimate" and m.interval.method == "clopper-pearson"
        assert m.value == out.summary[role]["suspected"] / m.n
    assert [f.topic for f in out.findings] == [Topic.DATA, Topic.DATA]
    if any(out.summary[r]["suspected"] for r in shares):
        kinds = {a.kind for a in out.artefacts}
        assert kinds == {"image", "file"}
        rows = (tmp_path / "label_issues" / "suspected.csv").read_text().splitlines()
        assert len(rows) - 1 == sum(out.summary[r]["suspected"] for r in shares)


def test_a_confidential_use_case_gets_no_thumbnail(tmp_path):
    uc, clf = synthetic_case(n=40)
    uc = uc.model_copy(update={"confidentiality": Confidentiality.confidential})
    out = run_check(uc, clf, tmp_path, thumbnails=64)
    assert not out.artefacts and not list((tmp_path / "label_issues").glob("*.png"))
    assert any("confidential" in x for x in out.limitations)


@pytest.mark.slow
def test_on_elpv_suspected_cells_are_enriched_among_uncertain_ratings(tmp_path):
    spec = importlib.util.spec_from_file_location("solar_train_labels", SOLAR / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    path = tmp_path / "solar.pt"
    train.train(path, epochs=6, arch="pooled", ibp_eps=0.0, log=lambda *_: None)
    uc = load_use_case(SOLAR / "use_case.yaml")
    uc = uc.model_copy(update={"model": uc.model.model_copy(update={"path": path})})
    clf = load_classifier(uc.model)
    y, probs, uncertain = [], [], []
    for role in ("validation", "test"):
        for b in DataSource(uc.data, model=uc.model).stream(role).batches():
            y.append(b.labels)
            probs.append(L.softmax(clf.logits(b.images)))
            uncertain += [m in ("0.33", "0.67") for m in b.meta["defect_probability"]]
    v = L.validate(np.concatenate(y), np.concatenate(probs), np.array(uncertain), 0.05, 0, 0.95)
    assert v["uncertain"] > 50
    assert v["enrichment_interval"][0] > 1.0, v  # shown enriched, on the interval's lower end
    assert v["recall_interval"][0] > 0.3, v


# --- cross-validation through a training contract: a real CNN trained per fold on synthetic images -----------------

def noisy_images(split: str, n: int = 24, side: int = 16):
    """The synthetic images, with the labels at FLIPPED flipped in the train split (planted label errors)."""
    items = synthetic_images(split, n, side)
    for i in FLIPPED if split == "train" else ():
        if i < n:
            items[i] = dataclasses.replace(items[i], label=1 - items[i].label)
    return items


def requests(workdir: Path) -> list[TrainingRequest]:
    """What `fit` was asked, fold by fold (read from files: the registry imports this module under its own name)."""
    return [TrainingRequest.model_validate_json((workdir / f"fold{k}.request.json").read_text())
            for k in range(1, len(list(workdir.glob("fold*.request.json"))) + 1)]


def near_copies(split: str, n: int = 24, side: int = 16):
    """`noisy_images`, where the train items at COPIES are item 0 with one pixel one grey level brighter (the same
    cell imaged twice: a near-duplicate group of 4)."""
    items = noisy_images(split, n, side)
    for i in COPIES if split == "train" else ():
        image = items[0].image.copy()
        image[0, 0] = min(255, int(image[0, 0]) + 1)
        items[i] = dataclasses.replace(items[i], image=image, label=items[0].label)
    return items


def fit(request: TrainingRequest) -> TrainingResult:
    """A training contract that leaves request.held_out out: a small CNN, full batch, seeded."""
    request.out.with_suffix(".request.json").write_text(request.model_dump_json())  # what it was asked
    uc = load_use_case(request.use_case)
    items = globals()[uc.data.loader.split(":")[1]]("train", **uc.data.params)  # the use case's loader
    held = set(request.held_out.get("train", []))
    keep = [it for i, it in enumerate(items) if i not in held]
    with torch.random.fork_rng():
        torch.manual_seed(request.seed)
        module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1),
                               nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        x = Classifier(uc.model, module=module).to_input(np.stack([it.image[..., None] for it in keep]))
        y = torch.tensor([it.label for it in keep])
        opt = torch.optim.Adam(module.parameters(), lr=0.02)
        for _ in range(20 * request.epochs):
            opt.zero_grad()
            nn.functional.cross_entropy(module(x), y).backward()
            opt.step()
    torch.jit.trace(module.eval(), x[:1]).save(str(request.out))
    return TrainingResult(model=request.out, held_out=len(held))


def fit_unaware(request: TrainingRequest) -> TrainingResult:
    """An older contract: trains on everything and does not say it left anything out."""
    return fit(request.model_copy(update={"held_out": {}}))


def fit_refusing(request: TrainingRequest) -> TrainingResult:
    raise Unsupported("this script trains on the whole train split only")


def fit_buggy(request: TrainingRequest) -> TrainingResult:
    return {"model": request.out, "held_out": len(request.held_out["train"])}["log"]  # a bug: KeyError


def fit_wrong_answer(request: TrainingRequest) -> TrainingResult:
    return {"path": str(request.out)}


def cross_case(entry: str | None, n: int = 100, loader: str = "noisy_images") -> UseCase:
    uc, _ = synthetic_case(n=n)
    raw = uc.model_dump(mode="json")
    raw["data"].update(loader=f"test_label_issues:{loader}", path=str(Path(__file__).parent))
    if entry:
        raw["training"] = {"entry": f"test_label_issues:{entry}"}
    return UseCase.model_validate(raw)


def test_train_labels_are_screened_out_of_fold_through_the_training_contract(tmp_path):
    uc = cross_case("fit")
    out = run_check(uc, load_classifier(uc.model), tmp_path, folds=3, epochs=3, thumbnails=0)
    asked = requests(tmp_path / "label_issues")
    assert [r.epochs for r in asked] == [3, 3, 3]
    held = [set(r.held_out["train"]) for r in asked]
    assert sorted(i for h in held for i in h) == list(range(100))  # each item out of exactly one fold
    train = next(m for m in out.measurements if m.metric == "suspected_labels" and m.scope.split == "train")
    assert train.n == 100 and train.value is not None
    assert out.summary["train"]["probabilities"] == "out of fold"
    found = {int(s.split()[0].split("-")[1]) for s in out.summary["train"]["suspected_items"]}
    assert len(found & set(FLIPPED)) >= 7, found  # the planted flips, found by models that never saw them
    assert any("out-of-fold probabilities of 3 models" in v and "3 epochs each" in v for v in out.validity)
    assert not any("train split" in x for x in out.limitations)
    assert LabelIssues.produces(LabelIssues.Params(), uc)[0].split == "train"


def test_near_duplicates_are_one_group_keyed_by_its_least_id_whatever_the_order():
    ids = ["e", "b", "d", "a", "c", "f"]
    pairs = np.array([[0, 1], [1, 4], [2, 3]])  # e-b, b-c: one group; d-a another; f alone
    assert L.fold_groups(ids, pairs) == ["b", "b", "a", "a", "b", "f"]
    order = [5, 3, 1, 0, 4, 2]  # the same items and pairs in another order
    where = {j: k for k, j in enumerate(order)}
    keys = L.fold_groups([ids[j] for j in order], np.array([[where[a], where[b]] for a, b in pairs]))
    assert keys == [["b", "b", "a", "a", "b", "f"][j] for j in order]


def test_a_near_duplicate_group_is_held_out_as_a_whole_and_only_the_groups_change_fold(tmp_path):
    """ELPV images cells twice: with folds by item a cell's near-copy trains the model that scores it, which repeats
    its label. The folds keep a group in one fold (the split's own rule); items with no near-copy keep their fold."""
    uc = cross_case("fit", loader="near_copies")
    held, out = {}, {}
    for distance in (2, None):
        out[distance] = run_check(uc, load_classifier(uc.model), tmp_path / str(distance), folds=3, epochs=1,
                                  thumbnails=0, splits=["train"], near_duplicate_distance=distance)
        held[distance] = [set(r.held_out["train"]) for r in requests(tmp_path / str(distance) / "label_issues")]
        assert sorted(i for h in held[distance] for i in h) == list(range(100))
    group = {0, *COPIES}
    assert sum(group <= h for h in held[2]) == 1  # the group, whole, in one fold
    assert not any(group <= h for h in held[None])  # by item (this seed): its members in several folds
    fold = {d: {i: f for f, h in enumerate(held[d]) for i in h} for d in held}
    assert all(fold[2][i] == fold[None][i] for i in range(100) if i not in group)
    assert out[2].summary["train"]["items_with_near_duplicates"] == 4
    assert any("4 items have a near-copy in the split" in v for v in out[2].validity)
    assert any("folds by item" in v for v in out[None].validity)


def test_on_elpv_the_folds_keep_each_near_duplicate_group_of_the_split_manifest_whole(tmp_path):
    """The check's groups (perceptual hashes of the cells as the model sees them) are the split's: every group of
    elpv_groups.csv with cells in train is in one fold, and 169 train cells have a near-copy."""
    spec = importlib.util.spec_from_file_location("solar_elpv_folds", SOLAR / "elpv.py")
    elpv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(elpv)
    uc = load_use_case(SOLAR / "use_case.yaml")
    ctx = Context(uc, None, DataSource(uc.data, model=uc.model), seed=0, workdir=tmp_path)
    fold, position, grouped = train_folds(ctx, 3, 2)
    assert len(fold) == len(position) == 1841 and set(fold.values()) == {0, 1, 2}
    by_group: dict[str, set[int]] = {}
    for name, key in elpv.read_groups().items():
        if Path(name).name in fold:
            by_group.setdefault(key, set()).add(fold[Path(name).name])
    assert len(by_group) == 66 and all(len(f) == 1 for f in by_group.values())
    assert grouped == 169


def test_the_folds_and_their_evidence_do_not_depend_on_the_batch_size(tmp_path):
    uc = cross_case("fit", n=60)
    a = run_check(uc, load_classifier(uc.model), tmp_path / "a", folds=2, epochs=2, thumbnails=0)
    small = uc.model_copy(update={"data": uc.data.model_copy(update={"batch_size": 5})})
    b = run_check(small, load_classifier(uc.model), tmp_path / "b", folds=2, epochs=2, thumbnails=0)
    assert a.summary == b.summary
    assert [(m.metric, m.scope.split, m.value) for m in a.measurements] == \
        [(m.metric, m.scope.split, m.value) for m in b.measurements]


@pytest.mark.parametrize("entry, reason", [
    (None, "offers no training contract"),
    ("fit_unaware", "TrainingResult.held_out"),
    ("fit_refusing", "cannot leave items out: this script trains on the whole train split only"),
])
def test_without_a_contract_that_leaves_a_fold_out_the_train_split_is_not_screened_and_says_why(tmp_path, entry,
                                                                                               reason):
    uc = cross_case(entry, n=40)
    out = run_check(uc, load_classifier(uc.model), tmp_path, splits=None if entry is None else
                    ["train", "test"], folds=2, epochs=1, thumbnails=0)
    assert any(reason in x for x in out.limitations), out.limitations
    train = [m for m in out.measurements if m.scope.split == "train"]
    if entry is None:  # nothing to cross-validate through: the train split is not declared either
        assert not train and "train" not in {p.split for p in LabelIssues.produces(LabelIssues.Params(), uc)}
    else:  # asked for: no value, the reason in the evidence (a claim on it is INCONCLUSIVE)
        assert train and all(m.value is None and reason in m.details["undefined"] for m in train)
    assert any(m.scope.split == "test" and m.value is not None for m in out.measurements)


@pytest.mark.slow
def test_on_elpv_the_train_split_is_screened_out_of_fold_through_the_solar_training_contract(tmp_path):
    spec = importlib.util.spec_from_file_location("solar_train_folds", SOLAR / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    path = tmp_path / "solar.pt"  # the assessed model: not used on the train split, which the folds' models screen
    train.train(path, epochs=1, arch="strided", ibp_eps=0.0, log=lambda *_: None)
    uc = load_use_case(SOLAR / "use_case.yaml")
    uc = uc.model_copy(update={"model": uc.model.model_copy(update={"path": path})})
    out = run_check(uc, load_classifier(uc.model), tmp_path, splits=["train"], folds=3, epochs=4,
                    training={"ibp_eps": 0.0}, thumbnails=0)
    (m,) = [m for m in out.measurements if m.metric == "suspected_labels"]
    assert m.scope.split == "train" and m.n > 1500 and m.value is not None, m
    folds = [load_classifier(uc.model.model_copy(update={"path": tmp_path / "label_issues" / f"fold{k}.pt"}))
             for k in (1, 2, 3)]
    ctx = Context(uc, None, DataSource(uc.data, model=uc.model), seed=0, workdir=tmp_path)
    oof = L.OutOfFold(folds, train_folds(ctx, 3, 2)[0])
    y, probs, uncertain = [], [], []
    for b in DataSource(uc.data, model=uc.model).stream("train").batches():
        y.append(b.labels)
        probs.append(oof(b.images, b.ids))
        uncertain += [r in ("0.33", "0.67") for r in b.meta["defect_probability"]]
    y, probs = np.concatenate(y), np.concatenate(probs)
    assert int(L.find(y, probs).suspected.sum()) == out.summary["train"]["suspected"]  # the check's own screen
    v = L.validate(y, probs, np.array(uncertain), 0.05, 0, 0.95)
    assert v["enrichment_interval"][0] > 1.0, v  # enriched among the uncertain ratings, on the lower end


def test_a_training_contract_that_crashes_is_an_error_not_a_fallback(tmp_path):
    """Only the contract's own 'cannot leave items out' (Unsupported) becomes "not screened"; a bug in the script
    is an internal error and a wrong answer the user's error, never a quiet limitation (review R3)."""
    uc = cross_case("fit_buggy", n=40)
    with pytest.raises(KeyError, match="log"):
        run_check(uc, load_classifier(uc.model), tmp_path / "a", splits=["train"], folds=2, epochs=1, thumbnails=0)
    uc = cross_case("fit_wrong_answer", n=40)
    with pytest.raises(CheckError, match="fold 1 of 2 returned no TrainingResult: model: Field required"):
        run_check(uc, load_classifier(uc.model), tmp_path / "b", splits=["train"], folds=2, epochs=1, thumbnails=0)


def test_the_training_script_is_in_the_code_hash_that_keys_cached_results():
    """A cached label_issues result must not outlive a change of the script its folds were trained by."""
    from trustcase.flows.assess import _partner_modules
    from trustcase.flows.provenance import code_closure
    from trustcase.registry import resolve

    uc = load_use_case(SOLAR / "use_case.yaml")
    resolve(uc.data.loader, uc.data.path)  # as the flow's fingerprint does before hashing: the case's folder
    hashed = {h.partition(":")[0]: h for h in code_closure(_partner_modules(uc))}
    assert {"elpv", "cnn", "train"} <= hashed.keys(), hashed
    assert hashed["train"].endswith(hashlib.sha256((SOLAR / "train.py").read_bytes()).hexdigest())

"""poisoning_screen: spectral signatures and activation clustering find a planted cluster exactly, stay quiet on
clean classes, and (slow) rank the items of a planted backdoor on real ELPV cells at the top."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trustcase.data import poisoning as P

SOLAR = Path(__file__).resolve().parent.parent / "use_cases" / "solar_cells"


def test_a_planted_cluster_is_the_alarm_and_tops_the_spectral_ranking():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(300, 16))
    planted = np.arange(0, 300, 20)  # 15 items, 5%
    f[planted] += 10.0 * np.eye(16)[3]  # 10 sd: no clean item of 300 reaches halfway
    r = P.screen(f, rng.normal(size=(300, 16)), seed=0)  # the held-out items: clean
    assert r.alarm and np.array_equal(r.suspects, planted) and r.held_out_share == 0
    assert set(np.argsort(-r.spectral)[:len(planted)]) == set(planted)
    assert P.precision_recall(r.suspects, planted) == (15, 15, 15)


def test_a_cluster_of_the_data_itself_is_no_alarm():
    """A small, well separated sub-population in both splits (the demo CNN's clean classes have them): a candidate,
    not an alarm; the same cluster only in training is one."""
    rng = np.random.default_rng(0)

    def split(n):
        f = rng.normal(size=(n, 16))
        f[: n // 10] += 10.0 * np.eye(16)[3]  # 10% of either split
        return f

    r = P.screen(split(300), split(100), seed=0)
    assert r.candidate and not r.alarm and r.pvalue > 0.1 and len(r.suspects) == 0
    assert P.screen(split(300), rng.normal(size=(100, 16)), seed=0).alarm


def test_clean_classes_raise_no_alarm():
    rng = np.random.default_rng(1)
    alarms = sum(P.screen(rng.standard_t(df=5, size=(200, 16)), rng.standard_t(df=5, size=(100, 16)), seed=s).alarm
                 for s in range(30))
    assert alarms == 0


def test_too_few_items_are_refused():
    with pytest.raises(ValueError, match=f"at least {P.MIN_ITEMS}"):
        P.screen(np.zeros((5, 3)), np.zeros((30, 3)), seed=0)
    with pytest.raises(ValueError, match=f"at least {P.MIN_ITEMS}"):
        P.screen(np.zeros((30, 3)), np.zeros((5, 3)), seed=0)


def poisoned_case(tmp_path: Path, size: int = 32, share: float = 0.05) -> Path:
    """The solar use case on ELPV with a backdoor in its training split (`poisoned_elpv`), at `size` pixels."""
    import yaml

    raw = yaml.safe_load((SOLAR / "use_case.yaml").read_text())
    raw["model"].update(path=str(tmp_path / "poisoned.pt"), input_shape=[1, size, size])
    raw["data"].update(loader="poisoned_elpv:load_split", path=str(Path(__file__).resolve().parent),
                       params={"size": size, "threshold": 0.5, "share": share, "seed": 0})
    raw["plan"]["checks"] = [{"check": "poisoning_screen"}]
    case = tmp_path / "use_case.yaml"
    case.write_text(yaml.safe_dump(raw, sort_keys=False))
    return case


def planted_backdoor(tmp_path: Path, epochs: int | None = 8, recipe: dict | None = None, size: int = 32):
    """A model trained through the solar training contract (`train:fit`) on ELPV whose training split carries a
    backdoor (`poisoned_elpv`: a white square on 5% of the cells, all relabelled functional), and the poisoning
    screen of it (`recipe`: the request's params, default a pooled CNN; epochs None: the script's own). Returns the
    check's outcome and the planted items' ids (bench/bench_data.py reports the same)."""
    import importlib.util

    import poisoned_elpv

    from trustcase.checks import Context
    from trustcase.checks.poisoning_screen import PoisoningScreen
    from trustcase.data.streaming import DataSource
    from trustcase.models.loading import load_classifier
    from trustcase.schemas import TrainingRequest, load_use_case

    case = poisoned_case(tmp_path, size=size)
    spec = importlib.util.spec_from_file_location("solar_train_poisoned", SOLAR / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    result = train.fit(TrainingRequest(out=tmp_path / "poisoned.pt", use_case=case, seed=0, epochs=epochs,
                                       params=recipe or {"arch": "pooled", "ibp_eps": 0.0, "width": 8}))
    uc = load_use_case(case)
    uc = uc.model_copy(update={"model": uc.model.model_copy(update={"path": result.model})})
    split = poisoned_elpv.load_split("train", **uc.data.params)
    planted = {split.split.name(i) for i in split.positions}
    ctx = Context(uc, load_classifier(uc.model), DataSource(uc.data, model=uc.model), 0, tmp_path / "screen")
    return PoisoningScreen(PoisoningScreen.Params())(ctx), planted


@pytest.mark.slow
def test_a_backdoor_planted_on_elpv_and_trained_through_the_contract_is_the_alarm(tmp_path):
    out, planted = planted_backdoor(tmp_path)
    functional = out.summary["functional"]
    assert functional["alarm"] and not out.summary["defective"]["alarm"], out.summary
    flagged = set(functional["suspects"])
    hit = len(flagged & planted)
    assert hit >= 0.8 * len(planted) and hit >= 0.8 * len(flagged), (hit, len(flagged), len(planted))


def random_folder(root: Path, counts: dict[tuple[str, str], int]) -> Path:
    """An image folder of random 16 x 16 pictures: counts[(split, class)] of each."""
    from conftest import save_png

    rng = np.random.default_rng(0)
    for (split, cls), n in counts.items():
        for i in range(n):
            save_png(root / f"{split}/{cls}/{i}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    return root


def test_a_class_too_small_to_screen_leaves_the_alarm_count_undefined(tmp_path):
    """25 'ok' items are screened, 5 'bad' are not: 'poisoning_alarms <= 0' must not PASS on the 'ok' class
    alone (the poisoned cluster could be in the class never screened)."""
    import torch
    from conftest import context_for, folder_use_case

    from trustcase.checks.poisoning_screen import PoisoningScreen, PoisoningScreenParams
    from trustcase.schemas import Requirement, UseCase, Verdict
    from trustcase.verdicts import judge

    random_folder(tmp_path / "data", {("train", "ok"): 25, ("train", "bad"): 5,
                                      ("test", "ok"): 20, ("test", "bad"): 20})
    uc = UseCase.model_validate(folder_use_case(tmp_path / "data"))
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    o = PoisoningScreen(PoisoningScreenParams(held_out="test"))(context_for(uc, module, tmp_path / "work"))
    alarms = next(m for m in o.measurements if m.metric == "poisoning_alarms")
    assert o.summary.keys() == {"ok"}  # the 'ok' class was screened
    assert alarms.value is None and "1 of 2 classes" in alarms.details["undefined"]
    req = Requirement(id="P1", text="no poisoning alarm", metric="poisoning_alarms", comparator="<=",
                      threshold=0, scope={"split": "train"})
    (v,) = judge([req], [o])
    assert v.verdict is Verdict.INCONCLUSIVE and "not screened" in v.rationale


def test_a_class_larger_than_the_sample_is_screened_on_a_seeded_sample_and_its_counts_are_estimates(tmp_path):
    """Memory bound: at most max_items items per class; the same sample at any batch size; the counts over a
    sample are no census, so 'poisoning_alarms <= 0' cannot PASS on them."""
    import torch
    from conftest import context_for, folder_use_case

    from trustcase.checks.poisoning_screen import PoisoningScreen, PoisoningScreenParams
    from trustcase.schemas import Requirement, UseCase, Verdict
    from trustcase.testing import evidence_of
    from trustcase.verdicts import judge

    random_folder(tmp_path / "data", {("train", "ok"): 60, ("train", "bad"): 30,
                                      ("test", "ok"): 20, ("test", "bad"): 20})
    raw = folder_use_case(tmp_path / "data")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    outs = []
    for batch_size in (7, 32):
        uc = UseCase.model_validate({**raw, "data": {**raw["data"], "batch_size": batch_size}})
        outs.append(PoisoningScreen(PoisoningScreenParams(max_items=25, held_out="test"))(
            context_for(uc, module, tmp_path / "w")))
    o = outs[0]
    assert evidence_of(outs[0]) == evidence_of(outs[1])
    assert {c: (v["items"], v["screened"]) for c, v in o.summary.items()} == {"ok": (60, 25), "bad": (30, 25)}
    alarms = next(m for m in o.measurements if m.metric == "poisoning_alarms")
    assert alarms.kind == "estimate" and alarms.interval is None and "ok 25 of 60" in alarms.details["no_interval"]
    req = Requirement(id="P1", text="no poisoning alarm", metric="poisoning_alarms", comparator="<=",
                      threshold=0, scope={"split": "train"})
    (v,) = judge([req], [o])
    assert v.verdict is Verdict.INCONCLUSIVE


def test_without_a_held_out_split_nothing_is_screened_and_the_evidence_says_why(tmp_path):
    import torch
    from conftest import context_for, folder_use_case

    from trustcase.checks.poisoning_screen import PoisoningScreen, PoisoningScreenParams
    from trustcase.schemas import UseCase

    random_folder(tmp_path / "data", {("train", "ok"): 25, ("train", "bad"): 25,
                                      ("test", "ok"): 5, ("test", "bad"): 5})
    uc = UseCase.model_validate(folder_use_case(tmp_path / "data"))
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    o = PoisoningScreen(PoisoningScreenParams())(context_for(uc, module, tmp_path / "w"))  # no validation split
    alarms = next(m for m in o.measurements if m.metric == "poisoning_alarms")
    assert alarms.value is None and "no validation split" in alarms.details["undefined"]
    o = PoisoningScreen(PoisoningScreenParams(held_out="test"))(context_for(uc, module, tmp_path / "v"))
    alarms = next(m for m in o.measurements if m.metric == "poisoning_alarms")
    assert alarms.value is None and "5 test items" in alarms.details["undefined"]  # too few held out

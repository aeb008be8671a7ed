"""The use-case contract: valid files load, broken ones give every problem with its line."""

from __future__ import annotations

import pytest
import yaml
from conftest import SOLAR

from trustcase.schemas import UseCaseError, load_use_case, parse_use_case


def problems(text: str, tmp_path):
    p = tmp_path / "uc.yaml"
    p.write_text(text)
    with pytest.raises(UseCaseError) as e:
        load_use_case(p)
    return e.value.problems


def test_bundled_use_case_is_valid():
    uc = load_use_case(SOLAR / "use_case.yaml")
    assert uc.id == "solar_cells"
    assert uc.model.critical_class == "defective"
    assert uc.critical_index == 1
    assert uc.model.path.is_absolute()  # resolved against the file's folder
    assert {d.name for d in uc.odd.descriptors} >= {"cell_type", "brightness"}


def test_invalid_yaml_is_located(tmp_path):
    ps = problems("id: x\ntitle: [unclosed\n", tmp_path)
    assert len(ps) == 1 and ps[0].line is not None and "invalid YAML" in ps[0].message


def test_every_problem_at_once_with_lines(tmp_path):
    raw = yaml.safe_load((SOLAR / "use_case.yaml").read_text())
    raw["criticality"] = "extreme"                   # bad enum
    raw["model"]["critical_class"] = "cracked"       # not a class
    raw["requirements"][0]["threshold"] = "high"     # wrong type
    raw["requirements"][1]["colour"] = "red"         # unknown key
    text = yaml.safe_dump(raw, sort_keys=False)
    ps = problems(text, tmp_path)
    locs = {p.location for p in ps}
    assert "criticality" in locs
    assert "requirements[0].threshold" in locs
    assert "requirements[1].colour" in locs
    assert any("cracked" in p.message for p in ps)
    lines = text.splitlines()
    for p in ps:
        assert p.line is not None
        if p.location == "criticality":
            assert lines[p.line - 1].startswith("criticality:")
        if p.location == "requirements[1].colour":
            assert "colour" in lines[p.line - 1]


@pytest.mark.parametrize("mutate, fragment", [
    (lambda r: r["odd"]["descriptors"].append({"name": "x", "min": 5, "max": 1}), "min 5.0 > max 1.0"),
    (lambda r: r["odd"]["descriptors"].append({"name": "y", "min": 0, "max": 1, "margin": 0.8}), "margin"),
    (lambda r: r["requirements"].append(dict(r["requirements"][0])), "duplicate requirement id"),
    (lambda r: r["requirements"][0].update(scope={"subgroup": {"cell_type": "thin-film"}}), "thin-film"),
    (lambda r: r["requirements"][0].update(metric="recall:cracked"), "cracked"),
    (lambda r: r["plan"].update(cost_matrix=[[0, 1]]), "must be 2x2"),
    (lambda r: r["model"].update(format="state_dict"), "factory"),
    (lambda r: r["data"].update(max_samples={"holdout": 3}), "holdout"),
])
def test_semantic_errors(tmp_path, mutate, fragment):
    raw = yaml.safe_load((SOLAR / "use_case.yaml").read_text())
    mutate(raw)
    ps = problems(yaml.safe_dump(raw, sort_keys=False), tmp_path)
    assert any(fragment in p.message for p in ps), ps


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UseCaseError, match="cannot read"):
        load_use_case(tmp_path / "nope.yaml")


def test_not_a_mapping(tmp_path):
    with pytest.raises(UseCaseError, match="mapping"):
        parse_use_case("- a\n- b\n", tmp_path / "x.yaml")


def test_cross_section_problems_point_at_the_field(tmp_path):
    raw = yaml.safe_load((SOLAR / "use_case.yaml").read_text())
    raw["requirements"][2]["scope"] = {"subgroup": {"cell_type": "thin-film"}}
    raw["requirements"][3]["metric"] = "recall:cracked"
    text = yaml.safe_dump(raw, sort_keys=False)
    ps = {p.location: p for p in problems(text, tmp_path)}
    lines = text.splitlines()
    assert "thin-film" in lines[ps["requirements[2].scope.subgroup.cell_type"].line - 1]
    assert "recall:cracked" in lines[ps["requirements[3].metric"].line - 1]

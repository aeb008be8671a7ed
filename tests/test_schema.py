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


@pytest.mark.parametrize("mutate, location, fragment", [
    (lambda r: r["requirements"][0].update(threshold=float("nan")), "requirements[0].threshold", "finite"),
    (lambda r: r["requirements"][4]["scope"]["perturbation"].update(max_amplitude=-1.0),
     "requirements[4].scope.perturbation.max_amplitude", "greater than or equal to 0"),
    (lambda r: r["plan"].update(cost_matrix=[[0, float("nan")], [10, 0]]), "plan.cost_matrix[0][1]", "finite"),
    (lambda r: r["plan"].update(cost_matrix=[[0, -1], [10, 0]]), "plan.cost_matrix[0][1]", "greater than or equal"),
    (lambda r: r["model"].update(normalisation={"mean": [0.5, 0.5, 0.5], "std": [0.2]}), "model",
     "normalisation.mean has 3 values; input_shape [1, 64, 64] has 1 channel"),
    (lambda r: r["model"].update(value_range=[0, float("inf")]), "model.value_range[1]", "finite"),
])
def test_numbers_are_finite_and_coherent_where_they_must_be(tmp_path, mutate, location, fragment):
    raw = yaml.safe_load((SOLAR / "use_case.yaml").read_text())
    mutate(raw)
    text = yaml.safe_dump(raw, sort_keys=False)
    ps = [p for p in problems(text, tmp_path) if p.location == location]
    assert ps and fragment in ps[0].message and ps[0].line is not None, problems(text, tmp_path)


@pytest.mark.parametrize("text, fragment, line", [
    ("id: x\ntitle: " + "[" * 20000 + "]" * 20000 + "\n", "nesting deeper than", 2),
    ("id: x\nowner: &who me\ntitle: *who\n", "alias *who", 3),
    ("laughs: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n", "alias *a", 2),
])
def test_the_parser_cannot_be_exhausted(tmp_path, text, fragment, line):
    """20,000 nested brackets gave a RecursionError traceback; aliases can expand to gigabytes."""
    [p] = problems(text, tmp_path)
    assert fragment in p.message and p.line == line

"""Two use cases in one process (review4 R5): a partner module is loaded from its use case's folder under a name of
that folder, and the code hash covers the file the entry came from, whichever case was touched first."""

from __future__ import annotations

import hashlib
import inspect
import sys
from pathlib import Path

import pytest

from trustcase.flows.provenance import code_closure
from trustcase.registry import RegistryError, bare_name, case_module, resolve
from trustcase.schemas.loading import load_use_case

CASES = Path(__file__).resolve().parents[1] / "use_cases"


def _case(folder: Path, answer: int, sibling: str) -> Path:
    folder.mkdir(parents=True)
    (folder / f"{sibling}.py").write_text(f"ANSWER = {answer}\n")
    (folder / "train.py").write_text(f"import {sibling}\n\n\ndef fit(request):\n    return {sibling}.ANSWER\n")
    return folder


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_folders_each_get_their_own_train_and_their_own_hash(tmp_path, monkeypatch):
    a = _case(tmp_path / "one" / "case", 1, "helper_one")
    b = _case(tmp_path / "two" / "case", 2, "helper_two")  # the same folder name: still two packages
    monkeypatch.syspath_prepend(str(a))
    import train  # noqa: F401  (a bare `train` in sys.modules, as a test or a script importing it leaves)

    try:
        fit_b, fit_a = resolve("train:fit", b), resolve("train:fit", a)
        assert (fit_a(None), fit_b(None)) == (1, 2)
        assert Path(inspect.getfile(fit_a)) == a / "train.py" and Path(inspect.getfile(fit_b)) == b / "train.py"
        names = case_module("train", a), case_module("train", b)
        assert names[0] != names[1] and {bare_name(n) for n in names} == {"train"}
        assert case_module("json", a) == "json" and case_module("train", None) == "train"  # not a file of the folder
        for folder, helper in ((a, "helper_one"), (b, "helper_two")):
            hashed = code_closure([case_module("train", folder)])
            assert hashed == sorted([f"train:{_sha(folder / 'train.py')}", f"{helper}:{_sha(folder / f'{helper}.py')}"])
    finally:
        sys.modules.pop("train", None)


def test_a_case_modules_errors_are_located_as_before(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "train.py").write_text("import not_a_module_anywhere\n")
    (folder / "fine.py").write_text("x = 1\n")
    raised = r"ModuleNotFoundError: No module named 'not_a_module_anywhere' \(.*train.py:1\)"
    with pytest.raises(RegistryError, match="training.entry: importing module 'train' of 'train:fit' raised " + raised):
        resolve("train:fit", folder, "training.entry")
    with pytest.raises(RegistryError, match=r"loader: module 'fine' has no attribute 'load' \(from 'fine:load'\)"):
        resolve("fine:load", folder, "loader")
    assert resolve("fine:x", folder) == 1


def test_the_bundled_cases_in_one_process_resolve_and_hash_their_own_training_script():
    """solar_cells, magnetic_tiles and steel_defects all name `train` in training.entry."""
    from trustcase.flows.assess import _partner_modules

    cases = ("magnetic_tiles", "solar_cells", "steel_defects")
    entries = {c: resolve(load_use_case(CASES / c / "use_case.yaml").training.entry, CASES / c) for c in cases}
    for case in cases:
        assert Path(inspect.getfile(entries[case])) == CASES / case / "train.py"
        uc = load_use_case(CASES / case / "use_case.yaml")
        hashed = dict(h.split(":") for h in code_closure(_partner_modules(uc)))
        assert hashed["train"] == _sha(CASES / case / "train.py"), case

"""Only the loader's path parameters are resolved against the use-case file (issue 28): `mode: tests` run from a
folder holding tests/ is a value, not a misplaced path; `split: train` beside a folder train/ stays 'train'."""

from __future__ import annotations

import textwrap
from pathlib import Path

from conftest import folder_use_case, write_yaml

from trustcase.schemas import load_use_case
from trustcase.schemas.loading import path_parameters

LOADER = textwrap.dedent('''
    from pathlib import Path

    def load(split: str, mode: str, data_dir: Path, split_name: str = "x", root: str = ".", size: int = 4):
        raise NotImplementedError
''')


def test_path_parameters_are_read_from_the_signature():
    def f(split: str, mode: str, data_dir: Path, images: Path | None = None, root: str = ".", file=None,
          count: int = 0, folder_name: str = ""):
        pass

    assert path_parameters(f) == {"data_dir", "images", "root", "file"}


def test_only_path_parameters_are_resolved_beside_the_yaml(tmp_path, monkeypatch):
    case = tmp_path / "case"
    (case / "imgs").mkdir(parents=True)
    (case / "train").mkdir()
    (case / "loader_pp28.py").write_text(LOADER)
    raw = folder_use_case(case)
    raw["data"].update(loader="loader_pp28:load", path=str(case),
                       params={"mode": "tests", "data_dir": "imgs", "split_name": "train", "root": "train"})
    path = write_yaml(case / "uc.yaml", raw)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "tests").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # a tests/ under the working directory: 'mode: tests' is no path
    params = load_use_case(path).data.params
    assert params["mode"] == "tests" and params["split_name"] == "train"  # values, left as written
    assert params["data_dir"] == str((case / "imgs").resolve()) and params["root"] == str((case / "train").resolve())

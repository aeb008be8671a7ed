"""The site's secret salt (flows/confidential.py): made whole before any process can read it, never empty."""

from __future__ import annotations

import os
import re

import pytest

from trustcase.errors import UserError
from trustcase.flows import confidential


def test_a_new_salt_is_whole_private_and_stable(tmp_path, monkeypatch):
    monkeypatch.delenv("TRUSTCASE_SALT", raising=False)
    s = confidential.salt(tmp_path)
    path = tmp_path / "secrets" / "site.salt"
    assert re.fullmatch(r"[0-9a-f]{64}", s)
    assert path.stat().st_mode & 0o777 == 0o600
    assert confidential.salt(tmp_path) == s
    assert os.listdir(path.parent) == ["site.salt"]  # no half-written file left beside it


def test_a_salt_another_process_published_first_is_the_one_used(tmp_path, monkeypatch):
    monkeypatch.delenv("TRUSTCASE_SALT", raising=False)
    real_link = os.link

    def late(src, dst):  # the other process links its whole file in between our check and our link
        (tmp_path / "secrets" / "site.salt").write_text("theirs" * 8)
        return real_link(src, dst)

    monkeypatch.setattr(confidential.os, "link", late)
    assert confidential.salt(tmp_path) == "theirs" * 8
    assert os.listdir(tmp_path / "secrets") == ["site.salt"]


def test_an_empty_salt_file_is_refused_not_used(tmp_path, monkeypatch):
    monkeypatch.delenv("TRUSTCASE_SALT", raising=False)
    path = tmp_path / "secrets" / "site.salt"
    path.parent.mkdir()
    path.write_text("\n")
    with pytest.raises(UserError, match=re.escape(str(path))):
        confidential.salt(tmp_path)


def test_a_file_system_without_hard_links_still_gets_a_whole_salt(tmp_path, monkeypatch):
    monkeypatch.delenv("TRUSTCASE_SALT", raising=False)

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(confidential.os, "link", no_links)
    s = confidential.salt(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{64}", s) and confidential.salt(tmp_path) == s
    assert os.listdir(tmp_path / "secrets") == ["site.salt"]

"""The evidence pack: manifest, verify (every changed, added, removed file named), confidentiality, CLI, MLflow."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest
from test_argument import assessment
from test_report import with_check_output
from typer.testing import CliRunner

from trustcase.cli import app
from trustcase.reports import PackError, build_pack, render, verify_pack
from trustcase.reports.pack import IMAGE_SUFFIXES, MANIFEST, MANIFEST_DIGEST


@pytest.fixture(scope="module")
def public_pack(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("public")
    a = with_check_output(assessment(), folder)
    (folder / "assessment.json").write_text(a.model_dump_json(indent=1))
    return Path(render(a, folder, pdf=False)["pack"])


def rewrite(src: Path, dst: Path, change: dict[str, bytes | None] = None, add: dict[str, bytes] = None) -> Path:
    """A copy of the pack with some files changed (None: removed) or added."""
    change, add = change or {}, add or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = change.get(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)
        for name, data in add.items():
            zout.writestr(name, data)
    return dst


def declare(a, folder: Path, *paths: str, check: str = "adversarial"):
    """The record with more artefacts declared by `check` (files under folder/checks)."""
    from trustcase.reports.pack import sha256_bytes
    from trustcase.schemas import Artefact

    arts = [Artefact(path=p, sha256=sha256_bytes((folder / "checks" / p).read_bytes()), kind="file") for p in paths]
    return a.model_copy(update={"outcomes": [o.model_copy(update={"artefacts": [*o.artefacts, *arts]})
                                             if o.check == check else o for o in a.outcomes]})


def test_pack_holds_the_qualification_evidence(public_pack):
    v = verify_pack(public_pack)
    assert v.ok and v.lines() == []
    names = set(zipfile.ZipFile(public_pack).namelist())
    for required in ["report.html", "argument.json", "argument.gsn.yaml", "assessment.json", "evidence.json",
                     "use_case.yaml", "environment.json", "provenance.json", MANIFEST, MANIFEST_DIGEST,
                     "plots/trust_profile.png", "plots/gsn_overview.svg", "checks/adversarial/worst_input.png",
                     "checks/adversarial/items.json"]:
        assert required in names, required
    m = v.manifest
    assert m["mlflow_run_id"] == "run1" and m["model_sha256"] == "m" * 64 and m["data_sha256"] == "d" * 64
    assert {f["path"] for f in m["files"]} == names - {MANIFEST, MANIFEST_DIGEST}
    assert v.checked == len(m["files"])
    prov = json.loads(zipfile.ZipFile(public_pack).read("provenance.json"))
    assert prov["mlflow_run_id"] == "run1" and prov["verdict"] == "PASS"
    assert json.loads(zipfile.ZipFile(public_pack).read("environment.json"))["packages"] == {"python": "3.11"}


def test_verify_names_a_one_byte_change_in_any_file(public_pack, tmp_path):
    with zipfile.ZipFile(public_pack) as z:
        names = [n for n in z.namelist()]
        contents = {n: z.read(n) for n in names}
    for n in names:
        data = bytearray(contents[n])
        data[len(data) // 2] ^= 0x01
        v = verify_pack(rewrite(public_pack, tmp_path / "t.zip", change={n: bytes(data)}))
        assert not v.ok, n
        if n == MANIFEST_DIGEST:
            assert MANIFEST in v.changed  # the manifest and its digest disagree
        else:
            assert n in v.changed or (n == MANIFEST and v.problems), (n, v.lines())


def test_verify_names_added_and_removed_files(public_pack, tmp_path):
    v = verify_pack(rewrite(public_pack, tmp_path / "t.zip", change={"report.html": None, "evidence.json": None},
                            add={"extra/notes.txt": b"hello"}))
    assert v.removed == ["evidence.json", "report.html"] and v.added == ["extra/notes.txt"] and v.changed == []
    assert "REMOVED  report.html" in v.lines() and "ADDED    extra/notes.txt" in v.lines()
    v = verify_pack(rewrite(public_pack, tmp_path / "t2.zip", change={MANIFEST: None}))
    assert not v.ok and any("MANIFEST.json is missing" in p for p in v.problems)


def test_damaged_archive_is_caught(public_pack, tmp_path):
    raw = bytearray(public_pack.read_bytes())
    info = zipfile.ZipFile(public_pack).getinfo("report.html")
    raw[info.header_offset + 30 + len("report.html") + 10] ^= 0xFF  # a byte inside the compressed report
    bad = tmp_path / "damaged.zip"
    bad.write_bytes(bytes(raw))
    v = verify_pack(bad)
    assert not v.ok and ("report.html" in v.changed or any("report.html" in p for p in v.problems))
    (tmp_path / "not.zip").write_bytes(b"not a zip at all")
    with pytest.raises(PackError, match="not a readable zip"):
        verify_pack(tmp_path / "not.zip")


def test_confidential_pack_has_no_image_and_hashed_ids(tmp_path):
    a = with_check_output(assessment(confidential=True), tmp_path)
    a.outcomes[0].summary["unreadable"] = {"test": ["secret/cell_42.png"]}
    (tmp_path / "checks" / "adversarial" / "attribution.npy").write_bytes(b"\x93NUMPY fake map")
    (tmp_path / "checks" / "adversarial" / "worst.csv").write_text("item_id,score\ncell_0009.png,0.3\n")
    a = declare(a, tmp_path, "adversarial/attribution.npy", "adversarial/worst.csv")
    files = render(a, tmp_path, pdf=False)
    z = zipfile.ZipFile(files["pack"])
    names = z.namelist()
    assert [n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES] == []
    assert not any(n.endswith(".npy") for n in names)
    everything = b"".join(z.read(n) for n in names)
    for secret in [b"secret/cell_42.png", b"cell_0001.png", b"cell_0007.png", b"cell_0009.png"]:
        assert secret not in everything, secret
    assert re.search(rb"item-[0-9a-f]{16}", z.read("assessment.json"))
    assert b"0.3" in z.read("checks/adversarial/worst.csv")  # only the identifier column is hashed
    m = json.loads(z.read(MANIFEST))
    assert m["confidential"] and {w["path"] for w in m["withheld"]} >= {
        "checks/adversarial/worst_input.png", "checks/adversarial/attribution.npy", "plots/trust_profile.png"}
    assert verify_pack(Path(files["pack"])).ok
    assert "Confidential use case." in z.read("report.html").decode()


def test_cli_verify_exit_codes(public_pack, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(public_pack)])
    assert ok.exit_code == 0 and "internally consistent, not anchored" in ok.output and "intact" not in ok.output
    digest = zipfile.ZipFile(public_pack).read(MANIFEST_DIGEST).decode().split()[0]
    anchored = runner.invoke(app, ["verify", str(public_pack), "--digest", digest])
    assert anchored.exit_code == 0 and "intact, anchored by the recorded digest" in anchored.output
    tampered = rewrite(public_pack, tmp_path / "t.zip", change={"use_case.yaml": b"id: other\n"},
                       add={"x.txt": b"1"})
    bad = runner.invoke(app, ["verify", str(tampered)])
    assert bad.exit_code == 3
    assert "CHANGED  use_case.yaml" in bad.output and "ADDED    x.txt" in bad.output
    missing = runner.invoke(app, ["verify", str(tmp_path / "nope.zip")])
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_pack_from_an_mlflow_run_equals_the_rendered_one(tmp_path, tracking_uri):
    import mlflow

    folder = tmp_path / "run"
    folder.mkdir()
    a0 = assessment()
    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        a = a0.model_copy(update={"provenance": a0.provenance.model_copy(update={"mlflow_run_id": run.info.run_id})})
        a = with_check_output(a, folder)
        (folder / "assessment.json").write_text(a.model_dump_json(indent=1))
        files = render(a, folder, pdf=False)
        mlflow.log_artifacts(str(folder))  # what the flow logs: the whole folder
    runner = CliRunner()
    out = tmp_path / "again.zip"
    res = runner.invoke(app, ["pack", run.info.run_id, "-o", str(out), "--tracking-uri", tracking_uri])
    assert res.exit_code == 0, res.output
    assert "manifest SHA-256" in res.output
    assert out.read_bytes() == Path(files["pack"]).read_bytes()
    res = runner.invoke(app, ["pack", "0" * 32, "-o", str(out), "--tracking-uri", tracking_uri])
    assert res.exit_code == 2 and "no MLflow run" in res.output


def test_entries_are_streamed_with_a_limit(public_pack, tmp_path):
    """Why 6b: a small pack with a huge entry ended in MemoryError; entries are now read in chunks, a listed one
    never beyond its declared size, an unlisted one not at all, a record not beyond the limit."""
    bomb = b"\0" * (64 << 20)  # 64 MiB of zeros: 64 KiB compressed
    swollen = rewrite(public_pack, tmp_path / "swollen.zip", change={"report.html": bomb}, add={"bomb.bin": bomb})
    assert swollen.stat().st_size < 2 << 20
    v = verify_pack(swollen)
    assert "report.html" in v.changed and v.added == ["bomb.bin"]
    big = rewrite(public_pack, tmp_path / "record.zip", change={"assessment.json": bomb})
    v = verify_pack(big, max_entry_bytes=1 << 20)
    assert "assessment.json" in v.changed and any("larger than the limit" in p for p in v.problems)


def test_build_is_deterministic(tmp_path, public_pack):
    folder = public_pack.parent
    a = with_check_output(assessment(), tmp_path)  # same record
    p1, m1 = build_pack(folder, a, tmp_path / "a.zip")
    p2, m2 = build_pack(folder, a, tmp_path / "b.zip")
    assert p1.read_bytes() == p2.read_bytes() and m1 == m2

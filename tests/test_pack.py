"""The evidence pack: manifest, verify (every changed, added, removed file named), confidentiality, CLI, MLflow."""

from __future__ import annotations

import hashlib
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
    # the pack knows no secret: an id the site did not hash is withheld, never hashed with a public salt
    assert b"<id withheld>" in z.read("assessment.json")
    salted = [re.escape(hashlib.sha256(f"{a.provenance.data_sha256}:{i}".encode()).hexdigest()[:16].encode())
              for i in ("secret/cell_42.png", "cell_0001.png", "cell_0009.png")]
    assert not any(re.search(h, everything) for h in salted)
    assert b"0.3" in z.read("checks/adversarial/worst.csv")  # only the identifier column is withheld
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
    assert "assessment.json" in v.changed  # its size in the archive is not the declared one: not read at all


def test_build_is_deterministic(tmp_path, public_pack):
    folder = public_pack.parent
    a = with_check_output(assessment(), tmp_path)  # same record
    p1, m1 = build_pack(folder, a, tmp_path / "a.zip")
    p2, m2 = build_pack(folder, a, tmp_path / "b.zip")
    assert p1.read_bytes() == p2.read_bytes() and m1 == m2


def forge(src: Path, dst: Path, change: dict[str, bytes]) -> Path:
    """A forger's pack, compressed: files rewritten, their sizes and hashes in the manifest, its digest redone."""
    from trustcase.reports.pack import sha256_bytes

    with zipfile.ZipFile(src) as z:
        files = {n: z.read(n) for n in z.namelist()}
    files.update(change)
    m = json.loads(files[MANIFEST])
    for f in m["files"]:
        if f["path"] in change:
            f.update(sha256=sha256_bytes(change[f["path"]]), bytes=len(change[f["path"]]))
    files[MANIFEST] = json.dumps(m, indent=1, sort_keys=True).encode()
    files[MANIFEST_DIGEST] = f"{sha256_bytes(files[MANIFEST])}  {MANIFEST}\n".encode()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as z:
        for n, data in files.items():
            z.writestr(n, data)
    return dst


def test_12_a_zip_bomb_record_is_refused_before_it_is_read(public_pack, tmp_path):
    """Why 12 (issue 24): a 1.6 MB pack holding a 1,000 MiB evidence.json of zeros, its manifest rewritten to
    declare it, took 4.6 GB and ended in MemoryError. Each record is bounded before it is read; exit 3 naming it."""
    import tracemalloc

    from trustcase.reports import pack

    bomb = b"\0" * (pack.MAX_RECORD_BYTES + (16 << 20))
    forged = forge(public_pack, tmp_path / "bomb.zip", {"evidence.json": bomb})
    assert forged.stat().st_size < 2 << 20
    del bomb
    tracemalloc.start()
    try:
        v = verify_pack(forged)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "evidence.json" in v.changed and any(p.startswith("evidence.json: declares") for p in v.problems)
    assert peak < pack.MAX_RECORD_BYTES // 4, peak  # the record was not read at all
    r = CliRunner().invoke(app, ["verify", str(forged)])
    assert r.exit_code == 3 and "evidence.json: declares" in r.output


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


@pytest.mark.parametrize("what, edit, fragment", [
    ("an entry without its sha256", lambda m: m["files"][0].pop("sha256") and None, "is not {path, bytes, sha256}"),
    ("a manifest that is a list", lambda m: [m], "expected an object with a list of files"),
    ("files that are strings", lambda m: {**m, "files": [f["path"] for f in m["files"]]}, "files[0] is not"),
    ("a size that is not a number", lambda m: m["files"][0].update(bytes="12"), "files[0] is not"),
])
def test_a_malformed_manifest_fails_verification_without_a_crash(public_pack, tmp_path, what, edit, fragment):
    """Issue 24 (smaller): a manifest missing `sha256`, or a list instead of an object: internal errors."""
    from trustcase.reports.pack import sha256_bytes

    with zipfile.ZipFile(public_pack) as z:
        m = json.loads(z.read(MANIFEST))
    changed = edit(m)
    body = json.dumps(m if changed is None else changed).encode()
    bad = rewrite(public_pack, tmp_path / "m.zip",
                  change={MANIFEST: body, MANIFEST_DIGEST: f"{sha256_bytes(body)}  {MANIFEST}\n".encode()})
    r = CliRunner().invoke(app, ["verify", str(bad)])
    assert r.exit_code == 3 and fragment in r.output, (what, r.output)


@pytest.mark.parametrize("record, data, fragment", [
    ("assessment.json", b"[1, 2]", "assessment.json: expected a JSON object, found list"),
    ("assessment.json", deep(100_000), "assessment.json: not valid JSON (RecursionError"),
    ("assessment.json", b'{"verdict": "PASS"}', "assessment.json: not an assessment record"),
    ("provenance.json", b'"PASS"', "provenance.json: expected a JSON object, found str"),
    ("evidence.json", b"[1]", "evidence.json: expected a list of objects"),
    (MANIFEST, deep(100_000), "is not a valid manifest: not valid JSON (RecursionError"),
])
def test_a_malformed_record_fails_verification_without_a_crash(public_pack, tmp_path, record, data, fragment):
    """Issue 24 (smaller): a record that is a list, or 100,000-deep JSON: internal errors."""
    if record == MANIFEST:
        from trustcase.reports.pack import sha256_bytes

        bad = rewrite(public_pack, tmp_path / "r.zip",
                      change={MANIFEST: data, MANIFEST_DIGEST: f"{sha256_bytes(data)}  {MANIFEST}\n".encode()})
    else:
        bad = forge(public_pack, tmp_path / "r.zip", {record: data})
    r = CliRunner().invoke(app, ["verify", str(bad)])
    assert r.exit_code == 3 and fragment in r.output, r.output


def test_a_symbolic_link_entry_is_never_intact(public_pack, tmp_path):
    """Issue 24 (smaller): a symlink-type entry passed as "consistent"."""
    link = forge(public_pack, tmp_path / "link.zip", {})
    with zipfile.ZipFile(link) as z:
        files = {i.filename: (i, z.read(i)) for i in z.infolist()}
    with zipfile.ZipFile(link, "w") as z:
        for name, (info, data) in files.items():
            if name == "use_case.yaml":
                info.external_attr = (0o120777 << 16)
            z.writestr(info, data)
    r = CliRunner().invoke(app, ["verify", str(link)])
    assert r.exit_code == 3 and "use_case.yaml: a symbolic link entry" in r.output, r.output

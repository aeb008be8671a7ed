"""`trustcase explore`: every endpoint and every error through FastAPI's test client, on a real MLflow store holding a
real assessment (Prefect flow) of the tiny CNN trained on real ELPV cells; results checked against direct calls of
the science. The real-browser test lives in test_explore_browser.py."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import folder_use_case, save_png, tiny_use_case, write_yaml
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from trustcase.checks import REGISTRY
from trustcase.cli import app as cli_app
from trustcase.explain import attribution as A
from trustcase.explain import imaging
from trustcase.explore import Lab, Store, build, create_app
from trustcase.explore.lab import MAX_UPLOAD_BYTES
from trustcase.robustness.perturbations import PERTURBATIONS, get
from trustcase.schemas import CheckOutcome, MethodStanding, load_use_case
from trustcase.seeding import item_seeds

LAB = "http://127.0.0.1:8765"  # the lab answers only to the names it was started for (Host header)


@pytest.fixture(scope="module")
def assessed(tmp_path_factory, tiny_model, prefect_harness):
    """(use-case path, tracking URI, run id): the tiny case assessed by the real flow, with an ODD monitor and
    HUDD clusters among its artefacts."""
    from trustcase.flows.assess import assess

    folder = tmp_path_factory.mktemp("explore")
    raw = tiny_use_case(folder, tiny_model)
    measured = ("R1", "R2", "R3", "R4", "R5", "O1", "O2", "O3", "D1", "D2")  # claims of the checks planned here
    raw["requirements"] = [r for r in raw["requirements"] if r["id"].split("-")[0] in measured]
    raw["plan"]["checks"] += [{"check": "odd_monitor", "params": {"perturbations": {"gaussian_blur": [2.0]}}},
                              {"check": "root_causes", "params": {"k": 2}},
                              {"check": "explainability", "params": {
                                  "methods": ["saliency", "integrated_gradients"], "items": 8, "gallery": 1,
                                  "sensitivity_items": 0, "options": {"integrated_gradients": {"n_steps": 8}}}}]
    path = write_yaml(folder / "use_case.yaml", raw)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    r = assess(str(path), str(folder / "out"), None, uri)
    assert r.complete, r.errors
    return path, uri, r.run_id


@pytest.fixture(scope="module")
def client(assessed, tmp_path_factory):
    path, uri, _ = assessed
    web, note = build(path, uri, cache=tmp_path_factory.mktemp("cache"))
    assert "last assessment" in note
    with TestClient(web, base_url=LAB) as c:
        yield c


def wait(c: TestClient, job: dict, seconds: float = 60) -> dict:
    end = time.time() + seconds
    while job["state"] in ("queued", "running") and time.time() < end:
        time.sleep(0.02)
        job = c.get(f"/api/jobs/{job['id']}").json()
    return job


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# --- runs ---------------------------------------------------------------------------------------

def test_runs_claims_evidence_and_files(client, assessed):
    _, _, run_id = assessed
    page = client.get("/runs")
    assert page.status_code == 200 and run_id[:12] in page.text and "solar_cells" in page.text
    assert "unregistered" in page.text and ("PASS" in page.text or "FAIL" in page.text or "INCONCLUSIVE" in page.text)
    run = client.get(f"/runs/{run_id}")
    assert run.status_code == 200 and f"/runs/{run_id}/claims/R1-accuracy" in run.text
    assert f"/runs/{run_id}/files/report.pdf" in run.text
    claim = client.get(f"/runs/{run_id}/claims/R5-blur")  # a perturbation claim: its sweep curve is drawn
    assert claim.status_code == 200 and "<svg" in claim.text and "gaussian_blur" in claim.text
    assert "clopper-pearson" in claim.text.lower()
    html = client.get(f"/runs/{run_id}/files/report.html")
    assert html.status_code == 200 and "R1-accuracy" in html.text
    assert client.get(f"/runs/{run_id}/files/report.pdf").content[:4] == b"%PDF"
    assert client.get(f"/runs/{run_id}/files/pack.zip").content[:2] == b"PK"

    # errors name the problem, as a page for a browser and as JSON for a script
    missing = client.get("/runs/0123456789abcdef", headers={"accept": "text/html"})
    assert missing.status_code == 404 and "no MLflow run" in missing.text and "<h1>" in missing.text
    assert "no claim 'NOPE'" in client.get(f"/runs/{run_id}/claims/NOPE").json()["detail"]
    assert client.get(f"/runs/{run_id}/files/..%2F..%2Fetc%2Fpasswd").status_code in (400, 404)
    assert client.get(f"/runs/{run_id}/files/nothing.txt").status_code == 404


# --- the lab --------------------------------------------------------------------------------------

def test_the_lab_reads_what_an_assessment_validated_from_typed_outcome_parts(assessed, tmp_path):
    """Methods' standing and options, the monitor and the HUDD clusters come from the outcomes' typed parts
    (`methods`, artefact kinds), whichever check wrote them: a partner's check feeds the lab like a built-in."""
    _, uri, run_id = assessed
    store = Store(uri, tmp_path / "cache")
    a = store.assessment(run_id)
    ranked = next(o for o in a.outcomes if o.check == "explainability").methods
    assert {m.method for m in ranked} == {"saliency", "integrated_gradients"}
    assert next(m for m in ranked if m.method == "integrated_gradients").options == {"n_steps": 8}
    assert {art.kind for o in a.outcomes for art in o.artefacts} >= {"monitor", "clusters"}
    partner = CheckOutcome(check="partner_explanations", methods=[
        MethodStanding(method="occlusion", status="warned", reasons=["too coarse"], options={"window": 4})])
    store._records[run_id] = a.model_copy(update={"outcomes": [
        o for o in a.outcomes if o.check != "explainability"] + [partner]})
    rt = store.runtime_files(run_id)
    assert rt.methods == {"occlusion": {"status": "warned", "reasons": ["too coarse"], "options": {"window": 4}}}
    assert rt.monitor is not None and rt.clusters


def test_lab_lists_what_the_registries_hold(client):
    info = client.get("/api/lab").json()
    assert [m["name"] for m in info["methods"]] == list(A.METHODS)
    assert [p["name"] for p in info["perturbations"]] == list(PERTURBATIONS)
    assert info["checks"] == sorted(REGISTRY)
    ig = next(m for m in info["methods"] if m["name"] == "integrated_gradients")
    n_steps = next(o for o in ig["options"] if o["name"] == "n_steps")
    assert n_steps["default"] == 8 and n_steps["type"] == "integer" and n_steps["min"] == 1  # as assessed
    assert ig["assessment"]["status"] in ("recommended", "warned")
    assert next(m for m in info["methods"] if m["name"] == "occlusion")["assessment"] is None
    assert info["monitor"] == "the monitor fitted by the last assessment"
    assert info["subgroups"]["cell_type"] == ["mono", "poly"] and info["clusters"]
    assert info["layers"] and all(r["channels"] > 0 for r in info["layers"])
    assert client.get("/lab").status_code == 200
    assert client.get("/", follow_redirects=False).headers["location"] == "/runs"
    js = client.get("/static/lab.js")
    assert js.status_code == 200 and "http://" not in js.text and "https://" not in js.text  # no other origin


def test_items_filter_and_match_the_model(client, assessed):
    everything = client.get("/api/items?limit=500").json()
    n = everything["total"]
    assert n == 100 and len(everything["items"]) == n
    right = client.get("/api/items?correct=true&limit=500").json()["total"]
    wrong = client.get("/api/items?correct=false&limit=500").json()
    assert right + wrong["total"] == n and all(not r["correct"] for r in wrong["items"])
    defective = client.get("/api/items?cls=defective&limit=500").json()["items"]
    assert defective and all(r["label"] == 1 for r in defective)
    mono = client.get("/api/items?subgroup=cell_type=mono&limit=500").json()["items"]
    assert mono and all(r["meta"]["cell_type"] == "mono" for r in mono)
    states = {s: client.get(f"/api/items?decision={s}&limit=500").json()["total"] for s in ("IN", "NEAR", "OUT")}
    assert sum(states.values()) == n
    clustered = [r for r in everything["items"] if r["cluster"] is not None]
    assert clustered and all(not r["correct"] for r in clustered)  # HUDD clusters the errors
    c0 = client.get(f"/api/items?cluster={clustered[0]['cluster']}&limit=500").json()["items"]
    assert c0 and all(r["cluster"] == clustered[0]["cluster"] for r in c0)
    page = client.get("/api/items?offset=10&limit=5").json()["items"]
    assert [r["item"] for r in page] == [10, 11, 12, 13, 14]

    # the prediction shown is the model's, computed directly
    uc = load_use_case(assessed[0])
    lab = Lab(uc)
    x = lab.input("test:3").pixels
    direct = torch.softmax(torch.from_numpy(lab.model.logits(x[None].astype(np.float32))), 1)[0].numpy()
    look = client.get("/api/look?src=test:3").json()
    assert np.allclose(list(look["probabilities"].values()), direct, atol=1e-6)
    assert look["prediction"] == uc.model.class_names[int(direct.argmax())]
    assert look["decision"]["state"] == everything["items"][3]["decision"]
    img = Image.open(io.BytesIO(client.get("/api/image.png?src=test:3").content))
    assert img.size == (32, 32)

    for url, status, words in [("/api/items?subgroup=cell_type", 400, "descriptor=value"),
                               ("/api/items?decision=MAYBE", 400, "IN, NEAR or OUT"),
                               ("/api/items?limit=0", 400, "limit"),
                               ("/api/items?correct=perhaps", 422, "correct"),
                               ("/api/items?cls=cracked", 422, "unknown class 'cracked'"),
                               ("/api/look?src=test:100", 404, "no test item '100'"),
                               ("/api/look?src=disk:/etc/passwd", 400, "test:<item> or upload:<id>"),
                               ("/api/look?src=upload:feed", 404, "no uploaded image")]:
        r = client.get(url)
        assert r.status_code == status and words in r.json()["detail"], (url, r.text)


def test_attribution_is_the_direct_call_and_errors_are_refused_before_work(client, assessed):
    job = client.post("/api/attributions", json={"src": "test:5", "method": "integrated_gradients",
                                                 "options": {"n_steps": 16}, "target": {"class": "defective"}})
    assert job.status_code == 202
    done = wait(client, job.json())
    assert done["state"] == "done" and done["fraction"] == 1.0 and done["total"] == 18
    res = done["result"]
    assert res["target"] == {"kind": "class", "index": 1} and res["options"]["n_steps"] == 16

    lab = Lab(load_use_case(assessed[0]))
    inp = lab.input("test:5")
    net = A.Network(lab.model)
    x = lab.model.to_input(inp.pixels[None].astype(np.float32))
    a = A.attribute(net, "integrated_gradients", x, 1, 0.0, lab.uc.plan.seed, {"n_steps": 16})
    from trustcase.explore.lab import data_url, png

    assert res["overlay"] == data_url(png(imaging.overlay(inp.pixels[None], a.heatmap(), lab.uc.model.value_range)[0]))
    assert res["convergence_delta"] == pytest.approx(float(a.delta.abs().max()), abs=1e-6)

    # any method on an internal channel: the layer's channel means are the targets
    layers = client.get("/api/lab").json()["layers"]
    conv = next(r for r in layers if r["kind"] == "Conv2d")
    target = {"kind": "channel", "layer": conv["name"], "channel": 1}
    ch = wait(client, client.post("/api/attributions", json={"src": "test:5", "method": "saliency",
                                                             "target": target}).json())
    assert ch["state"] == "done" and ch["result"]["target"]["layer"] == conv["name"]

    bad = [({"method": "astrology"}, 404, "unknown attribution method 'astrology'"),
           ({"method": "integrated_gradients", "options": {"n_steps": 0}}, 422, "n_steps"),
           ({"method": "integrated_gradients", "options": {"colour": 1}}, 422, "colour"),
           ({"method": "grad_cam", "options": {"layer": "nope"}}, 404, "layer 'nope' does not exist"),
           ({"method": "saliency", "target": {"kind": "channel", "layer": "nope", "channel": 0}}, 404,
            "layer 'nope' does not exist"),
           ({"method": "saliency", "target": {"kind": "channel", "layer": conv["name"], "channel": 999}}, 422,
            "channel 999"),
           ({"method": "saliency", "target": {"class": "cracked"}}, 422, "unknown class 'cracked'"),
           ({"method": "saliency", "target": {"kind": "neuron"}}, 422, "target.kind"),
           ({"method": "saliency", "baseline": "grey"}, 422, "baseline"),
           ({"method": "saliency", "src": "test:999"}, 404, "no test item"),
           # options that do not fit the model's input: refused with the request, never a failed job
           ({"method": "occlusion", "options": {"window": 64}}, 422, "occlusion window 64 px is larger than the image")]
    for extra, status, words in bad:
        r = client.post("/api/attributions", json={"src": "test:5", **extra})
        assert r.status_code == status and words in r.json()["detail"], (extra, r.text)
    assert client.get("/api/jobs/0000").status_code == 404 and client.post("/api/jobs/0000/cancel").status_code == 404
    # a long poll on the POST itself: a quick job answers in one round trip; the wait is bounded
    quick = client.post("/api/attributions?wait=10", json={"src": "test:5", "method": "saliency"})
    assert quick.status_code == 202 and quick.json()["state"] == "done" and quick.json()["result"]["overlay"]
    assert client.post("/api/attributions?wait=99", json={"src": "test:5", "method": "saliency"}).status_code == 422


def test_class_and_channel_visualisation_is_the_science(client, assessed):
    from trustcase.explain.visualisation import visualise

    done = wait(client, client.post("/api/visualisations", json={"target": {"class": "defective"}, "steps": 8}).json())
    assert done["state"] == "done" and done["done"] == done["total"] == 8
    lab = Lab(load_use_case(assessed[0]))
    direct = visualise(A.Network(lab.model), [1], steps=8, seed=lab.seed)[0]
    assert done["result"]["image"] == "data:image/png;base64," + __import__("base64").b64encode(
        lab.picture(direct)).decode()
    conv = next(r for r in client.get("/api/lab").json()["layers"] if r["kind"] == "Conv2d")
    unit = {"kind": "channel", "layer": conv["name"], "channel": 0, "position": [1, 1]}
    assert wait(client, client.post("/api/visualisations", json={"target": unit, "steps": 4}).json())["state"] == "done"
    for body, status, words in [({"target": {"kind": "channel", "layer": "nope", "channel": 0}}, 404,
                                 "layer 'nope' does not exist"),
                                ({"target": {**unit, "position": [99, 0]}}, 422, "position (99, 0)"),
                                ({"steps": 0}, 422, "steps")]:
        r = client.post("/api/visualisations", json=body)
        assert r.status_code == status and words in r.json()["detail"], (body, r.text)


def test_a_cancelled_computation_stops_and_does_not_block_others(client):
    # (Riemann steps: Gauss-Legendre nodes for 10,000 steps take long to compute before any evaluation)
    job = client.post("/api/attributions", json={"src": "test:1", "method": "integrated_gradients",
                                                 "options": {"n_steps": 10_000, "method": "riemann_trapezoid"}}).json()
    end = time.time() + 60
    while (job["state"] == "queued" or (job["state"] == "running" and job["done"] == 0)) and time.time() < end:
        job = client.get(f"/api/jobs/{job['id']}").json()
    assert job["state"] == "running" and 0 < job["fraction"] < 1
    look = client.get("/api/look?src=test:2")  # answered while the long job runs
    assert look.status_code == 200
    assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "running"
    cancelled = client.post(f"/api/jobs/{job['id']}/cancel").json()
    end = wait(client, cancelled, 30)
    assert end["state"] == "cancelled" and "result" not in end
    time.sleep(0.3)
    after = client.get(f"/api/jobs/{job['id']}").json()
    assert after["done"] == end["done"] < 10_000  # it stopped: no more evaluations counted


def test_perturbation_slider_is_the_perturbation_and_the_model(client, assessed):
    lab = Lab(load_use_case(assessed[0]))
    inp = lab.input("test:7")
    zero = client.post("/api/perturb", json={"src": "test:7", "name": "gaussian_blur", "amplitude": 0}).json()
    assert zero["probabilities"] == client.get("/api/look?src=test:7").json()["probabilities"]
    r = client.post("/api/perturb", json={"src": "test:7", "name": "dead_columns", "amplitude": 3}).json()
    p = get("dead_columns", lab.uc.model.value_range)
    x = p.apply(inp.pixels[None].astype(np.float32), 3, item_seeds(lab.seed, "lab", [inp.name], "dead_columns"))[0]
    assert r["image"] == "data:image/png;base64," + __import__("base64").b64encode(lab.picture(x)).decode()
    direct = torch.softmax(torch.from_numpy(lab.model.logits(x[None])), 1)[0].numpy()
    assert np.allclose(list(r["probabilities"].values()), direct, atol=1e-6)
    assert r["decision"]["state"] in ("IN", "NEAR", "OUT") and r["unit"] == p.unit
    for body, status, words in [({"name": "fog", "amplitude": 1}, 404, "unknown perturbation 'fog'"),
                                ({"name": "gaussian_blur", "amplitude": -1}, 422, "outside"),
                                ({"name": "dead_columns", "amplitude": 1.5}, 422, "whole number"),
                                ({"name": "brightness", "amplitude": 0.1, "options": {"direction": "sideways"}}, 422,
                                 "direction"),
                                ({"name": "gaussian_blur"}, 422, "amplitude")]:
        r = client.post("/api/perturb", json={"src": "test:7", **body})
        assert r.status_code == status and words in r.json()["detail"], (body, r.text)


def test_prove_it_on_a_cnn_runs_the_checks_decision(client):
    """A CNN goes through the layer graph like the local_robustness check (it once answered "Conv2d is not
    supported"): a verdict with how it was reached."""
    r = client.post("/api/proofs", json={"src": "test:0", "radius": 0.001, "timeout": 1})
    assert r.status_code == 202, r.text
    done = wait(client, r.json())
    assert done["state"] == "done", done
    assert done["result"]["verdict"] in ("verified", "falsified", "unknown") and done["result"]["method"]
    for body, words in [({"radius": 0}, "radius"), ({"radius": 0.01, "timeout": 1e6}, "time budget")]:
        r = client.post("/api/proofs", json={"src": "test:0", **body})
        assert r.status_code == 422 and words in r.json()["detail"]


def test_prove_it_gives_the_exact_answer_on_a_relu_network(tmp_path):
    """f(u) = [0.5, mean(u)] on 4x4 grey cells scaled to [0, 1]: an all-0.8 cell is class 1 with margin 0.3, so
    the L-inf ball of radius r is robust exactly when r < 0.3."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].weight[1] = 1 / 16
        net[1].bias.copy_(torch.tensor([0.5, 0.0]))
        net[3].weight.copy_(torch.eye(2))
        net[3].bias.zero_()
    model = tmp_path / "relu.pt"
    torch.jit.trace(net.eval(), torch.zeros(1, 1, 4, 4)).save(str(model))
    for cls, value in (("ok", 50), ("bad", 204)):
        save_png(tmp_path / "test" / cls / "a.png", np.full((4, 4), value, np.uint8))
    raw = folder_use_case(tmp_path, size=4)
    raw["model"].update(path=str(model), normalisation={"mean": [0.0], "std": [1.0]})
    raw["data"]["splits"] = {"test": "test"}
    lab = Lab(load_use_case(write_yaml(tmp_path / "uc.yaml", raw)))
    with TestClient(create_app(lab, None), base_url=LAB) as c:
        bright = next(r["item"] for r in c.get("/api/items").json()["items"] if r["label"] == 1)
        answers = {}
        for radius in (0.1, 0.29, 0.31, 0.5):
            job = c.post("/api/proofs", json={"src": f"test:{bright}", "radius": radius, "timeout": 5})
            assert job.status_code == 202
            done = wait(c, job.json())
            assert done["state"] == "done", done
            answers[radius] = done["result"]["verdict"]
    assert answers == {0.1: "verified", 0.29: "verified", 0.31: "falsified", 0.5: "falsified"}


# --- uploads and bad input ------------------------------------------------------------------------

def test_uploads_and_every_bad_file(client):
    cell = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    ok = client.post("/api/uploads?name=mine.png", content=png_bytes(cell))
    assert ok.status_code == 201
    look = client.get(f"/api/look?src={ok.json()['src']}").json()
    assert look["label"] is None and look["name"] == "mine.png"
    assert any("cell_type" in r for r in look["decision"]["reasons"])  # metadata unknown for an upload
    assert sum(look["probabilities"].values()) == pytest.approx(1, abs=1e-5)

    big = client.post("/api/uploads?resize=true", content=png_bytes(np.zeros((96, 80), np.uint8)))
    assert big.status_code == 201

    huge = io.BytesIO()
    Image.new("L", (5000, 5000)).save(huge, format="PNG")  # compresses to a few kB: refused by its header
    for data, status, words in [(b"GIF? no, text", 415, "not an image"),
                                (b"", 400, "empty upload"),
                                (png_bytes(np.zeros((32, 32, 3), np.uint8)), 422, "3 channel(s)"),
                                (png_bytes(np.zeros((31, 32), np.uint8)), 422, "32x31 px, the model takes 32x32"),
                                (huge.getvalue(), 413, "5000x5000"),
                                (b"\0" * (MAX_UPLOAD_BYTES + 1), 413, "larger than the limit")]:
        r = client.post("/api/uploads", content=data)
        assert r.status_code == status and words in r.json()["detail"], (status, r.text)
    assert client.get("/api/lab").status_code == 200  # still serving


def test_confidential_images_go_to_the_local_user_only(assessed, tmp_path):
    path, uri, _ = assessed
    raw = load_use_case(path).model_dump(mode="json")
    raw["confidentiality"] = "confidential"
    secret = write_yaml(tmp_path / "secret.yaml", raw)
    web, _ = build(secret, uri, cache=tmp_path / "cache")
    local, remote = (TestClient(web, client=("127.0.0.1", 5000), base_url=LAB),
                     TestClient(web, client=("10.1.2.3", 5000), base_url=LAB))
    img = local.get("/api/image.png?src=test:0")
    assert img.status_code == 200 and img.headers["cache-control"] == "no-store"
    denied = remote.get("/api/image.png?src=test:0")
    assert denied.status_code == 403 and "local user only" in denied.json()["detail"]
    body = {"src": "test:0", "method": "saliency"}
    assert remote.post("/api/attributions", json=body).status_code == 403
    assert remote.post("/api/perturb", json={"src": "test:0", "name": "gamma", "amplitude": 0.1}).status_code == 403
    seen = remote.get("/api/look?src=test:0")  # numbers, no image, no file name
    assert seen.status_code == 200 and seen.json()["name"] == "test:0"
    assert remote.get("/api/items?limit=1").json()["items"][0]["id"] == "item 0"
    assert local.get("/api/items?limit=1").json()["items"][0]["id"].endswith(".png")


def test_token_off_loopback(assessed, tmp_path):
    path, uri, _ = assessed
    web, _ = build(None, uri, token="s3cret", cache=tmp_path / "cache")
    with TestClient(web, base_url=LAB) as c:
        assert c.get("/runs").status_code == 401 and c.get("/runs?token=wrong").status_code == 401
        first = c.get("/runs?token=s3cret")
        assert first.status_code == 200 and "trustcase_token" in first.headers["set-cookie"]
        assert c.get("/runs").status_code == 200  # the cookie carries it from now on
        assert c.get("/lab").status_code == 404  # no use case given: runs only
    assert "default-src 'self'" in first.headers["content-security-policy"]


def test_artefacts_are_cached_under_the_working_directory(assessed, tmp_path):
    _, uri, run_id = assessed
    store = Store(uri, tmp_path / ".trustcase" / "explore")
    got = store.file(run_id, "evidence.json")
    assert got.is_relative_to(tmp_path) and got.is_file()
    assert store.last("solar_cells") == run_id


def test_cli_refuses_to_listen_beyond_loopback_without_a_token(tmp_path):
    r = CliRunner().invoke(cli_app, ["explore", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "--token" in r.output
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = CliRunner().invoke(cli_app, ["explore", "--port", str(s.getsockname()[1])])
        assert r.exit_code == 2 and "cannot listen" in r.output
        free = s.getsockname()[1]
    r = CliRunner().invoke(cli_app, ["explore", str(tmp_path / "none.yaml"), "--port", str(free)])
    assert r.exit_code == 2 and "none.yaml" in r.output



# --- a real browser ---------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@contextmanager
def serving(web):
    """The application on a free loopback port, served by uvicorn in a thread."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(web, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="Debian chromium and chromium-driver are not installed (scripts/setup.sh --test)")
def test_in_a_real_browser(assessed, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    path, uri, run_id = assessed
    web, _ = build(path, uri, cache=tmp_path / "cache")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1400,1800", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    with serving(web) as base:
        driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
        until = WebDriverWait(driver, 60).until
        try:
            driver.get(base + "/runs")
            driver.find_element(By.CSS_SELECTOR, f"a[href='/runs/{run_id}']").click()
            until(lambda d: d.find_elements(By.CSS_SELECTOR, "a.claim-link"))
            driver.find_element(By.CSS_SELECTOR, "a.claim-link").click()
            assert until(lambda d: d.find_element(By.ID, "claim-title").text.startswith("R1-accuracy"))
            assert "interval" in driver.find_element(By.ID, "claim-value").text

            driver.find_element(By.ID, "nav-lab").click()
            thumbs = until(lambda d: d.find_elements(By.CSS_SELECTOR, "#items img.thumb"))
            assert len(thumbs) == 60
            everything = driver.find_element(By.ID, "items-count").text
            Select(driver.find_element(By.NAME, "correct")).select_by_value("false")  # filter: errors only
            until(lambda d: d.find_element(By.ID, "items-count").text != everything)
            wrong = driver.find_elements(By.CSS_SELECTOR, "#items img.thumb")
            assert wrong and all("wrong" in t.get_attribute("class") for t in wrong)
            wrong[0].click()
            assert until(lambda d: d.find_element(By.ID, "prediction").text) in ("functional", "defective")
            assert driver.find_element(By.ID, "decision").text in ("IN", "NEAR", "OUT")

            Select(driver.find_element(By.ID, "method")).select_by_value("integrated_gradients")
            driver.find_element(By.ID, "run-attribution").click()
            overlay = until(lambda d: d.find_element(By.ID, "attribution-map").is_displayed()
                            and d.find_element(By.ID, "attribution-map"))
            assert overlay.get_attribute("src").startswith("data:image/png;base64,")
            assert "integrated_gradients" in driver.find_element(By.ID, "attribution-info").text

            Select(driver.find_element(By.ID, "perturbation")).select_by_value("gaussian_blur")
            until(lambda d: d.find_element(By.ID, "perturbed-prediction").text)
            before = driver.find_element(By.ID, "perturbed").get_attribute("src")
            driver.find_element(By.ID, "amplitude").send_keys(*[Keys.ARROW_RIGHT] * 20)
            until(lambda d: d.find_element(By.ID, "perturbed").get_attribute("src") != before)
            assert driver.find_element(By.ID, "perturbed-prediction").text in ("functional", "defective")
            assert float(driver.find_element(By.ID, "amplitude-value").text.split()[0]) > 0

            # a bad parameter: refused by the server, the reason shown on the page
            Select(driver.find_element(By.ID, "method")).select_by_value("grad_cam")
            driver.find_element(By.CSS_SELECTOR, "[data-option=layer]").send_keys("nope")
            driver.find_element(By.ID, "run-attribution").click()
            assert "layer 'nope' does not exist" in until(lambda d: d.find_element(By.ID, "error").is_displayed()
                                                          and d.find_element(By.ID, "error").text)

            # a long computation shows progress and stops when cancelled
            Select(driver.find_element(By.ID, "method")).select_by_value("integrated_gradients")
            steps = driver.find_element(By.CSS_SELECTOR, "[data-option=n_steps]")
            steps.clear()
            steps.send_keys("10000")
            Select(driver.find_element(By.CSS_SELECTOR, "select[data-option=method]")).select_by_value(
                "riemann_trapezoid")
            driver.find_element(By.ID, "run-attribution").click()
            until(lambda d: d.find_element(By.ID, "attribution-state").text.startswith("running"))
            driver.find_element(By.ID, "cancel-attribution").click()
            until(lambda d: d.find_element(By.ID, "attribution-state").text.startswith("cancelled"))

            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "/api/" not in e["message"]]
            urls = [json.loads(e["message"])["message"]["params"]["request"]["url"]
                    for e in driver.get_log("performance") if '"Network.requestWillBeSent"' in e["message"]]
        finally:
            driver.quit()
    assert not errors, errors
    network = [u for u in urls if not u.startswith(("chrome:", "data:", "blob:"))]  # browser-internal pages aside
    assert any(u.startswith(base + "/api/attributions") for u in network)
    assert all(u.startswith(base + "/") for u in network), [u for u in network if not u.startswith(base + "/")]

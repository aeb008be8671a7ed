"""Benchmark: the lab's overhead over the science, measured over real HTTP on the bundled solar-cell model (64x64).

    .venv/bin/python bench/bench_explore.py [--quick]

The application (`trustcase explore`, uvicorn in a thread, loopback) answers an httpx client in the same process:
1. Request to rendered map for saliency and integrated gradients (n_steps 32) on one 64x64 cell: POST the job
   with a long poll (`?wait=`), receive the overlay PNG; against a direct call of the same method
   (`attribution.attribute`). Overhead = lab - direct, medians (target < 50 ms).
2. One perturbation-slider step (POST /api/perturb: perturb, predict, monitor, PNG): median and p95 (target
   < 100 ms).
3. Latency of a short request (prediction + monitor, and a slider step) while another user's long integrated
   gradients (n_steps 10,000, Riemann) runs, against the same requests on an idle server (ratio; the long job runs on
   its own pool, so the short request waits for no one).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trustcase.explain import attribution as A  # noqa: E402
from trustcase.explore import build  # noqa: E402

USE_CASE = ROOT / "use_cases" / "solar_cells" / "use_case.yaml"


def serve(web) -> tuple[str, uvicorn.Server]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(web, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def ms(x: float) -> str:
    return f"{1000 * x:8.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args()
    repeats = 5 if args.quick else 30
    if not (ROOT / "use_cases" / "solar_cells" / "artefacts" / "solar_cnn.pt").is_file():
        sys.exit("the bundled model is missing: run `trustcase demo` (or make demo) first")

    with tempfile.TemporaryDirectory() as tmp:
        web, _ = build(USE_CASE, f"sqlite:///{tmp}/mlflow.db", cache=Path(tmp) / "cache")
        lab = web.state.lab
        base, server = serve(web)
        client = httpx.Client(base_url=base, timeout=120)
        src = "test:0"
        inp = lab.input(src)
        client.get("/api/items?limit=1").raise_for_status()  # index the split once

        def via_lab(method: str, options: dict) -> dict:
            job = client.post("/api/attributions", params={"wait": 10}, json={  # one round trip when quick
                "src": src, "method": method, "options": options, "target": {"class": "defective"}}).json()
            while job["state"] in ("queued", "running"):
                job = client.get(f"/api/jobs/{job['id']}", params={"wait": 10}).json()
            assert job["state"] == "done", job
            return job

        net = A.Network(lab.model)
        x = lab.model.to_input(inp.pixels[None].astype(np.float32))
        print(f"trustcase explore over HTTP, {lab.uc.id} model {tuple(lab.uc.model.input_shape)}, {repeats} repeats, "
              "medians")
        print("\n1. request -> rendered map vs a direct call of the method")
        print(f"{'method':<22}{'direct':>12}{'lab':>12}{'overhead':>12}")
        for method, options in (("saliency", {}), ("integrated_gradients", {"n_steps": 32})):
            via_lab(method, options)  # warm: the job thread's own copy of the network
            A.attribute(net, method, x, 1, 0.0, 0, options)
            direct = statistics.median(timed(lambda m=method, o=options: A.attribute(net, m, x, 1, 0.0, 0, o),
                                             repeats))
            lab_t = statistics.median(timed(lambda m=method, o=options: via_lab(m, o), repeats))
            print(f"{method:<22}{ms(direct):>12}{ms(lab_t):>12}{ms(lab_t - direct):>12}"
                  f"   {'OK' if lab_t - direct < 0.05 else 'over the 50 ms target'}")

        print("\n2. perturbation slider step (perturb + predict + ODD monitor + PNG)")
        amps = iter(np.tile(np.linspace(0.1, 3.0, 30), 100))

        def step():
            client.post("/api/perturb", json={"src": src, "name": "gaussian_blur",
                                              "amplitude": float(next(amps))}).raise_for_status()

        step()
        steps = timed(step, 3 * repeats)
        p95 = float(np.quantile(steps, 0.95))
        print(f"median {ms(statistics.median(steps))}, p95 {ms(p95)}   "
              f"{'OK' if statistics.median(steps) < 0.1 else 'over the 100 ms target'}")

        print("\n3. a short request while another user's long computation runs")

        def look():
            client.get("/api/look", params={"src": "test:1"}).raise_for_status()

        idle_look, idle_step = statistics.median(timed(look, repeats)), statistics.median(timed(step, repeats))
        long_job = client.post("/api/attributions", json={"src": src, "method": "integrated_gradients",
                                                           "options": {"n_steps": 10_000,
                                                                       "method": "riemann_trapezoid"}}).json()
        while client.get(f"/api/jobs/{long_job['id']}").json()["done"] == 0:
            time.sleep(0.01)
        busy_look, busy_step = statistics.median(timed(look, repeats)), statistics.median(timed(step, repeats))
        state = client.get(f"/api/jobs/{long_job['id']}").json()
        still = state["state"] == "running"
        client.post(f"/api/jobs/{long_job['id']}/cancel")
        print(f"{'request':<26}{'idle':>12}{'busy':>12}{'ratio':>8}")
        print(f"{'prediction + monitor':<26}{ms(idle_look):>12}{ms(busy_look):>12}{busy_look / idle_look:8.2f}")
        print(f"{'slider step':<26}{ms(idle_step):>12}{ms(busy_step):>12}{busy_step / idle_step:8.2f}")
        print(f"(the long job was {'still running' if still else 'already over'} after the busy measurements: "
              f"{state['done']:.0f} of {state['total']:.0f} evaluations)")
        client.close()
        server.should_exit = True
        web.state.jobs.shutdown()


if __name__ == "__main__":
    main()

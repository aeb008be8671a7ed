"""The web application: server-rendered pages over the MLflow store (runs, claims, evidence) and the lab's JSON
API. Short work runs on a small bounded thread pool, long work (attributions, proofs) as cancellable jobs on
another, so the event loop never computes and a long job never blocks a short request."""

from __future__ import annotations

import hmac
import ipaddress
import math
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

from trustcase.checks import REGISTRY
from trustcase.errors import Unsupported, validation_message
from trustcase.explore.jobs import Jobs
from trustcase.explore.lab import MAX_UPLOAD_BYTES, Lab, LabError, data_url
from trustcase.explore.store import Store, StoreError

HERE = Path(__file__).resolve().parent
COOKIE = "trustcase_token"
MAX_JSON_BYTES = 1 << 20  # a request's JSON body (uploads have their own limit): never parsed beyond this
# long poll: answer when the job ends, or after this many seconds
Wait = Annotated[float, Query(ge=0, le=10, description="seconds to wait for the job to end before answering")]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Target(Body):
    kind: Literal["class", "channel"] = "class"
    # "class" accepts a class name or index
    class_: str | None = Field(None, alias="class")
    layer: str | None = None
    channel: int | None = None
    position: list[int] | None = Field(None, description="one unit of the channel, e.g. [row, col]; None: the mean")


class AttributionBody(Body):
    src: str
    method: str
    options: dict[str, Any] = {}
    target: Target = Target()
    baseline: Literal["mean", "black", "white"] = "mean"


class VisualisationBody(Body):
    target: Target = Target()
    steps: int = Field(128, ge=1, le=2000, description="gradient-ascent steps")


class PerturbBody(Body):
    src: str
    name: str
    amplitude: float
    options: dict[str, Any] = {}


class ProofBody(Body):
    src: str
    radius: float = Field(0.001, description="L-inf radius, input scaled to [0, 1]")
    timeout: float = Field(10.0, description="time budget, seconds")


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and (host == "localhost" or ipaddress.ip_address(host).is_loopback)
    except ValueError:
        return False


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def host_names(host: str) -> tuple[str, ...]:
    """The names a request may carry in its Host header for a server bound to `host`: its loopback names, or
    the address it was given (and the machine's own names when it listens on every interface)."""
    if is_loopback(host):
        return LOOPBACK_NAMES
    if host in ("0.0.0.0", "::"):
        import socket

        return (host, socket.gethostname(), socket.getfqdn(), *LOOPBACK_NAMES)
    return (host,)


def _host_name(header: str) -> str:
    """The name of a Host header without its port: `127.0.0.1:8765` -> `127.0.0.1`, `[::1]:80` -> `::1`
    (Starlette's TrustedHostMiddleware splits at the first colon, which refuses every IPv6 loopback)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def create_app(lab: Lab | None, store: Store | None, token: str | None = None, quick_workers: int = 4,
               job_workers: int = 2, hosts: tuple[str, ...] = LOOPBACK_NAMES) -> FastAPI:
    """`lab`: the use case's lab (None: runs only); `store`: the MLflow store (None: lab only); `token`: required
    on every request (query `token` once, then a cookie) when the server listens beyond loopback; `hosts`: the
    only names accepted in the Host header (a page of another site whose name was rebound to 127.0.0.1 sends
    its own name: refused, so it cannot read the lab)."""
    allowed = {h.lower().strip("[]") for h in hosts}
    app = FastAPI(title="trustcase explore", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    pages = Jinja2Templates(directory=HERE / "templates")
    pages.env.filters["when"] = lambda ms: datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
    pages.env.filters["num"] = _num
    pages.env.globals["svg"] = curve_svg
    jobs = Jobs(job_workers)
    quick = anyio.CapacityLimiter(quick_workers)
    app.state.lab, app.state.store, app.state.jobs = lab, store, jobs
    app.router.add_event_handler("shutdown", jobs.shutdown)

    async def off_loop(fn, *args):
        return await anyio.to_thread.run_sync(partial(fn, *args), limiter=quick)

    async def settle(job, wait: float) -> dict:
        """The job's state once it ended, or after `wait` seconds: a long poll."""
        with anyio.move_on_after(wait):
            while job.state in ("queued", "running"):
                await anyio.sleep(0.002)
        return job.view()

    # --- guards and errors ------------------------------------------------------------------------

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if _host_name(request.headers.get("host", "")) not in allowed:
            return JSONResponse({"detail": "unknown Host header: this lab answers only to "
                                           f"{', '.join(sorted(allowed))}"}, 400)
        if request.method == "POST" and request.url.path != "/api/uploads":  # JSON bodies: small, length declared
            size = request.headers.get("content-length", "0" if "transfer-encoding" not in request.headers else "")
            if not size.isdigit() or int(size) > MAX_JSON_BYTES:
                return JSONResponse({"detail": f"a request body must declare its length and hold at most "
                                               f"{MAX_JSON_BYTES:,} bytes of JSON (got {size or 'no length'})"}, 413)
        if token is not None:
            given = request.query_params.get("token") or request.cookies.get(COOKIE) or ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "a valid token is required (open the URL printed by "
                                               "`trustcase explore`, which carries ?token=...)"}, 401)
        response = await call_next(request)
        if token is not None and request.query_params.get("token"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        # nothing from elsewhere, ever (a report's own inline styles and images are allowed, never a fetch out)
        files = request.url.path.startswith("/runs/") and "/files/" in request.url.path
        response.headers["Content-Security-Policy"] = (
            "default-src 'self' 'unsafe-inline' data:; script-src 'none'" if files else
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def error(request: Request, status: int, message: str):
        if request.url.path.startswith("/api/") or "text/html" not in request.headers.get("accept", ""):
            return JSONResponse({"detail": message}, status)
        return pages.TemplateResponse(request, "error.html", {"status": status, "message": message}, status)

    @app.exception_handler(LabError)
    async def lab_error(request, e: LabError):
        return error(request, e.status, str(e))

    @app.exception_handler(StoreError)
    async def store_error(request, e: StoreError):
        return error(request, e.status, str(e))

    @app.exception_handler(Unsupported)
    async def unsupported(request, e: Unsupported):
        return error(request, 422, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return error(request, 422, f"invalid request: {validation_message(e, 'body')}")

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):  # the server keeps serving; the page says what broke
        return error(request, 500, f"internal error: {type(e).__name__}: {e}")

    def need_lab() -> Lab:
        if lab is None:
            raise LabError("no use case loaded: start `trustcase explore USE_CASE.yaml` to open the lab", 404)
        return lab

    def need_store() -> Store:
        if store is None:
            raise StoreError("no MLflow store", 404)
        return store

    def remote_confidential(request: Request) -> bool:
        host = request.client.host if request.client else None
        return lab is not None and lab.uc.confidential and not is_loopback(host)

    def images_allowed(request: Request) -> None:
        if remote_confidential(request):
            raise LabError("confidential use case: images are shown to the local user only", 403)

    def image_headers() -> dict:
        return {"Cache-Control": "no-store"} if lab is not None and lab.uc.confidential else {}

    # --- pages ------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def home():
        return RedirectResponse("/runs" if store is not None else "/lab")

    @app.get("/runs", response_class=HTMLResponse)
    async def runs_page(request: Request):
        runs = await off_loop(need_store().assessments)
        return pages.TemplateResponse(request, "runs.html", {"runs": runs, "uri": store.uri, "lab": lab})

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    async def run_page(request: Request, run_id: str):
        a = await off_loop(need_store().assessment, run_id)
        return pages.TemplateResponse(request, "run.html", {"run_id": run_id, "a": a, "lab": lab,
                                                            "texts": {r.id: r.text for r in a.requirements}})

    @app.get("/runs/{run_id}/claims/{claim_id}", response_class=HTMLResponse)
    async def claim_page(request: Request, run_id: str, claim_id: str):
        a = await off_loop(need_store().assessment, run_id)
        ev = next((e for e in a.evidence if e.claim_id == claim_id), None)
        if ev is None:
            raise StoreError(f"run {run_id} has no claim {claim_id!r}; claims: {[e.claim_id for e in a.evidence]}")
        req = next((r for r in a.requirements if r.id == claim_id), None)
        outcomes = [o for o in a.outcomes if o.check == ev.check]
        return pages.TemplateResponse(request, "claim.html", {"run_id": run_id, "a": a, "e": ev, "req": req,
                                                              "outcomes": outcomes, "lab": lab})

    @app.get("/runs/{run_id}/files/{path:path}")
    async def run_file(run_id: str, path: str):
        local = await off_loop(need_store().file, run_id, path)
        return FileResponse(local)

    @app.get("/lab", response_class=HTMLResponse)
    async def lab_page(request: Request):
        return pages.TemplateResponse(request, "lab.html", {"lab": need_lab()})

    # --- the lab's API ----------------------------------------------------------------------------

    @app.get("/api/lab")
    async def lab_info():
        lb = need_lab()
        layers = await off_loop(lb.layers)
        subgroups = await off_loop(lb.subgroups)
        return {"use_case": lb.uc.id, "title": lb.uc.title, "classes": lb.classes, "role": lb.role,
                "input_shape": list(lb.uc.model.input_shape), "confidential": lb.uc.confidential,
                "methods": lb.methods(), "perturbations": lb.perturbations(), "layers": layers,
                "checks": sorted(REGISTRY), "monitor": lb.monitor_note, "subgroups": subgroups,
                "clusters": sorted({c for c in lb.clusters.values()}), "max_upload_bytes": MAX_UPLOAD_BYTES}

    @app.get("/api/items")
    async def items(request: Request, cls: str | None = None, correct: bool | None = None, subgroup: str | None = None,
                    decision: str | None = None, cluster: int | None = None, offset: int = 0, limit: int = 60):
        lb = need_lab()
        groups = {}
        if subgroup:
            k, sep, v = subgroup.partition("=")
            if not sep:
                raise LabError(f"subgroup {subgroup!r}: expected descriptor=value, e.g. cell_type=mono", 400)
            groups[k] = v
        if decision is not None and decision not in ("IN", "NEAR", "OUT"):
            raise LabError(f"decision {decision!r}: expected IN, NEAR or OUT", 400)
        if not (0 <= offset and 1 <= limit <= 500):
            raise LabError("offset >= 0 and 1 <= limit <= 500", 400)
        rows = await off_loop(partial(lb.items, cls, correct, groups, decision, cluster))
        page = rows[offset:offset + limit]
        if remote_confidential(request):  # item ids name confidential files: the local user only
            page = [{**r, "id": f"item {r['item']}"} for r in page]
        return {"total": len(rows), "items": page}

    @app.get("/api/image.png")
    async def image(request: Request, src: str):
        lb = need_lab()
        images_allowed(request)
        inp = await off_loop(lb.input, src)
        return Response(await off_loop(lb.picture, inp.pixels), media_type="image/png", headers=image_headers())

    @app.post("/api/uploads", status_code=201)
    async def upload(request: Request, resize: bool = False, name: str = ""):
        lb = need_lab()
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
            raise LabError(f"file of {declared} bytes is larger than the limit of {MAX_UPLOAD_BYTES} bytes", 413)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_UPLOAD_BYTES:
                raise LabError(f"upload larger than the limit of {MAX_UPLOAD_BYTES} bytes", 413)
        key = await off_loop(lb.upload, bytes(data), name[:200], resize)
        return {"src": f"upload:{key}"}

    @app.get("/api/look")
    async def look(request: Request, src: str):
        lb = need_lab()
        inp = await off_loop(lb.input, src)
        out = await off_loop(lb.look, inp)
        return {**out, "name": src} if remote_confidential(request) else out

    @app.post("/api/attributions", status_code=202)
    async def attributions(request: Request, body: AttributionBody, wait: Wait = 0.0):
        lb = need_lab()
        images_allowed(request)
        inp = await off_loop(lb.input, body.src)
        target = body.target.model_dump(by_alias=True)
        opts, t = await off_loop(lb.attribution_request, body.method, body.options, target, inp)
        job = jobs.submit("attribution", lambda j: lb.attribute(j, inp, body.method, opts, t, body.baseline),
                          lb.expected_evaluations(opts))
        return await settle(job, wait)

    @app.post("/api/visualisations", status_code=202)
    async def visualisations(request: Request, body: VisualisationBody, wait: Wait = 0.0):
        lb = need_lab()
        images_allowed(request)
        if not lb.net.differentiable:
            raise Unsupported("visualisation climbs the model's gradients; the model is a black box")
        t = await off_loop(lb.target, body.target.model_dump(by_alias=True))
        job = jobs.submit("visualisation", lambda j: lb.visualise(j, t, body.steps),
                          body.steps + (t["kind"] == "channel"))  # a channel is located by one probe first
        return await settle(job, wait)

    @app.post("/api/perturb")
    async def perturb(request: Request, body: PerturbBody):
        lb = need_lab()
        images_allowed(request)
        inp = await off_loop(lb.input, body.src)
        x, out = await off_loop(lb.perturb, inp, body.name, body.amplitude, body.options)
        return {**out, "image": data_url(await off_loop(lb.picture, x))}

    @app.post("/api/proofs", status_code=202)
    async def proofs(body: ProofBody, wait: Wait = 0.0):
        lb = need_lab()
        inp = await off_loop(lb.input, body.src)
        await off_loop(lb.prove_request, body.radius, body.timeout)  # refused now, not in the job
        job = jobs.submit("proof", lambda j: lb.prove(j, inp, body.radius, body.timeout), body.timeout)
        return await settle(job, wait)

    @app.get("/api/jobs/{job_id}")
    async def job_state(job_id: str, wait: Wait = 0.0):
        """`wait`: up to this many seconds for the job to end before answering (long poll; also on every POST that
        starts a job, so a quick job answers in one round trip)."""
        job = jobs.get(job_id)
        if job is None:
            raise LabError(f"no job {job_id!r} (finished jobs are kept for a while only)", 404)
        return await settle(job, wait)

    @app.post("/api/jobs/{job_id}/cancel")
    async def job_cancel(job_id: str):
        job = jobs.get(job_id)
        if job is None:
            raise LabError(f"no job {job_id!r}", 404)
        job.cancel()
        return job.view()

    return app


def _num(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def curve_svg(curve, width: int = 420, height: int = 220) -> str:
    """A check's curve as a small inline SVG: one polyline per series, its band shaded, markers as lines."""
    xs = [float(x) for x in curve.x]
    series = list(curve.series.items())
    ys = [y for _, s in series for y in [*s.y, *(s.lower or []), *(s.upper or [])] if y is not None and y == y]
    if not xs or not ys:
        return ""
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys)), max(1.0, max(ys))
    px = lambda x: 40 + (x - x0) / (x1 - x0) * (width - 60)  # noqa: E731
    py = lambda y: height - 30 - (y - y0) / (y1 - y0) * (height - 50)  # noqa: E731
    colours = ["#1f5fa8", "#c0392b", "#2e8b57", "#8e44ad", "#d35400"]
    parts = [f'<svg class="curve" viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(curve.title)}">',
             f'<line x1="40" y1="{py(y0):.1f}" x2="{width - 20}" y2="{py(y0):.1f}" class="axis"/>',
             f'<line x1="40" y1="{py(y0):.1f}" x2="40" y2="{py(y1):.1f}" class="axis"/>',
             f'<text x="40" y="{height - 8}">{_esc(curve.x_label)}</text>',
             f'<text x="2" y="14">{_esc(curve.y_label)} [{y0:g}, {y1:g}]</text>']
    for name, v in curve.y_marks.items():
        parts.append(f'<line x1="40" x2="{width - 20}" y1="{py(v):.1f}" y2="{py(v):.1f}" class="mark">'
                     f'<title>{_esc(name)} = {v:g}</title></line>')
    for i, (name, s) in enumerate(series):
        c = colours[i % len(colours)]
        if s.lower and s.upper:
            band = [(px(x), py(u)) for x, u in zip(xs, s.upper)] + [(px(x), py(lo)) for x, lo in
                                                                     zip(xs[::-1], s.lower[::-1])]
            parts.append(f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in band)}" fill="{c}" '
                         'opacity="0.15"/>')
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, s.y) if y is not None and y == y)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"><title>{_esc(name)}'
                     f'</title></polyline>')
        parts.append(f'<text x="{width - 150}" y="{20 + 14 * i}" fill="{c}">{_esc(name)}</text>')
    return "".join(parts) + "</svg>"


def _esc(text: str) -> str:
    import html

    return html.escape(str(text))


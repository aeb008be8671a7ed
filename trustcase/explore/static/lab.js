// The lab page: plain JavaScript over the lab's JSON API, every request to this server only.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, src: null, offset: 0, jobs: {}, sliderBusy: false, sliderAgain: false };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = { detail: response.statusText }; }
  if (!response.ok) {
    const message = `${response.status}: ${body.detail || response.statusText}`;
    showError(message);
    throw new Error(message);
  }
  showError("");
  return body;
}

const post = (path, body) => api(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

function el(tag, attrs = {}, text = "") {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text) e.textContent = text;
  return e;
}

function fillProbabilities(table, probabilities) {
  table.replaceChildren();
  for (const [name, p] of Object.entries(probabilities)) {
    const row = el("tr");
    row.append(el("td", {}, name), el("td", {}, p.toFixed(4)));
    const bar = el("td");
    const span = el("span", { class: "bar" });
    span.style.width = `${Math.round(120 * p)}px`;  // CSSOM, not a style attribute: allowed by the page's CSP
    bar.append(span);
    row.append(bar);
    table.append(row);
  }
}

function fillDecision(stateEl, reasonsEl, decision) {
  reasonsEl.replaceChildren();
  if (!decision) { stateEl.textContent = "no monitor"; stateEl.className = ""; return; }
  stateEl.textContent = decision.state;
  stateEl.className = "verdict " + decision.state;
  for (const r of decision.reasons) reasonsEl.append(el("li", {}, r));
}

// --- the test split ---------------------------------------------------------------------------

function filterQuery() {
  const params = new URLSearchParams();
  for (const [k, v] of new FormData($("filters"))) if (v !== "") params.set(k, v);
  return params;
}

async function loadItems(append = false) {
  state.offset = append ? state.offset : 0;
  const params = filterQuery();
  params.set("offset", state.offset);
  params.set("limit", 60);
  const data = await api("/api/items?" + params);
  const grid = $("items");
  if (!append) grid.replaceChildren();
  for (const item of data.items) {
    const fig = el("figure");
    const img = el("img", { src: `/api/image.png?src=test:${item.item}`, class: "thumb" + (item.correct ? "" : " wrong"),
      alt: item.id, title: `${item.id}\nlabel ${state.info.classes[item.label]}, predicted ` +
        `${state.info.classes[item.prediction]} (${item.confidence})` + (item.decision ? `\nODD ${item.decision}` : "") +
        (item.cluster !== null && item.cluster !== undefined ? `\nHUDD cluster ${item.cluster}` : ""),
      "data-src": `test:${item.item}` });
    img.addEventListener("click", () => select(`test:${item.item}`, img));
    fig.append(img);
    grid.append(fig);
  }
  state.offset += data.items.length;
  $("items-count").textContent = `${data.total} item(s) match`;
  $("more").hidden = state.offset >= data.total;
}

async function select(src, img) {
  state.src = src;
  for (const t of document.querySelectorAll(".grid img.selected")) t.classList.remove("selected");
  if (img) img.classList.add("selected");
  const look = await api("/api/look?src=" + encodeURIComponent(src));
  $("current").hidden = false;
  $("current-name").textContent = look.name;
  $("current-image").src = "/api/image.png?src=" + encodeURIComponent(src);
  $("label").textContent = look.label === null ? "unknown (upload)" : look.label;
  $("prediction").textContent = look.prediction;
  $("target-class").value = look.prediction;  // explain the decision taken, unless the user picks another class
  fillProbabilities($("probabilities"), look.probabilities);
  fillDecision($("decision"), $("reasons"), look.decision);
  $("attribution-map").hidden = true;
  $("proof-result").textContent = "";
  await slide();
}

// --- attribution ------------------------------------------------------------------------------

function optionsForm(box, fields) {
  box.replaceChildren();
  for (const f of fields) {
    const label = el("label", { title: f.description || "" }, f.name + " ");
    let input;
    if (f.choices) {
      input = el("select");
      for (const c of f.choices) input.append(el("option", { value: String(c) }, String(c)));
      input.value = f.default;
    } else if (f.type === "boolean") {
      input = el("input", { type: "checkbox" });
      input.checked = !!f.default;
    } else if (f.type === "integer" || f.type === "number") {
      input = el("input", { type: "number", step: f.type === "integer" ? "1" : "any", value: f.default ?? "" });
      if (f.min !== null && f.min !== undefined) input.min = f.min;
      if (f.max !== null && f.max !== undefined) input.max = f.max;
    } else {
      input = el("input", { type: "text", value: f.default ?? "" });
    }
    input.dataset.option = f.name;
    input.dataset.type = f.type;
    label.append(input);
    box.append(label);
  }
}

function readOptions(box) {
  const options = {};
  for (const input of box.querySelectorAll("[data-option]")) {
    const t = input.dataset.type;
    if (t === "boolean") options[input.dataset.option] = input.checked;
    else if (input.value === "") continue;
    else if (t === "integer" || t === "number") options[input.dataset.option] = Number(input.value);
    else options[input.dataset.option] = input.value;
  }
  return options;
}

function methodOptions() {
  const method = state.info.methods.find((m) => m.name === $("method").value);
  const a = method.assessment;
  $("method-note").textContent = a ? `last assessment: ${a.status}` + (a.options ? ", with the options shown" : "") +
    (a.reasons && a.reasons.length ? ` (${a.reasons.join("; ")})` : "") : "not assessed by the last assessment";
  optionsForm($("method-options"), method.options);
}

async function follow(job, kind, onDone) {
  const bar = $(`${kind}-progress`), label = $(`${kind}-state`), cancel = $(`cancel-${kind}`);
  state.jobs[kind] = job.id;
  bar.hidden = false;
  cancel.disabled = false;
  while (true) {
    bar.value = job.fraction ?? 0;
    if (job.fraction === null && job.state === "running") bar.removeAttribute("value");
    label.textContent = `${job.state}` + (job.total ? ` (${Math.round(job.done)} of ~${Math.round(job.total)})` : "") +
      (job.seconds !== null ? `, ${job.seconds.toFixed(1)} s` : "");
    if (!["queued", "running"].includes(job.state)) break;
    job = await api(`/api/jobs/${job.id}?wait=0.25`);  // answers at once when the job ends
  }
  cancel.disabled = true;
  bar.hidden = job.state !== "done";
  if (job.state === "done") onDone(job.result);
  else if (job.state === "failed") showError(job.error);
}

async function explain(event) {
  event.preventDefault();
  if (!state.src) { showError("pick a test image or upload one first"); return; }
  const kind = $("target-kind").value;
  const target = kind === "class" ? { kind, class: $("target-class").value }
    : { kind, layer: $("target-layer").value, channel: Number($("channel").value) };
  const job = await post("/api/attributions?wait=0.25", { src: state.src, method: $("method").value, options: readOptions($("method-options")),
    target, baseline: $("baseline").value });
  await follow(job, "attribution", (result) => {
    $("attribution-map").src = result.overlay;
    $("attribution-map").hidden = false;
    const delta = result.convergence_delta !== undefined ? `\nconvergence delta ${result.convergence_delta.toExponential(2)}` : "";
    $("attribution-info").textContent = `${result.method} ${JSON.stringify(result.options)}\ntarget ` +
      `${JSON.stringify(result.target)}, baseline ${result.baseline}\n${result.seconds} s${delta}`;
  });
}

// --- class and channel visualisation ----------------------------------------------------------

async function visualise(event) {
  event.preventDefault();
  const kind = $("vis-kind").value;
  const target = kind === "class" ? { kind, class: $("vis-class").value }
    : { kind, layer: $("vis-layer").value, channel: Number($("vis-index").value) };
  const job = await post("/api/visualisations?wait=0.25", { target, steps: Number($("vis-steps").value) });
  await follow(job, "visualisation", (r) => {
    $("visualisation").src = r.image;
    $("visualisation").hidden = false;
  });
}

// --- perturbation slider ----------------------------------------------------------------------

function perturbationRange() {
  const p = state.info.perturbations.find((x) => x.name === $("perturbation").value);
  const s = $("amplitude");
  s.min = p.min; s.max = p.max; s.step = p.step; s.value = p.min;
  optionsForm($("perturbation-options"), p.options);
}

async function slide() {
  if (!state.src) return;
  if (state.sliderBusy) { state.sliderAgain = true; return; }  // one request in flight; the latest value wins
  state.sliderBusy = true;
  try {
    const p = state.info.perturbations.find((x) => x.name === $("perturbation").value);
    $("amplitude-value").textContent = `${$("amplitude").value} ${p.unit}`;
    const r = await post("/api/perturb", { src: state.src, name: p.name, amplitude: Number($("amplitude").value),
      options: readOptions($("perturbation-options")) });
    $("perturbed").src = r.image;
    $("perturbed").hidden = false;
    $("perturbed-prediction").textContent = r.prediction;
    fillProbabilities($("perturbed-probabilities"), r.probabilities);
    fillDecision($("perturbed-decision"), $("perturbed-reasons"), r.decision);
  } catch (e) { /* shown */ } finally {
    state.sliderBusy = false;
    if (state.sliderAgain) { state.sliderAgain = false; slide(); }
  }
}

// --- prove it ---------------------------------------------------------------------------------

async function prove(event) {
  event.preventDefault();
  if (!state.src) { showError("pick a test image or upload one first"); return; }
  $("proof-result").textContent = "";
  const job = await post("/api/proofs?wait=0.25", { src: state.src, radius: Number($("radius").value),
    timeout: Number($("budget").value) });
  await follow(job, "proof", (r) => {
    $("proof-result").textContent = `${r.verdict} at radius ${r.radius} (prediction ${r.prediction}, ` +
      `${r.seconds} s of ${r.timeout} s): ${r.meaning}`;
  });
}

async function cancel(kind) {
  if (state.jobs[kind]) await post(`/api/jobs/${state.jobs[kind]}/cancel`, {});
}

// --- upload -----------------------------------------------------------------------------------

async function upload(event) {
  event.preventDefault();
  const file = $("upload-file").files[0];
  if (!file) { showError("choose an image file first"); return; }
  const params = new URLSearchParams({ name: file.name, resize: $("upload-resize").checked });
  const r = await api("/api/uploads?" + params, { method: "POST", body: file,
    headers: { "Content-Type": "application/octet-stream" } });
  await select(r.src, null);
}

async function main() {
  state.info = await api("/api/lab");
  $("monitor-note").textContent = state.info.monitor;
  for (const [k, values] of Object.entries(state.info.subgroups))
    for (const v of values) $("subgroup").append(el("option", { value: `${k}=${v}` }, `${k} = ${v}`));
  for (const c of state.info.clusters) $("cluster").append(el("option", { value: c }, `cluster ${c}`));
  for (const m of state.info.methods) {
    const status = m.assessment ? ` (${m.assessment.status})` : "";
    const o = el("option", { value: m.name }, m.name + (m.available ? status : " (unavailable)"));
    if (!m.available) o.disabled = true;
    $("method").append(o);
  }
  for (const l of state.info.layers) {
    for (const select of [$("target-layer"), $("vis-layer")])
      select.append(el("option", { value: l.name }, `${l.name} (${l.kind}, ${l.channels})`));
  }
  if (!state.info.layers.length) {
    $("target-kind").querySelector("[value=channel]").disabled = true;
    $("vis-kind").querySelector("[value=channel]").disabled = true;
  }
  $("vis-kind").addEventListener("change", () => {
    const channel = $("vis-kind").value === "channel";
    $("vis-channel").hidden = !channel;
    $("vis-class").hidden = channel;
  });
  $("visualise").addEventListener("submit", (e) => visualise(e).catch(() => {}));
  $("cancel-visualisation").addEventListener("click", () => cancel("visualisation").catch(() => {}));
  for (const p of state.info.perturbations) $("perturbation").append(el("option", { value: p.name }, `${p.name} (${p.unit})`));
  const preferred = state.info.methods.find((m) => m.name === "integrated_gradients" && m.available)
    || state.info.methods.find((m) => m.available);
  if (preferred) $("method").value = preferred.name;
  methodOptions();
  perturbationRange();
  $("method").addEventListener("change", methodOptions);
  $("target-kind").addEventListener("change", () => {
    const channel = $("target-kind").value === "channel";
    $("target-channel").hidden = !channel;
    $("target-class").hidden = channel;
  });
  $("filters").addEventListener("change", () => loadItems(false).catch(() => {}));
  $("more").addEventListener("click", () => loadItems(true).catch(() => {}));
  $("attribution").addEventListener("submit", (e) => explain(e).catch(() => {}));
  $("cancel-attribution").addEventListener("click", () => cancel("attribution").catch(() => {}));
  $("perturbation").addEventListener("change", () => { perturbationRange(); slide(); });
  $("perturbation-options").addEventListener("change", slide);
  $("amplitude").addEventListener("input", slide);
  $("prove").addEventListener("submit", (e) => prove(e).catch(() => {}));
  $("cancel-proof").addEventListener("click", () => cancel("proof").catch(() => {}));
  $("upload").addEventListener("submit", (e) => upload(e).catch(() => {}));
  await loadItems(false);
}

main().catch((e) => showError(String(e.message || e)));

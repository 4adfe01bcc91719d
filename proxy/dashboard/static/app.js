// llmrelay dashboard: plain ES2020, no framework, no build step.
// Every value that comes from a log is put on the page with textContent (or as an SVG attribute
// value), never parsed as HTML, so a logged prompt cannot inject markup or script.
"use strict";

const KEY_STORAGE = "llmrelay.adminKey";
const PAGE_SIZE = 25;
const LIST_FIELDS = ["timestamp", "model", "model_requested", "customer_identifier", "status", "status_code", "total_request_tokens",
  "cost", "latency", "time_to_first_token", "cache_hit", "error_message"].join(",");
const PALETTE = ["#3b6fd8", "#e0862b", "#2f9e6e", "#9b59b6", "#c0392b", "#7f8c8d"];
const OK_COLOR = "#3b6fd8";
const ERROR_COLOR = "#d64541";
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  page: 1,
  window: null, // {start, end} in unix seconds, fixed when the filters are applied
  filter: null, // {params, body} of the applied filters
  seq: 0, // the latest load; older answers are dropped
  loads: 0,
  busy: 0,
  detailSeq: 0,
};

const $ = (id) => document.getElementById(id);

// -- DOM helpers ------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function setAttrs(node, attrs) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

// -- formatting -------------------------------------------------------------------------------

const DASH = "–";

function fmtInt(n) {
  return n === null || n === undefined ? DASH : Math.round(n).toLocaleString("en-US");
}

// chart axes: whole numbers as such, halves (0.5 of a 1-request axis) with one decimal
function fmtCount(n) {
  return Number.isInteger(n) ? fmtInt(n) : n.toFixed(1);
}

function fmtCost(v) {
  if (v === null || v === undefined) return DASH;
  if (v === 0) return "$0";
  const abs = Math.abs(v);
  if (abs >= 1) return `$${v.toFixed(2)}`;
  if (abs >= 0.01) return `$${v.toFixed(4)}`;
  return `$${v.toPrecision(3)}`;
}

function fmtPct(rate) {
  return rate === null || rate === undefined ? DASH : `${(rate * 100).toFixed(1)}%`;
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return DASH;
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
}

const pad = (n) => String(n).padStart(2, "0");

function fmtTime(value, withSeconds = true) {
  if (!value) return DASH;
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) return String(value);
  const date = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}` + (withSeconds ? `:${pad(d.getSeconds())}` : "");
  return `${date} ${time}`;
}

function fmtAxisTime(seconds, bucketSeconds) {
  const d = new Date(seconds * 1000);
  const day = `${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  return bucketSeconds >= 86400 ? day : `${day} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function fmtValue(v) {
  if (v === null || v === undefined) return DASH;
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

// -- the API ----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, params = {}, body = undefined) {
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(params)) url.searchParams.set(name, value);
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY_STORAGE) || ""}` };
  const init = { headers, cache: "no-store" };
  if (body !== undefined) {
    init.method = "POST";
    init.body = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    throw new ApiError(0, `The gateway did not answer: ${err.message}`);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = data && typeof data.detail === "string" ? data.detail : `HTTP ${response.status}`;
    throw new ApiError(response.status, detail);
  }
  return data;
}

function handleError(err) {
  if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
    signOut(err.message);
  } else {
    showError(err.message || String(err));
  }
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setBusy(delta) {
  state.busy += delta;
  document.body.dataset.busy = String(state.busy);
}

// -- sign in ----------------------------------------------------------------------------------

function showSignIn(message) {
  $("app").hidden = true;
  $("detail").hidden = true;
  $("sign-out").hidden = true;
  $("signin").hidden = false;
  const error = $("signin-error");
  error.textContent = message || "";
  error.hidden = !message;
  $("admin-key").focus();
}

function signOut(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  state.seq += 1; // answers still on their way are for the old key
  showSignIn(message);
}

async function enter() {
  const submit = $("signin-submit");
  submit.disabled = true;
  try {
    applyFilters();
    await load(true);
    // a refused key has been dropped (back at the form); any other failure shows on the page
    if (sessionStorage.getItem(KEY_STORAGE)) {
      $("signin").hidden = true;
      $("app").hidden = false;
      $("sign-out").hidden = false;
    }
  } finally {
    submit.disabled = false;
  }
}

// -- filters ----------------------------------------------------------------------------------

// Reads the form into state.filter and fixes the time window; a bad field throws.
function applyFilters() {
  const end = Date.now() / 1000;
  const start = end - Number($("f-range").value);
  const params = {};
  const model = $("f-model").value.trim();
  const customer = $("f-customer").value.trim();
  const status = $("f-status").value;
  const metadata = $("f-metadata").value.trim();
  const search = $("f-search").value.trim();
  if (model) params.model = model;
  if (customer) params.customer_identifier = customer;
  if (status) params.status = status;
  if (metadata) {
    const at = metadata.indexOf("=");
    if (at <= 0) throw new Error("Metadata filter: expected key=value");
    params[`metadata__${metadata.slice(0, at).trim()}`] = metadata.slice(at + 1).trim();
  }
  // quick filters go in the URL (always ANDed); the text search is the body's own OR group
  const body = search ? {
    operator: "OR",
    filters: {
      prompt_messages: { operator: "icontains", value: [search] },
      completion_message: { operator: "icontains", value: [search] },
    },
  } : {};
  state.window = { start, end };
  state.filter = { params, body };
  state.page = 1;
}

function queryParams(extra = {}) {
  return {
    start_time: new Date(state.window.start * 1000).toISOString(),
    end_time: new Date(state.window.end * 1000).toISOString(),
    ...state.filter.params,
    ...extra,
  };
}

// -- loading ----------------------------------------------------------------------------------

// Fetches the list (and the stats when `withStats`) and renders them; false on failure.
async function load(withStats) {
  const seq = ++state.seq;
  setBusy(1);
  try {
    const list = api("/api/request-logs/list/", queryParams({
      page: state.page, page_size: PAGE_SIZE, sort_by: "-id", include_fields: LIST_FIELDS,
    }), state.filter.body);
    const stats = withStats ? api("/api/dashboard/stats/", queryParams(), state.filter.body) : null;
    const [page, figures] = await Promise.all([list, stats]);
    if (seq !== state.seq) return false;
    if (figures) renderStats(figures);
    renderLogs(page);
    showError("");
    state.loads += 1;
    document.body.dataset.loads = String(state.loads);
    return true;
  } catch (err) {
    if (seq === state.seq) handleError(err);
    return false;
  } finally {
    setBusy(-1);
  }
}

// -- tiles, charts, top lists -----------------------------------------------------------------

function setTile(id, raw, text) {
  const node = $(id);
  node.textContent = text;
  node.dataset.value = raw === null || raw === undefined ? "" : String(raw);
}

function renderStats(stats) {
  const s = stats.summary;
  setTile("tile-requests", s.number_of_requests, fmtInt(s.number_of_requests));
  setTile("tile-cost", s.total_cost, fmtCost(s.total_cost));
  setTile("tile-tokens", s.total_tokens, fmtInt(s.total_tokens));
  setTile("tile-error-rate", s.error_rate, fmtPct(s.error_rate));
  setTile("tile-cache-hit-rate", s.cache_hit_rate, fmtPct(s.cache_hit_rate));
  for (const [prefix, name] of [["latency", "latency"], ["ttft", "time_to_first_token"]]) {
    for (const p of ["p50", "p90", "p99"]) {
      const value = (stats.percentiles[name] || {})[p];
      setTile(`${prefix}-${p}`, value, fmtSeconds(value));
    }
  }

  const size = stats.bucket_seconds;
  const buckets = timeline(Date.parse(stats.start_time) / 1000, Date.parse(stats.end_time) / 1000, size);
  const at = (point) => Date.parse(point.t) / 1000;
  const byTime = (points, pick) => new Map(points.map((p) => [at(p), pick(p)]));
  barChart($("chart-requests"), buckets, size, [
    { name: "successful", color: OK_COLOR, values: byTime(stats.series, (p) => p.requests - p.errors) },
    { name: "errors", color: ERROR_COLOR, values: byTime(stats.series, (p) => p.errors) },
  ], fmtCount);
  barChart($("chart-spend-model"), buckets, size, perGroup(stats.by_model, stats.model_series, "model", at), fmtCost);
  barChart($("chart-spend-customer"), buckets, size,
    perGroup(stats.by_customer, stats.customer_series, "customer_identifier", at), fmtCost);
  barChart($("chart-tokens"), buckets, size, [
    { name: "prompt", color: PALETTE[0], values: byTime(stats.series, (p) => p.prompt_tokens) },
    { name: "completion", color: PALETTE[1], values: byTime(stats.series, (p) => p.completion_tokens) },
  ], fmtCount);

  renderTop($("top-models"), stats.by_model, "f-model");
  renderTop($("top-customers"), stats.by_customer, "f-customer");
  fillDatalist($("models-list"), stats.by_model);
  fillDatalist($("customers-list"), stats.by_customer);
}

// Every bucket start from `start` to `end`, so that empty periods show as gaps.
function timeline(start, end, size) {
  const out = [];
  for (let t = Math.floor(start / size) * size; t <= end; t += size) out.push(t);
  return out;
}

// One stack per top group (in spend order), its cost per bucket.
function perGroup(top, series, key, at) {
  const names = top.map((g) => g.name).filter((n) => n !== null).slice(0, 5);
  return names.map((name, i) => ({
    name,
    color: PALETTE[i % PALETTE.length],
    values: new Map(series.filter((p) => p[key] === name).map((p) => [at(p), p.cost])),
  }));
}

// The axis top: the next 1, 2 or 5 times a power of ten at or above `v`.
function niceCeiling(v) {
  if (v <= 0) return 0;
  const power = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 5, 10].map((m) => m * power).find((c) => c >= v * (1 - 1e-9));
}

// A stacked bar chart as inline SVG: one bar per bucket, one segment per stack.
function barChart(host, buckets, size, stacks, format) {
  const W = 640, H = 200, left = 64, right = 8, top = 10, bottom = 22;
  const plotW = W - left - right, plotH = H - top - bottom;
  const totals = buckets.map((t) => stacks.reduce((sum, s) => sum + (s.values.get(t) || 0), 0));
  const max = niceCeiling(Math.max(0, ...totals));
  const scale = max > 0 ? plotH / max : 0;
  const step = plotW / Math.max(buckets.length, 1);
  const barW = Math.max(step * 0.8, 1);

  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart-svg", role: "img",
    "aria-label": host.parentElement.querySelector("figcaption").textContent });
  for (const fraction of [0, 0.5, 1]) {
    const y = top + plotH - fraction * plotH;
    chart.append(svg("line", { x1: left, x2: W - right, y1: y, y2: y, class: "grid" }));
    chart.append(svg("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "axis", text: format(max * fraction) }));
  }
  const labelled = new Set([0, Math.floor((buckets.length - 1) / 2), buckets.length - 1]);
  buckets.forEach((t, i) => {
    const x = left + i * step + (step - barW) / 2;
    let y = top + plotH;
    for (const s of stacks) {
      const value = s.values.get(t) || 0;
      if (value <= 0) continue;
      const h = Math.max(value * scale, 1);
      y -= h;
      chart.append(svg("rect", { x: x.toFixed(2), y: y.toFixed(2), width: barW.toFixed(2), height: h.toFixed(2),
        fill: s.color, class: "bar", "data-series": s.name },
      svg("title", { text: `${fmtTime(t * 1000, false)} · ${s.name}: ${format(value)}` })));
    }
    if (labelled.has(i)) {
      const anchor = i === 0 ? "start" : i === buckets.length - 1 ? "end" : "middle";
      const lx = i === 0 ? left : i === buckets.length - 1 ? W - right : x + barW / 2;
      chart.append(svg("text", { x: lx, y: H - 6, "text-anchor": anchor, class: "axis", text: fmtAxisTime(t, size) }));
    }
  });
  if (max === 0) {
    chart.append(svg("text", { x: left + plotW / 2, y: top + plotH / 2, "text-anchor": "middle", class: "empty",
      text: "No data in this range" }));
  }
  const legend = el("ul", { class: "legend" }, stacks.map((s) => el("li", {},
    svg("svg", { width: 10, height: 10, viewBox: "0 0 10 10", "aria-hidden": "true" },
      svg("rect", { width: 10, height: 10, fill: s.color })),
    s.name)));
  host.replaceChildren(chart, legend);
}

function renderTop(table, rows, input) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows.map((g) => {
    const name = g.name === null ? el("span", { class: "muted", text: "(none)" }) : el("button", {
      type: "button", class: "link", title: "Filter by this", text: g.name,
      onclick: () => { $(input).value = g.name; submitFilters(); },
    });
    return el("tr", {}, el("td", {}, name), el("td", { class: "num", text: fmtInt(g.requests) }),
      el("td", { class: "num", text: fmtInt(g.errors) }), el("td", { class: "num", text: fmtInt(g.tokens) }),
      el("td", { class: "num", text: fmtCost(g.cost) }), el("td", { class: "num", text: fmtSeconds(g.avg_latency) }));
  }));
  if (!rows.length) body.append(el("tr", {}, el("td", { colspan: 6, class: "muted", text: "No data" })));
}

function fillDatalist(list, rows) {
  list.replaceChildren(...rows.filter((g) => g.name !== null).map((g) => el("option", { value: g.name })));
}

// -- the request log table --------------------------------------------------------------------

function renderLogs(page) {
  const body = $("logs").tBodies[0];
  body.replaceChildren(...page.results.map(logRow));
  $("logs-empty").hidden = page.results.length > 0;
  const pages = Math.max(1, Math.ceil(page.count / PAGE_SIZE));
  $("log-count").textContent = `(${fmtInt(page.count)} ${page.count === 1 ? "request" : "requests"})`;
  $("page-info").textContent = `Page ${state.page} of ${pages}`;
  $("page-prev").disabled = !page.previous;
  $("page-next").disabled = !page.next;
}

function logRow(log) {
  const status = el("span", { class: `badge ${log.status === "error" ? "bad" : "good"}`,
    text: log.status === "error" ? `error ${log.status_code}` : "success" });
  if (log.error_message) status.title = log.error_message;
  const row = el("tr", { class: "log-row", tabindex: 0, "data-id": log.unique_id, "data-testid": "log-row",
    onclick: () => openDetail(log.unique_id),
    onkeydown: (e) => { if (e.key === "Enter") openDetail(log.unique_id); } },
  el("td", { text: fmtTime(log.timestamp) }),
  el("td", { "data-col": "model", text: log.model ?? DASH,
    title: log.model_requested && log.model_requested !== log.model ? `requested: ${log.model_requested}` : null }),
  el("td", { "data-col": "customer", text: log.customer_identifier ?? DASH }),
  el("td", { "data-col": "status" }, status),
  el("td", { class: "num", text: fmtInt(log.total_request_tokens) }),
  el("td", { class: "num", text: fmtCost(log.cost) }),
  el("td", { class: "num", text: fmtSeconds(log.latency) }),
  el("td", { class: "num", text: fmtSeconds(log.time_to_first_token) }),
  el("td", { text: log.cache_hit ? "hit" : "" }));
  return row;
}

// -- the detail view --------------------------------------------------------------------------

async function openDetail(id) {
  const seq = ++state.detailSeq;
  const panel = $("detail");
  delete panel.dataset.id;
  $("detail-title").textContent = "Loading…";
  $("detail-body").replaceChildren();
  panel.hidden = false;
  setBusy(1);
  try {
    const log = await api(`/api/request-logs/${encodeURIComponent(id)}/`);
    if (seq !== state.detailSeq) return;
    renderDetail(log);
    panel.dataset.id = id;
  } catch (err) {
    if (seq !== state.detailSeq) return;
    panel.hidden = true;
    handleError(err);
  } finally {
    setBusy(-1);
  }
}

function closeDetail() {
  state.detailSeq += 1;
  $("detail").hidden = true;
}

function section(title, testid, ...content) {
  return el("section", { class: "detail-section", "data-testid": testid }, el("h3", { text: title }), ...content);
}

function renderDetail(log) {
  $("detail-title").textContent = `${log.model ?? "request"} · ${fmtTime(log.timestamp)}`;
  const facts = [
    ["Status", log.status === "error" ? `error (${log.status_code})` : `success (${log.status_code})`],
    ["Customer", log.customer_identifier], ["Model", log.model], ["Requested model", log.model_requested],
    ["Provider", log.provider_id], ["Tokens", `${fmtInt(log.prompt_tokens)} prompt + ${fmtInt(log.completion_tokens)}` +
      ` completion = ${fmtInt(log.total_request_tokens)}`],
    ["Cost", fmtCost(log.cost)], ["Latency", fmtSeconds(log.latency)], ["TTFT", fmtSeconds(log.time_to_first_token)],
    ["Cache hit", log.cache_hit ? "yes" : "no"], ["Stream", log.stream ? "yes" : "no"], ["ID", log.unique_id],
  ];
  const parts = [el("dl", { class: "facts" }, facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: fmtValue(v) })]))];
  if (log.error_message) parts.push(section("Error", "detail-error", el("pre", { class: "content error", text: log.error_message })));

  const prompt = log.prompt_messages ?? log.input;
  parts.push(section("Prompt", "detail-prompt", messages(prompt)));
  const completion = log.completion_messages ?? log.completion_message ?? log.output;
  parts.push(section("Completion", "detail-completion", messages(completion)));
  if (log.tool_calls) parts.push(section("Tool calls", "detail-tool-calls", json(log.tool_calls)));
  if (log.tools) parts.push(section("Tools", "detail-tools", json(log.tools)));

  const metadata = Object.entries(log.metadata || {});
  parts.push(section("Metadata", "detail-metadata", metadata.length
    ? keyValueTable(metadata) : el("p", { class: "muted", text: "none" })));
  parts.push(section("Warnings", "detail-warnings", log.warnings
    ? (typeof log.warnings === "string" ? el("pre", { class: "content", text: log.warnings }) : json(log.warnings))
    : el("p", { class: "muted", text: "none" })));
  parts.push(section("Attempts", "detail-attempts", Array.isArray(log.attempts) && log.attempts.length
    ? attemptsTable(log.attempts) : el("p", { class: "muted", text: "one attempt" })));
  parts.push(section("All fields", "detail-fields",
    keyValueTable(Object.keys(log).sort().map((k) => [k, log[k]]))));
  parts.push(el("details", { class: "detail-section", "data-testid": "detail-raw" },
    el("summary", { text: "Raw JSON" }), json(log)));
  $("detail-body").replaceChildren(...parts);
}

function json(value) {
  return el("pre", { class: "content json", text: JSON.stringify(value, null, 2) });
}

function keyValueTable(entries) {
  return el("table", { class: "kv" }, el("tbody", {}, entries.map(([k, v]) =>
    el("tr", {}, el("th", { text: k }), el("td", {}, el("span", { class: "value", text: fmtValue(v) }))))));
}

function attemptsTable(attempts) {
  const columns = [...new Set(attempts.flatMap((a) => (a && typeof a === "object" ? Object.keys(a) : [])))];
  return el("table", { class: "kv attempts" },
    el("thead", {}, el("tr", {}, el("th", { text: "#" }), columns.map((c) => el("th", { text: c })))),
    el("tbody", {}, attempts.map((a, i) => el("tr", {}, el("td", { text: i + 1 }),
      columns.map((c) => el("td", { text: fmtValue(a && typeof a === "object" ? a[c] : a) }))))));
}

// Chat messages as role + text; anything else as JSON.
function messages(value) {
  if (value === null || value === undefined) return el("p", { class: "muted", text: "none" });
  if (typeof value === "string") return el("pre", { class: "content", text: value });
  const list = Array.isArray(value) ? value : [value];
  return el("div", { class: "messages" }, list.map(message));
}

function message(msg) {
  if (msg === null || typeof msg !== "object") return el("pre", { class: "content", text: fmtValue(msg) });
  const box = el("div", { class: "message", "data-role": msg.role ?? "" }, el("div", { class: "role", text: msg.role ?? "message" }));
  const content = msg.content;
  if (typeof content === "string") box.append(el("pre", { class: "content", text: content }));
  else if (Array.isArray(content)) {
    for (const part of content) {
      if (part && part.type === "text" && typeof part.text === "string") box.append(el("pre", { class: "content", text: part.text }));
      else box.append(json(part));
    }
  } else if (content !== null && content !== undefined) box.append(json(content));
  if (msg.tool_calls) box.append(json(msg.tool_calls));
  for (const [k, v] of Object.entries(msg)) {
    if (!["role", "content", "tool_calls"].includes(k)) box.append(el("div", { class: "extra", text: `${k}: ${fmtValue(v)}` }));
  }
  return box;
}

// -- wiring -----------------------------------------------------------------------------------

function submitFilters() {
  closeDetail();
  try {
    applyFilters();
  } catch (err) {
    showError(err.message);
    return;
  }
  load(true);
}

function init() {
  document.body.dataset.busy = "0";
  document.body.dataset.loads = "0";
  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("admin-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("admin-key").value = "";
    $("signin-error").hidden = true;
    enter();
  });
  $("sign-out").addEventListener("click", () => signOut(""));
  $("filters").addEventListener("submit", (e) => { e.preventDefault(); submitFilters(); });
  $("f-range").addEventListener("change", submitFilters);
  $("f-status").addEventListener("change", submitFilters);
  $("f-reset").addEventListener("click", () => {
    $("filters").reset();
    submitFilters();
  });
  $("page-prev").addEventListener("click", () => { state.page = Math.max(1, state.page - 1); load(false); });
  $("page-next").addEventListener("click", () => { state.page += 1; load(false); });
  $("detail-close").addEventListener("click", closeDetail);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeDetail(); });

  if (sessionStorage.getItem(KEY_STORAGE)) enter();
  else showSignIn("");
}

init();

// ringstream's live page: records as a virtual-scrolled table (the last MAX
// kept, rendered in animation frames), a filter bar that is the query string,
// pause/resume from the last id (the service's history fills the pause), and
// the ring's health from /metrics and /query. Every URL is relative, so the
// page works under a reverse proxy's path prefix.
"use strict";
const $ = (s) => document.querySelector(s);
const MAX = 10000, ROW = 22, POINTS = 300;
const ENVELOPE = new Set(["id", "ts_ns", "type", "type_id"]);
const st = { records: [], pending: [], paused: false, epoch: null, last: null, conn: null, gen: 0,
  selected: -1, follow: true, backoff: 500, prev: null, series: {}, dirty: true, received: 0,
  needLogin: false, needMetrics: false, polling: false };

const esc = (v) => String(v).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
const show = (v) => (typeof v === "string" ? v : JSON.stringify(v));

function filterText() {
  const parts = [];
  for (const [k, v] of new URLSearchParams(location.search)) {
    if (k === "type" || k === "sample") parts.push(`${k}=${v}`);
    else if (k.startsWith("field.")) parts.push(`${k.slice(6)}=${v}`);
  }
  return parts.join(" ");
}

function filterParams(text) {
  const q = new URLSearchParams();
  for (const tok of text.trim().split(/\s+/).filter(Boolean)) {
    const i = tok.indexOf("=");
    if (i < 1) throw new Error(`"${tok}": expected name=value`);
    const k = tok.slice(0, i), v = tok.slice(i + 1);
    q.append(k === "type" || k === "sample" ? k : `field.${k}`, v);
  }
  return q;
}

function status(text, cls) { const s = $("#status"); s.textContent = text; s.className = `status ${cls}`; }
function error(text) { const e = $("#error"); e.hidden = !text; e.textContent = text || ""; }

// the service's own messages (gap, end, filter, error) carry no id; a record
// always has one, whatever its type says (an ingested {"type":"end"} is data)
function take(rec, epoch) {
  const marker = typeof rec.id !== "number";
  if (marker && rec.type === "filter") return;
  if (marker && rec.type === "error") { error(rec.error); return; }
  st.pending.push(rec);
  // a hidden tab draws no frames: keep only what the table would keep
  if (st.pending.length > 2 * MAX) st.pending.splice(0, st.pending.length - MAX);
  st.received++;
  if (!marker) { st.last = rec.id; st.epoch = epoch; }  // the resume point: both together
  if (marker && rec.type === "end") { disconnect(); status(`ended: ${rec.reason}`, "down"); }
}

function disconnect() { st.gen++; if (st.conn) { const c = st.conn; st.conn = null; c.close(); } }

// what the stream asks for: the URL's filter (the one last submitted)
function streamParams() {
  const q = new URLSearchParams(location.search);
  q.delete("transport");
  return q;
}

async function connect() {
  disconnect();
  const gen = st.gen;  // a later connect() or disconnect() makes this one stale
  error("");
  const q = streamParams();
  // a bad filter is the server's 400: ask before opening a stream it refuses
  const probe = new AbortController();
  let r;
  try { r = await fetch(`events?${q}`, { signal: probe.signal }); } catch (e) { if (gen === st.gen) retry(); return; }
  probe.abort();
  if (gen !== st.gen || st.paused) return;
  if (r.status === 401) { st.needLogin = true; $("#login").hidden = false; status("login", "down"); return; }
  if (r.status >= 500) { retry(); return; }  // starting or stopping: again later
  if (r.status !== 200) { const b = await r.json().catch(() => ({})); error(b.error || `HTTP ${r.status}`); status("refused", "down"); return; }
  const epoch = r.headers.get("Ringstream-Epoch");
  if (st.last !== null) q.set("last_event_id", st.epoch ? `${st.epoch}-${st.last}` : String(st.last));
  if ($("#transport").value === "sse") {
    q.set("format", "sse");
    const es = new EventSource(`events?${q}`);
    const epochOf = (e) => { const dash = e.lastEventId.lastIndexOf("-"); return dash > 0 ? e.lastEventId.slice(0, dash) : epoch; };
    es.onmessage = (e) => take(JSON.parse(e.data), epochOf(e));
    es.addEventListener("gap", (e) => take(JSON.parse(e.data), epoch));
    es.addEventListener("end", (e) => take(JSON.parse(e.data), epoch));
    es.onopen = () => { status("live", "live"); st.backoff = 500; };
    es.onerror = () => { if (st.conn !== es) return; if (es.readyState === EventSource.CLOSED) retry(); else status("reconnecting", "down"); };
    st.conn = es;
  } else {
    q.set("batch", "500");
    const ws = new WebSocket(new URL(`ws?${q}`, location.href).href.replace(/^http/, "ws"));
    ws.onopen = () => { status("live", "live"); st.backoff = 500; };
    ws.onmessage = (e) => { const m = JSON.parse(e.data); if (Array.isArray(m)) for (const x of m) take(x, epoch); else take(m, epoch); };
    ws.onclose = () => { if (st.conn === ws) retry(); };
    st.conn = ws;
  }
}

function retry() {
  disconnect();
  if (st.paused) return;
  status("reconnecting", "down");
  const gen = st.gen;
  setTimeout(() => { if (!st.paused && gen === st.gen) connect(); }, st.backoff);
  st.backoff = Math.min(10000, st.backoff * 2);
}

function columns() {
  const types = new URLSearchParams(location.search).getAll("type").join(",").split(",").filter(Boolean);
  if (types.length === 1) {
    const rec = st.records.findLast((r) => r.type === types[0]);
    if (rec) return ["id", "type", ...Object.keys(rec).filter((k) => !ENVELOPE.has(k))];
  }
  return ["id", "type", "fields"];
}

function cell(rec, col) {
  if (col === "fields") return Object.entries(rec).filter(([k]) => !ENVELOPE.has(k)).map(([k, v]) => `${k}=${show(v)}`).join(" ");
  return rec[col] === undefined ? "" : show(rec[col]);
}

function render() {
  requestAnimationFrame(render);
  // the rows are rebuilt only when something changed: new records, a
  // scroll, a click (a rebuild under the pointer would swallow the click)
  if (!st.dirty && !st.pending.length) return;
  st.dirty = false;
  const vp = $("#viewport");
  if (st.pending.length) {
    st.records = st.records.concat(st.pending);
    st.pending = [];
    if (st.records.length > MAX) {
      const cut = st.records.length - MAX;
      st.records.splice(0, cut);
      st.selected -= cut;
      // a reader scrolled up keeps the rows in view where they are
      if (!st.follow) vp.scrollTop = Math.max(0, vp.scrollTop - cut * ROW);
    }
    $("#count").textContent = `${st.records.length.toLocaleString()} records`;
  }
  const cols = columns();
  $("#spacer").style.height = `${st.records.length * ROW}px`;
  if (st.follow) vp.scrollTop = vp.scrollHeight;
  const first = Math.max(0, Math.floor(vp.scrollTop / ROW)), n = Math.ceil(vp.clientHeight / ROW) + 1;
  const wide = (c) => (c === cols[cols.length - 1] ? ' class="wide"' : "");
  $("#thead").innerHTML = cols.map((c) => `<span${wide(c)}>${esc(c)}</span>`).join("");
  const html = [];
  for (let i = first; i < Math.min(st.records.length, first + n); i++) {
    const r = st.records[i];
    if (typeof r.id !== "number") {
      const text = Object.entries(r).filter(([k]) => k !== "type").map(([k, v]) => `${k}=${show(v)}`).join(" ");
      html.push(`<div class="row ${r.type}" data-i="${i}"><span class="wide">${r.type}: ${esc(text)}</span></div>`);
    } else {
      html.push(`<div class="row${i === st.selected ? " sel" : ""}" data-i="${i}">${cols.map((c) => `<span${wide(c)}>${esc(cell(r, c))}</span>`).join("")}</div>`);
    }
  }
  const rows = $("#rows");
  rows.style.top = `${first * ROW}px`;
  rows.innerHTML = html.join("");
}

// --- the ring's health ------------------------------------------------------

function parseMetrics(text) {
  const m = {};
  for (const line of text.split("\n")) {
    const x = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!x) continue;
    const labels = {};
    for (const l of (x[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    (m[x[1]] ||= []).push({ labels, value: Number(x[3]) });
  }
  return m;
}
const sum = (m, name, f = () => true) => (m[name] || []).filter((s) => f(s.labels)).reduce((a, s) => a + s.value, 0);
const bytes = (n) => (n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : n >= 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${n} B`);

function quantile(q, prev, now) {
  const name = "ringstream_delivery_latency_seconds_bucket";
  const b = (now[name] || []).map((s) => ({ le: s.labels.le === "+Inf" ? Infinity : Number(s.labels.le),
    n: s.value - ((prev[name] || []).find((p) => p.labels.le === s.labels.le)?.value || 0) })).sort((a, c) => a.le - c.le);
  if (!b.length || b[b.length - 1].n <= 0) return null;
  const rank = q * b[b.length - 1].n;
  let lo = 0, loN = 0;
  for (const { le, n } of b) {
    if (n >= rank) return le === Infinity ? lo : lo + (le - lo) * (n > loN ? (rank - loN) / (n - loN) : 0);
    lo = le; loN = n;
  }
  return null;
}

function chart(id, labels) {
  const el = $(id);
  const opts = { width: 240, height: 110, legend: { show: true }, axes: [{ show: false }, { size: 40, stroke: "#7d8793" }],
    series: [{}, ...labels.map((l, i) => ({ label: l, stroke: ["#4fc3f7", "#81c784", "#ffb74d", "#e57373"][i], points: { show: false } }))] };
  const data = [[], ...labels.map(() => [])];
  return { plot: new uPlot(opts, data, el), data };
}

function plot(name, values) {
  const c = st.series[name];
  c.data[0].push(Date.now() / 1000);
  values.forEach((v, i) => c.data[i + 1].push(v));
  if (c.data[0].length > POINTS) c.data.forEach((a) => a.shift());
  c.plot.setData(c.data);
}

async function poll() {
  // after a 401, nothing is asked again until a login: every refusal is
  // counted and logged by the service
  if (st.polling || st.needLogin) return;
  st.polling = true;
  try {
    const [mr, qr] = await Promise.all([st.needMetrics ? null : fetch("metrics"), fetch("query")]);
    if (qr.status === 401) { st.needLogin = true; $("#login").hidden = false; return; }
    const q = await qr.json();
    const rings = [`<div>user ring: <span id="ring-used" data-bytes="${q.avail_data}">${bytes(q.avail_data)}</span> of
      <span id="ring-size" data-bytes="${q.ring_size}">${bytes(q.ring_size)}</span> · epoch ${esc(q.epoch)}</div>
      <div class="gauge"><div style="width:${(100 * q.avail_data / q.ring_size).toFixed(1)}%"></div></div>`];
    if (mr === null || mr.status !== 200) {
      $("#ring-list").innerHTML = rings.join("") + '<div class="dim">/metrics needs the metrics token</div>';
      if (mr !== null && mr.status === 401) { st.needMetrics = true; $("#metrics-login").hidden = false; }
      return;
    }
    const m = parseMetrics(await mr.text()), p = st.prev, now = Date.now() / 1000;
    for (const s of m.ringstream_kernel_ring_size_bytes || []) {
      const used = sum(m, "ringstream_kernel_ring_available_bytes", (l) => l.source === s.labels.source);
      rings.push(`<div>kernel ring ${esc(s.labels.source)}: ${bytes(used)} of ${bytes(s.value)}</div>
        <div class="gauge"><div style="width:${(100 * used / s.value).toFixed(1)}%"></div></div>`);
    }
    $("#ring-list").innerHTML = rings.join("");
    const sources = {};
    for (const s of m.ringstream_worker_restarts_total || []) sources[s.labels.source] = s.value;
    $("#sources").innerHTML = `<tr class="dim"><td>source</td><td>restarts</td><td>reserve failures</td></tr>` +
      Object.entries(sources).map(([k, v]) => `<tr><td>${esc(k)}</td><td>${v}</td><td>${sum(m, "ringstream_reserve_failures_total", (l) => l.source === k)}</td></tr>`).join("");
    if (p) {
      const dt = now - p.at, r = (name, f) => Math.max(0, sum(m, name, f) - sum(p.m, name, f)) / dt;
      plot("rates", [r("ringstream_records_total", (l) => l.outcome === "submitted"), r("ringstream_decoded_records_total")]);
      plot("failures", [r("ringstream_reserve_failures_total"), r("ringstream_records_total", (l) => l.outcome === "abandoned")]);
      plot("drops", [r("ringstream_subscriber_dropped_records_total"), r("ringstream_subscriber_budget_dropped_records_total")]);
      const q50 = quantile(0.5, p.m, m), q99 = quantile(0.99, p.m, m);
      plot("latency", [q50 === null ? null : q50 * 1e3, q99 === null ? null : q99 * 1e3]);
      plot("subs", ["ndjson", "sse", "ws"].map((t) => sum(m, "ringstream_subscribers", (l) => l.transport === t)));
    }
    st.prev = { m, at: now };
  } catch (e) {
    status("unreachable", "down");
  } finally {
    st.polling = false;
  }
}

// --- wiring -------------------------------------------------------------------

function start() {
  $("#filter").value = filterText();
  $("#transport").value = new URLSearchParams(location.search).get("transport") === "sse" ? "sse" : "ws";
  st.series.rates = chart("#chart-rates", ["in", "out"]);
  st.series.failures = chart("#chart-failures", ["reserve", "abandoned"]);
  st.series.drops = chart("#chart-drops", ["slow", "budget"]);
  st.series.latency = chart("#chart-latency", ["p50", "p99"]);
  st.series.subs = chart("#chart-subs", ["ndjson", "sse", "ws"]);
  $("#filter-form").addEventListener("submit", (e) => {
    e.preventDefault();
    let q;
    try { q = filterParams($("#filter").value); } catch (err) { error(err.message); return; }
    if ($("#transport").value === "sse") q.set("transport", "sse");
    history.replaceState(null, "", `?${q}`);
    st.records = []; st.pending = []; st.last = null; st.epoch = null; st.selected = -1; st.dirty = true;
    if (!st.paused) connect();
  });
  $("#transport").addEventListener("change", () => $("#filter-form").requestSubmit());
  $("#pause").addEventListener("click", () => {
    st.paused = !st.paused;
    $("#pause").textContent = st.paused ? "Resume" : "Pause";
    if (st.paused) { disconnect(); status("paused", "paused"); } else connect();
  });
  $("#viewport").addEventListener("scroll", () => {
    const vp = $("#viewport");
    st.follow = vp.scrollTop + vp.clientHeight >= vp.scrollHeight - ROW;
    st.dirty = true;
  });
  window.addEventListener("resize", () => { st.dirty = true; });
  // mousedown, not click: rows are rebuilt as records come, and a click
  // needs its press and release on one element
  $("#rows").addEventListener("mousedown", (e) => {
    const row = e.target.closest(".row");
    if (!row) return;
    st.selected = Number(row.dataset.i);
    st.dirty = true;
    $("#detail-json").textContent = JSON.stringify(st.records[st.selected], null, 2);
    $("#detail-json").className = "";
  });
  $("#login").addEventListener("submit", async (e) => {
    e.preventDefault();
    const r = await fetch("login", { method: "POST", body: new URLSearchParams({ token: $("#token").value }) });
    if (r.status !== 200) { error("login refused"); return; }
    st.needLogin = false; $("#login").hidden = true; error(""); connect(); poll();
  });
  $("#metrics-login").addEventListener("submit", async (e) => {
    e.preventDefault();
    const r = await fetch("login", { method: "POST", body: new URLSearchParams({ metrics_token: $("#metrics-token").value }) });
    if (r.status !== 200) { error("metrics token refused"); return; }
    st.needMetrics = false; $("#metrics-login").hidden = true; error(""); poll();
  });
  // for tests and the curious: what the page has received
  // (what is drawn plus what waits for the next frame: a pause stops the
  // receiving at once, the drawing one frame later)
  const received = () => st.records.concat(st.pending);
  window.ringstream = { ids: () => received().filter((r) => typeof r.id === "number" && r.type !== "gap").map((r) => r.id),
    records: received, state: st };
  connect();
  poll();
  setInterval(poll, 1000);
  requestAnimationFrame(render);
}
start();

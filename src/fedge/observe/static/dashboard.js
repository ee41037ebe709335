// The fedge dashboard: server-sent events from /api/events, drawn with the DOM and an
// inline SVG chart. Every value from the server goes in as text (textContent), never as
// markup: node names, addresses and failure reasons come from nodes.
"use strict";

const view = {
  config: null, run: null, rounds: [], nodes: [], events: [],
  offset: 0, // server clock minus this browser's, in seconds
  nodeRows: new Map(), // name -> {tr, cells, key}
  dirty: new Set(), frame: 0, firstNodes: 0,
};
window.fedgeDashboard = view; // for tests and benchmarks

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

function num(v, digits = 4) {
  return typeof v === "number" && isFinite(v) ? Number(v.toPrecision(digits)).toString() : "–";
}

function seconds(v) {
  return typeof v === "number" ? v.toFixed(2) : "–";
}

function ago(unix) {
  if (!unix) return "never";
  const s = Math.max(0, Date.now() / 1000 + view.offset - unix);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(unix * 1000).toISOString().slice(0, 16).replace("T", " ");
}

function metricOf(r, key) {
  if (r.metrics && typeof r.metrics[key] === "number") return r.metrics[key];
  if (r.evaluate && typeof r.evaluate[key] === "number") return r.evaluate[key];
  return null;
}

function schedule(part) {
  view.dirty.add(part);
  if (!view.frame) view.frame = requestAnimationFrame(render);
}

function render() {
  view.frame = 0;
  const parts = view.dirty;
  view.dirty = new Set();
  if (parts.has("config")) renderConfig();
  if (parts.has("run")) renderRun();
  if (parts.has("rounds")) { renderChart(); renderRounds(); }
  if (parts.has("nodes") || parts.has("run")) renderNodes();
  if (parts.has("events")) renderEvents();
}

function renderConfig() {
  const c = view.config;
  $("run-id").textContent = `run ${c.run_id}`;
  $("strategy").textContent = c.strategy;
  $("config").textContent = JSON.stringify(c.settings, null, 2);
}

function renderRun() {
  const r = view.run;
  const state = $("state");
  state.textContent = r.state;
  state.className = `badge ${r.state}`;
  $("round").textContent = `${r.rounds_done} of ${r.total_rounds} done` +
    (r.state === "running" || r.state === "waiting" ? ` (round ${r.round})` : "");
  $("progress-bar").style.width = `${(100 * r.rounds_done) / Math.max(1, r.total_rounds)}%`;
  $("results").textContent = r.expected ? `${r.received} of ${r.expected}` : "–";
  $("live").textContent = `${r.live} of ${r.sessions}`;
  const metrics = Object.entries(r.metrics || {}).map(([k, v]) => `${k} ${num(v)}`);
  $("metrics").textContent = metrics.length ? metrics.join(", ") : "–";
  $("privacy").hidden = !r.private;
  if (r.private) {
    $("epsilon").textContent = `${num(r.epsilon)}` +
      (r.epsilon_budget ? ` of ${num(r.epsilon_budget)}` : "") + ` (δ ${r.delta})`;
  }
  let reason = r.reason;
  if (r.waiting_for) {
    reason = `waiting for ${r.waiting_for} clients; missing: ${r.missing.join(", ")}` +
      (r.missing_count > r.missing.length ? ` and ${r.missing_count - r.missing.length} more` : "");
  }
  $("reason").hidden = !reason;
  $("reason").textContent = reason || "";
}

function renderChart() {
  const chart = $("chart");
  chart.replaceChildren();
  const W = 800, H = 240, L = 40, R = 40, T = 10, B = 24;
  const ok = view.rounds.filter((r) => r.status === "ok");
  const rounds = ok.map((r) => r.round);
  const acc = ok.map((r) => metricOf(r, "accuracy"));
  const loss = ok.map((r) => metricOf(r, "loss"));
  const maxRound = Math.max(1, ...rounds, view.run ? view.run.total_rounds : 1);
  const maxLoss = Math.max(1e-9, ...loss.filter((v) => v !== null));
  const x = (round) => L + ((W - L - R) * (round - 0.5)) / maxRound;
  const yAcc = (v) => T + (H - T - B) * (1 - Math.min(1, Math.max(0, v)));
  const yLoss = (v) => T + (H - T - B) * (1 - v / maxLoss);
  chart.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  for (const f of [0, 0.5, 1]) {
    const y = yAcc(f);
    chart.append(svg("line", { x1: L, y1: y, x2: W - R, y2: y, class: "axis" }));
    const left = svg("text", { x: 4, y: y + 4 });
    left.textContent = f.toFixed(1);
    const right = svg("text", { x: W - R + 4, y: y + 4 });
    right.textContent = num(maxLoss * f, 3);
    chart.append(left, right);
  }
  const step = Math.max(1, Math.ceil(maxRound / 10));
  for (let round = step; round <= maxRound; round += step) {
    const t = svg("text", { x: x(round) - 4, y: H - 6 });
    t.textContent = round;
    chart.append(t);
  }
  for (const [values, y, cls] of [[acc, yAcc, "acc"], [loss, yLoss, "loss"]]) {
    const points = [];
    values.forEach((v, i) => {
      if (v === null) return;
      points.push(`${x(rounds[i]).toFixed(1)},${y(v).toFixed(1)}`);
    });
    chart.append(svg("polyline", { points: points.join(" "), class: cls }));
    if (values.length <= 200) {
      values.forEach((v, i) => {
        if (v === null) return;
        const dot = svg("circle", { cx: x(rounds[i]), cy: y(v), r: 3, class: `point ${cls}` });
        const title = svg("title", {});
        title.textContent = `round ${rounds[i]}: ${cls === "acc" ? "accuracy" : "loss"} ${num(v)}`;
        dot.append(title);
        chart.append(dot);
      });
    }
  }
}

const ROUND_ROWS = 200;

function renderRounds() {
  const ok = view.rounds.filter((r) => r.status === "ok").length;
  const failed = view.rounds.length - ok;
  $("rounds-count").textContent = `${ok} done` + (failed ? `, ${failed} failed attempts` : "");
  const body = $("round-rows");
  const rows = [];
  for (const r of view.rounds.slice(-ROUND_ROWS).reverse()) {
    const tr = el("tr", null, r.status === "ok" ? "" : "failed");
    tr.dataset.round = r.round;
    const why = [r.reason, ...r.failures.map(([cid, reason]) => `client ${cid}: ${reason}`)];
    if (r.failed > r.failures.length) why.push(`and ${r.failed - r.failures.length} more`);
    const round = r.attempt ? `${r.round} (attempt ${r.attempt + 1})` : r.round;
    for (const text of [round, r.status, `${r.participants} of ${r.selected}`, r.failed,
      num(metricOf(r, "accuracy")), num(metricOf(r, "loss")), seconds(r.wall_time),
      seconds(r.fit_time), seconds(r.evaluate_time)]) {
      tr.append(el("td", text));
    }
    tr.append(el("td", why.filter(Boolean).join("; "), "why"));
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

const NODE_FIELDS = ["name", "cid", "address", "connected", "last_seen", "tasks_done",
  "failures", "version", "serving", "state"];

function nodeCells(n) {
  const connected = n.live ? "live" : n.connected ? "connected, silent" : "no";
  return [n.name, n.cid ?? "–", n.address || "–", connected, ago(n.last_seen), n.tasks_done,
    n.failures, n.version || "–", n.serving || "–", n.state];
}

function renderNodes() {
  const body = $("node-rows");
  const filter = $("filter").value.trim().toLowerCase();
  const seen = new Set();
  let shown = 0, live = 0;
  const fresh = [];
  for (const n of view.nodes) {
    seen.add(n.name);
    if (n.live) live++;
    let row = view.nodeRows.get(n.name);
    if (!row) {
      const tr = el("tr");
      tr.dataset.node = n.name;
      const cells = NODE_FIELDS.map(() => tr.appendChild(el("td")));
      row = { tr, cells, values: [] };
      view.nodeRows.set(n.name, row);
      fresh.push(row.tr);
    }
    const values = nodeCells(n);
    values.forEach((v, i) => {
      if (row.values[i] !== v) { row.cells[i].textContent = String(v); }
    });
    row.values = values;
    row.cells[3].className = n.live ? "yes" : "no";
    row.cells[6].title = n.last_failure || "";
    const match = !filter || `${n.name} ${n.address} ${n.version} ${n.cid}`.toLowerCase().includes(filter);
    row.tr.hidden = !match;
    if (match) shown++;
  }
  if (fresh.length) body.append(...fresh);
  for (const [name, row] of view.nodeRows) {
    if (!seen.has(name)) { row.tr.remove(); view.nodeRows.delete(name); }
  }
  $("nodes-count").textContent = `${live} live of ${view.nodes.length}` +
    (filter ? `, ${shown} shown` : "");
  if (!view.firstNodes && view.nodes.length) {
    view.firstNodes = performance.now();
    performance.mark("fedge-nodes-rendered");
  }
}

function renderEvents() {
  const list = $("event-list");
  list.replaceChildren(...view.events.map((e) => {
    const li = el("li");
    const t = el("time", new Date(e.time * 1000).toLocaleTimeString());
    const fields = Object.entries(e.fields).map(([k, v]) => `${k}=${v}`).join(" ");
    li.append(t, document.createTextNode(`${e.name} ${fields}`));
    return li;
  }));
}

function connect() {
  const source = new EventSource("/api/events");
  const on = (name, handle) => source.addEventListener(name, (e) => {
    handle(JSON.parse(e.data));
    schedule(name);
  });
  on("config", (d) => { view.config = d; });
  on("run", (d) => { view.run = d; view.offset = d.server_time - Date.now() / 1000; });
  on("rounds", (d) => { view.rounds = view.rounds.slice(0, d.from).concat(d.rounds); });
  on("nodes", (d) => { view.nodes = d.nodes; });
  on("events", (d) => { view.events = d; });
  source.onopen = () => { $("link").textContent = "live"; $("link").className = "link on"; };
  source.onerror = () => {
    $("link").textContent = "reconnecting";
    $("link").className = "link off";
    if (source.readyState === EventSource.CLOSED) setTimeout(() => location.reload(), 3000);
  };
}

document.addEventListener("DOMContentLoaded", () => {
  $("filter").addEventListener("input", () => schedule("nodes"));
  connect();
});

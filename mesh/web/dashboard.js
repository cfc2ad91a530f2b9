// kvmesh live dashboard: polls /dashboard/api/mesh, draws the mesh and live charts.
// Plain DOM and canvas, no libraries: the page must work offline from the router alone.
"use strict";

const POLL_MS = 1000;
const POINTS = 120;
const COLORS = ["#58a6ff", "#3fb950", "#d29922", "#bc8cff", "#f778ba", "#39c5cf", "#ff7b72", "#e3b341"];
const state = { series: new Map(), colors: new Map(), last: null };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v; else node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmt(x, digits = 1) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (Math.abs(x) >= 1000) return Math.round(x).toLocaleString("en");
  return Number(x).toFixed(digits);
}

function colorOf(id) {
  if (!state.colors.has(id)) state.colors.set(id, COLORS[state.colors.size % COLORS.length]);
  return state.colors.get(id);
}

// -- rates from cumulative counters -------------------------------------------------------
function observe(snap) {
  const id = snap.router.node_id;
  let s = state.series.get(id);
  if (!s) { s = { prev: null, rps: [], ttfb: [], hit: [] }; state.series.set(id, s); }
  const c = snap.counters;
  const p = s.prev;
  if (p && snap.t > p.t && c.requests >= p.c.requests) {
    const dt = snap.t - p.t;
    const dn = c.ttfb_count - p.c.ttfb_count;
    const dp = c.prompt_tokens - p.c.prompt_tokens;
    push(s.rps, (c.requests - p.c.requests) / dt);
    push(s.ttfb, dn > 0 ? 1000 * (c.ttfb_sum - p.c.ttfb_sum) / dn : null);
    push(s.hit, dp > 0 ? 100 * (c.cached_tokens - p.c.cached_tokens) / dp : null);
  } else if (p && (snap.t < p.t || c.requests < p.c.requests)) {
    s.rps.length = 0; s.ttfb.length = 0; s.hit.length = 0;  // the router restarted
  }
  if (!p || snap.t !== p.t) s.prev = { t: snap.t, c };
}

function push(arr, v) { arr.push(v); if (arr.length > POINTS) arr.shift(); }

function latest(arr) {
  for (let i = arr.length - 1; i >= Math.max(0, arr.length - 5); i--) if (arr[i] !== null) return arr[i];
  return null;
}

// -- charts ---------------------------------------------------------------------------------
function drawChart(canvas, key) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  }
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  let max = 0, len = 0;
  for (const s of state.series.values()) {
    len = Math.max(len, s[key].length);
    for (const v of s[key]) if (v !== null && v > max) max = v;
  }
  const span = Math.min(POINTS, Math.max(30, len));  // a short history fills the width
  max = niceMax(key === "hit" ? Math.max(max, 100) : max);
  const left = 38, right = 6, top = 6, bottom = 14;
  const pw = w - left - right, ph = h - top - bottom;
  g.font = "11px sans-serif"; g.fillStyle = "#8696a6"; g.strokeStyle = "#2a3642"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + ph - (ph * i) / 4;
    g.beginPath(); g.moveTo(left, y); g.lineTo(w - right, y); g.stroke();
    const tick = (max * i) / 4;
    g.fillText(fmt(tick, Number.isInteger(tick) ? 0 : 1), 2, y + 4);
  }
  g.fillText(`last ${span} s`, w - right - 60, h - 2);
  let drawn = 0;
  for (const [id, s] of state.series) {
    const arr = s[key];
    g.strokeStyle = colorOf(id); g.lineWidth = 1.6; g.beginPath();
    let pen = false;
    arr.forEach((v, i) => {
      const x = left + pw * (i + span - arr.length) / (span - 1);
      if (v === null) { pen = false; return; }
      const y = top + ph - ph * Math.min(v, max) / max;
      if (pen) g.lineTo(x, y); else g.moveTo(x, y);
      pen = true; drawn++;
    });
    g.stroke();
  }
  canvas.dataset.points = String(drawn);
}

function niceMax(x) {
  if (!(x > 0)) return 1;
  const e = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * e >= x) return m * e;
  return 10 * e;
}

// -- the mesh --------------------------------------------------------------------------------
function render(doc) {
  state.last = doc;
  for (const snap of doc.routers) observe(snap);
  document.getElementById("served-by").textContent = `served by ${doc.served_by}`;
  document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  renderSummary(doc);
  renderRegions(doc);
  renderRtt(doc);
  renderGossip(doc);
  renderTtftModel(doc);
  renderDecisions(doc);
  renderLegend(doc);
  for (const c of document.querySelectorAll("canvas[data-chart]")) drawChart(c, c.dataset.chart);
}

function replicaTable(rows) {
  const head = el("tr", {}, ["replica", "wait/run", "KV use", "in flight", "blocks", "load age"].map(h => el("th", {}, h)));
  const body = rows.map(r => el("tr", { class: r.healthy ? "" : "down", "data-replica": r.replica, "data-healthy": r.healthy ? "true" : "false" },
    el("td", { title: r.reason || "" }, el("span", { class: `dot ${r.healthy ? "ok" : "bad"}` }), r.replica, r.healthy ? "" : " (down)"),
    el("td", {}, `${fmt(r.waiting, 0)} / ${fmt(r.running, 0)}`),
    el("td", {}, el("span", { class: "bar", title: `KV cache ${fmt(100 * r.kv_usage)}% used` }, el("span", { style: `width:${Math.round(100 * Math.min(1, r.kv_usage))}%` })), ` ${fmt(100 * r.kv_usage, 0)}%`),
    el("td", {}, r.inflight),
    el("td", { class: "blocks" }, r.blocks === null ? "–" : r.blocks),
    el("td", {}, r.load_age_s === null ? "–" : `${fmt(r.load_age_s, 2)} s`)));
  return el("table", { class: "replicas" }, head, body);
}

function renderRegions(doc) {
  const regions = new Map();
  const region = name => { if (!regions.has(name)) regions.set(name, { routers: [], down: [], orphans: new Map() }); return regions.get(name); };
  const owned = new Set();
  for (const snap of doc.routers) {
    region(snap.router.region).routers.push(snap);
    for (const r of snap.replicas) if (r.own) owned.add(r.replica);
  }
  for (const u of doc.unreachable) region(u.region || "?").down.push(u);
  for (const snap of doc.routers) for (const r of snap.replicas)
    if (!owned.has(r.replica) && !region(r.region).orphans.has(r.replica)) region(r.region).orphans.set(r.replica, { ...r, via: snap.router.node_id });
  const box = document.getElementById("regions");
  box.replaceChildren(...[...regions.keys()].sort().map(name => {
    const reg = regions.get(name);
    const reps = reg.routers.flatMap(s => s.replicas.filter(r => r.own));
    const healthy = reps.filter(r => r.healthy).length + [...reg.orphans.values()].filter(r => r.healthy).length;
    const total = reps.length + reg.orphans.size;
    return el("div", { class: "region", "data-region": name },
      el("h3", {}, el("span", { class: `dot ${reg.routers.length ? (healthy === total ? "ok" : "warn") : "bad"}` }), `region ${name}`,
        el("span", { class: "muted" }, `  ${healthy}/${total} replicas healthy`)),
      reg.routers.map(s => {
        const r = s.router, w = r.warm;
        const warm = w.warm ? `warm in ${fmt(w.time_to_warm_s, 2)} s (${w.how})` : `warming: ${w.waiting_for}`;
        return el("div", { class: "router", "data-router": r.node_id },
          el("div", {}, el("span", { class: `dot ${r.ready ? "ok" : "warn"}` }), el("span", { class: "name" }, r.node_id),
            el("span", { class: "muted" }, `  ${r.policy} · queue ${r.queue} · up ${fmt(r.uptime_s, 0)} s · ${warm} · est. hit ${fmt(100 * r.hit_ratio, 0)}%`)),
          replicaTable(s.replicas.filter(x => x.own)));
      }),
      reg.down.map(u => el("div", { class: "router", "data-router": u.node_id, "data-unreachable": "true" },
        el("span", { class: "dot bad" }), el("span", { class: "name" }, u.node_id), el("span", { class: "muted" }, `  unreachable: ${u.error}`))),
      reg.orphans.size ? el("div", { class: "router" }, el("div", { class: "muted" }, "replicas whose router is not reachable (as peers see them)"), replicaTable([...reg.orphans.values()])) : null);
  }));
}

function renderSummary(doc) {
  const reps = new Map();
  for (const s of doc.routers) for (const r of s.replicas) if (r.own || !reps.has(r.replica)) reps.set(r.replica, r);
  const healthy = [...reps.values()].filter(r => r.healthy).length;
  const regions = new Set([...doc.routers.map(s => s.router.region), ...doc.unreachable.map(u => u.region)]);
  let rps = 0, ttfb = [], hit = [];
  for (const s of state.series.values()) {
    rps += latest(s.rps) || 0;
    const t = latest(s.ttfb); if (t !== null) ttfb.push(t);
    const h = latest(s.hit); if (h !== null) hit.push(h);
  }
  const mean = a => a.length ? a.reduce((x, y) => x + y, 0) / a.length : null;
  const warm = doc.routers.filter(s => s.router.warm.warm).length;
  const cards = [
    ["regions", regions.size], ["routers reachable", `${doc.routers.length}/${doc.routers.length + doc.unreachable.length}`],
    ["replicas healthy", `${healthy}/${reps.size}`], ["routers warm", `${warm}/${doc.routers.length}`],
    ["requests/s", fmt(rps)], ["mean TTFB (ms)", fmt(mean(ttfb), 0)], ["est. cache hit", hit.length ? `${fmt(mean(hit), 0)}%` : "–"],
  ];
  document.getElementById("summary").replaceChildren(...cards.map(([k, v]) =>
    el("div", { class: "card", "data-card": k }, el("div", { class: "v" }, v), el("div", { class: "k" }, k))));
}

function renderRtt(doc) {
  const regions = [...new Set(doc.routers.map(s => s.router.region))].sort();
  const from = new Map();
  for (const s of doc.routers) if (!from.has(s.router.region)) from.set(s.router.region, s.region_rtt_ms || {});
  for (const s of doc.routers) for (const k of Object.keys(s.region_rtt_ms || {})) if (!regions.includes(k)) regions.push(k);
  const head = el("tr", {}, el("th", {}, "from \\ to"), regions.map(r => el("th", {}, r)));
  const rows = [...from.keys()].sort().map(a => el("tr", {}, el("th", {}, a), regions.map(b =>
    el("td", { "data-rtt": `${a}:${b}` }, a === b ? "·" : fmt(from.get(a)[b], 1)))));
  document.getElementById("rtt").replaceChildren(head, ...rows);
}

function renderGossip(doc) {
  const head = el("tr", {}, ["router", "peers alive", "max load lag", "mean load lag", "longest prefix silence"].map(h => el("th", {}, h)));
  const rows = doc.routers.map(s => {
    const alive = s.peers.filter(p => p.state === "alive").length;
    const silences = Object.values(s.gossip.prefix_silence_s || {});
    return el("tr", { "data-gossip": s.router.node_id }, el("td", {}, s.router.node_id), el("td", {}, `${alive}/${s.peers.length}`),
      el("td", {}, s.gossip.max_lag_s === null ? "–" : `${fmt(s.gossip.max_lag_s, 2)} s`),
      el("td", {}, s.gossip.mean_lag_s === null ? "–" : `${fmt(s.gossip.mean_lag_s, 2)} s`),
      el("td", {}, silences.length ? `${fmt(Math.max(...silences), 1)} s` : "–"));
  });
  document.getElementById("gossip").replaceChildren(head, ...rows);
}

function renderTtftModel(doc) {
  // Per router and region pair: median |observed - predicted| / observed, bias, forwards lost.
  const head = el("tr", {}, ["router", "route", "n", "median error", "bias", "lost", "band"].map(h => el("th", {}, h)));
  const rows = [];
  for (const s of doc.routers) {
    const m = s.ttft_model;
    if (!m) continue;
    const bands = m.errors.bands_s || {};
    for (const [pair, w] of Object.entries(m.errors.pairs || {})) {
      const to = pair.split("->")[1];
      rows.push(el("tr", { "data-ttft": `${s.router.node_id}:${pair}` }, el("td", {}, s.router.node_id), el("td", {}, pair),
        el("td", {}, `${w.count}`),
        el("td", {}, w.median_abs_rel_error === null ? "–" : `${fmt(100 * w.median_abs_rel_error, 0)}%`),
        el("td", {}, w.bias === null ? "–" : `${fmt(100 * w.bias, 0)}%`),
        el("td", {}, w.lost === undefined ? "–" : `${w.lost}`),
        el("td", {}, bands[to] === undefined ? "–" : `${fmt(1000 * bands[to], 0)} ms`)));
    }
  }
  document.getElementById("ttft-model").replaceChildren(head, ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 7, class: "muted" }, "no outcomes yet"))]));
}

function renderDecisions(doc) {
  const all = doc.routers.flatMap(s => s.decisions.map(d => ({ ...d, router: s.router.node_id })));
  all.sort((a, b) => a.age_s - b.age_s);
  const head = el("tr", {}, ["age", "router", "outcome", "target", "prefix", "reason"].map(h => el("th", {}, h)));
  const rows = all.slice(0, 25).map(d => el("tr", { class: d.outcome === "none" ? "down" : "" },
    el("td", {}, `${fmt(d.age_s, 1)} s`), el("td", {}, d.router), el("td", {}, d.outcome),
    el("td", {}, d.replica || (d.region ? `region ${d.region}` : "–")),
    el("td", {}, d.outcome === "pinned" ? `– / ${d.prompt_tokens} tok` : `${d.matched_blocks} blk / ${d.prompt_tokens} tok`), el("td", { class: "reason" }, d.reason)));
  document.getElementById("decisions").replaceChildren(head, ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 6, class: "muted" }, "no requests yet"))]));
}

function renderLegend(doc) {
  document.getElementById("legend").replaceChildren(...doc.routers.map(s =>
    el("span", {}, el("i", { style: `background:${colorOf(s.router.node_id)}` }), `${s.router.node_id} (${s.router.region})`)));
}

function setConn(ok, why) {
  const c = document.getElementById("conn");
  c.textContent = ok ? "live" : `no answer: ${why}`;
  c.className = `pill ${ok ? "ok" : "bad"}`;
}

async function poll() {
  try {
    const resp = await fetch("/dashboard/api/mesh", { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
    setConn(true);
  } catch (err) {
    setConn(false, err && err.message ? err.message : String(err));
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

window.addEventListener("resize", () => {
  if (state.last) for (const c of document.querySelectorAll("canvas[data-chart]")) drawChart(c, c.dataset.chart);
});
poll();

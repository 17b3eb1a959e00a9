// rim's operator page: polls GET /admin/state and draws it. Rates come from successive samples
// of cluster-wide totals (entries added to the push streams; entries job delivered and trimmed
// from them), so the
// first figures appear on the second poll.
//
// The token (admin.secret or push.secret) is kept in this tab only (sessionStorage). It can be
// given in the address as #token=... (moved into storage and out of the address bar at once).
// ?every=MS sets the poll interval (default 2000, at least 250).
//
// Every value from the server is written with textContent: room names, refusal reasons and
// worker ids come from clients and are never parsed as HTML.

const EVERY = Math.max(250, Number(new URLSearchParams(location.search).get("every")) || 2000);
const SAMPLES = 60; // chart window, in polls
const KEY = "rim-admin-token";

const $ = (id) => document.getElementById(id);
const byTest = (id) => document.querySelector(`[data-testid="${id}"]`);

let token = sessionStorage.getItem(KEY) || "";

/** Takes a #token=... from the address (at load, or pasted into an open page). */
function tokenFromAddress() {
  // Not URLSearchParams: it reads "+" as a space, and secrets may hold "+" (base64).
  const m = location.hash.match(/(?:^#|&)token=([^&]*)/);
  if (!m || !m[1]) return false;
  token = decodeURIComponent(m[1]);
  sessionStorage.setItem(KEY, token);
  history.replaceState(null, "", location.pathname + location.search);
  return true;
}
tokenFromAddress();

const samples = []; // {t, added, delivered}
let timer;

function setStatus(state, text) {
  const s = byTest("status");
  s.dataset.state = state;
  s.textContent = text;
}

function cell(tr, value, cls) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "–" : String(value);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

/** Replaces `tbody`'s rows with one per item (`fill(tr, item)`), or an "empty" row. */
function rows(tbody, items, testid, fill, empty) {
  const out = [];
  for (const item of items) {
    const tr = document.createElement("tr");
    tr.dataset.testid = testid;
    fill(tr, item);
    out.push(tr);
  }
  if (!out.length) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = cell(tr, empty);
    td.colSpan = tbody.closest("table").querySelectorAll("th").length;
    out.push(tr);
  }
  tbody.replaceChildren(...out);
}

function ago(ms, now) {
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 90) return `${s}s`;
  if (s < 5400) return `${Math.round(s / 60)}m`;
  if (s < 172800) return `${Math.round(s / 3600)}h`;
  return `${Math.round(s / 86400)}d`;
}

function rate(key) {
  if (samples.length < 2) return null;
  const a = samples[samples.length - 2];
  const b = samples[samples.length - 1];
  if (a[key] === null || b[key] === null || b.t <= a.t) return null;
  return Math.max(0, (b[key] - a[key]) / ((b.t - a.t) / 1000));
}

function fmtRate(r) {
  if (r === null) return "–";
  return r >= 100 ? Math.round(r).toLocaleString() : r.toFixed(1);
}

function drawChart() {
  const c = $("chart");
  // Drawn at the canvas's on-screen size, so lines stay sharp at any width.
  const ratio = window.devicePixelRatio || 1;
  c.width = Math.round(c.clientWidth * ratio);
  c.height = Math.round(c.clientHeight * ratio);
  const ctx = c.getContext("2d");
  ctx.scale(ratio, ratio);
  const w = c.clientWidth;
  const h = c.clientHeight;
  const series = (key) => {
    const out = [];
    for (let i = 1; i < samples.length; i++) {
      const a = samples[i - 1];
      const b = samples[i];
      out.push(a[key] === null || b[key] === null ? null : Math.max(0, (b[key] - a[key]) / ((b.t - a.t) / 1000)));
    }
    return out;
  };
  const inS = series("added");
  const outS = series("delivered");
  const max = Math.max(1, ...inS.filter((v) => v !== null), ...outS.filter((v) => v !== null));
  ctx.strokeStyle = "#e3e7ec";
  ctx.beginPath();
  ctx.moveTo(0, h - 0.5);
  ctx.lineTo(w, h - 0.5);
  ctx.stroke();
  // The samples so far span the width (the window fills up to SAMPLES polls).
  const plot = (values, color) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    values.forEach((v, i) => {
      if (v === null) return;
      const x = values.length < 2 ? w : (i / (values.length - 1)) * w;
      const y = h - 4 - (v / max) * (h - 20);
      if (started) ctx.lineTo(x, y);
      else ctx.moveTo(x, y);
      started = true;
    });
    ctx.stroke();
  };
  plot(inS, "#2f6fdf");
  plot(outS, "#1f9d6a");
  ctx.fillStyle = "#6b7685";
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "right";
  ctx.fillText(`max ${fmtRate(max)}/s`, w - 4, 12);
}

function render(d) {
  const now = d.now_ms;
  samples.push({ t: now, added: d.pushes.added, delivered: d.pushes.delivered });
  if (samples.length > SAMPLES) samples.shift();
  window.__rimSamples = (window.__rimSamples || 0) + 1; // for tests: polls rendered

  byTest("sessions").textContent = d.sessions.toLocaleString();
  byTest("comet-count").textContent = d.nodes.length;
  byTest("room-count").textContent = d.room_count.toLocaleString();
  const rin = rate("added");
  const rout = rate("delivered");
  byTest("rate-in").textContent = fmtRate(rin);
  byTest("rate-in").dataset.value = rin === null ? "" : String(rin);
  byTest("rate-out").textContent = fmtRate(rout);
  byTest("rate-out").dataset.value = rout === null ? "" : String(rout);
  // Redis cannot always say a group's lag (after trims); what is in the stream and not pending
  // is then the best figure (unread, or delivered but not trimmed yet).
  const waiting = (p) => (p.lag !== null ? p.lag : Math.max(0, p.length - p.pending));
  const lag = d.partitions.reduce((n, p) => n + waiting(p), 0);
  byTest("lag-total").textContent = lag.toLocaleString();
  $("window").textContent = `${Math.round((EVERY * SAMPLES) / 1000)} s`;

  rows($("nodes"), d.nodes, "node-row", (tr, n) => {
    tr.dataset.server = n.server;
    cell(tr, n.server);
    cell(tr, n.connections.toLocaleString());
    cell(tr, n.ips.toLocaleString());
    cell(tr, n.rooms);
    cell(tr, n.weight);
    cell(tr, ago(n.started_ms, now));
    cell(tr, `${ago(n.renewed_ms, now)} ago`);
    cell(tr, [n.wss_addr, n.ws_addr, n.tcp_addr].filter(Boolean).join("  "));
  }, "no live comet");

  rows($("rooms"), d.rooms, "room-row", (tr, r) => {
    tr.dataset.room = r.room;
    cell(tr, r.room);
    cell(tr, r.count.toLocaleString());
  }, "no room has members");

  const live = new Set(d.workers.map((w) => w.id));
  rows($("partitions"), d.partitions, "partition-row", (tr, p) => {
    if (!p.holder || !live.has(p.holder)) tr.className = "unheld";
    else if (waiting(p) > 0) tr.className = "lagging";
    cell(tr, p.partition);
    cell(tr, p.length.toLocaleString());
    cell(tr, p.lag !== null ? p.lag : `≈${waiting(p)}`);
    cell(tr, p.pending);
    cell(tr, p.holder || "nobody");
  }, "no partitions");

  rows($("workers"), d.workers, "worker-row", (tr, w) => {
    cell(tr, w.id);
    cell(tr, w.partitions.length ? w.partitions.join(", ") : "none");
    cell(tr, `expires in ${ago(now, w.expiry_ms)}`);
  }, "no live job worker");

  rows($("refusals"), d.refusals, "refusal-row", (tr, r) => {
    cell(tr, new Date(r.at_ms).toLocaleTimeString());
    cell(tr, r.kind);
    cell(tr, r.reason, "reason");
    cell(tr, r.detail, "reason");
  }, "none since this logic started");

  drawChart();
  byTest("updated").textContent = `updated ${new Date(now).toLocaleTimeString()}`;
}

function showLogin(why) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-why").textContent = why;
  byTest("forget-token").hidden = true;
  setStatus("unauthorized", "token needed");
}

async function poll() {
  clearTimeout(timer);
  try {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const r = await fetch("/admin/state", { headers, cache: "no-store" });
    const body = await r.json();
    if (r.status === 401) {
      showLogin(token ? "That token was refused." : body.message);
      return; // polling resumes once a token is given
    }
    if (body.code !== 0) throw new Error(body.message || `HTTP ${r.status}`);
    $("main").hidden = false;
    $("login").hidden = true;
    byTest("forget-token").hidden = !token;
    render(body.data);
    setStatus("live", "live");
  } catch (e) {
    setStatus("error", `error: ${e.message}`);
  }
  timer = setTimeout(poll, EVERY);
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem(KEY, token);
  $("token").value = "";
  poll();
});

window.addEventListener("hashchange", () => {
  if (tokenFromAddress()) poll();
});

byTest("forget-token").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  token = "";
  poll();
});

poll();

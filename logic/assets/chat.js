// The chatroom demo page: dev login over HTTP, then everything live over one RimClient
// (binary goim frames on WebSocket). Room messages and DMs are app op 1000; presence is op 24.
import { RimClient } from "./rim-client.js";

const CHAT_OP = 1000;
const HEARTBEAT_MS = 5000;
const MEMBERS_REFRESH_MS = 5000;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

const ui = {
  status: document.querySelector('[data-testid="status"]'),
  statusText: $("status-text"),
  loginView: $("login-view"),
  loginForm: $("login-form"),
  name: $("name"),
  comet: $("comet"),
  login: $("login"),
  loginError: $("login-error"),
  chatView: $("chat-view"),
  whoami: $("whoami"),
  meName: $("me-name"),
  meAvatar: $("me-avatar"),
  logout: $("logout"),
  roomForm: $("room-form"),
  room: $("room"),
  join: $("join"),
  roomError: $("room-error"),
  online: $("online"),
  messages: $("messages"),
  composer: $("composer"),
  dmTarget: $("dm-target"),
  dmName: $("dm-name"),
  dmCancel: $("dm-cancel"),
  message: $("message"),
  send: $("send"),
  sendError: $("send-error"),
  members: $("members"),
  memberCount: $("member-count"),
};

const state = {
  me: null, // {mid, name, token}
  client: null,
  room: params.get("room") || "chat://lobby",
  names: new Map(), // mid → name
  dm: null, // {mid, name} while composing a direct message
  sentCids: new Set(),
  sendChain: Promise.resolve(),
  membersTimer: null,
  countdownTimer: null,
  wasOnline: false,
};
ui.room.value = state.room;

// ---- small helpers ------------------------------------------------------------------------

function show(el, text) {
  el.textContent = text;
  el.hidden = !text;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function nameOf(mid) {
  return state.names.get(Number(mid)) || `user ${mid}`;
}

function hue(mid) {
  return (Number(mid) * 137.508) % 360;
}

function avatar(mid, name) {
  const a = el("span", { class: "avatar" }, (name || "?").trim().charAt(0).toUpperCase() || "?");
  a.style.setProperty("--hue", hue(mid));
  return a;
}

function timeNow() {
  return new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function randomId() {
  const b = new Uint8Array(8);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

async function api(method, path) {
  const res = await fetch(path, { method, headers: { accept: "application/json" } });
  let body;
  try {
    body = await res.json();
  } catch {
    throw new Error(`${method} ${path}: HTTP ${res.status}`);
  }
  if (!res.ok || body.code !== 0) throw new Error(body.message || `${method} ${path}: HTTP ${res.status}`);
  return body.data;
}

// "host:port" → "ws://host:port/sub"; full ws:// or wss:// URLs are kept.
function wsUrl(addr) {
  if (/^wss?:\/\//i.test(addr)) return new URL(addr).pathname === "/" ? addr.replace(/\/?$/, "/sub") : addr;
  return `${location.protocol === "https:" ? "wss" : "ws"}://${addr}/sub`;
}

// ---- status -------------------------------------------------------------------------------

function setStatus(stateName, text) {
  ui.status.dataset.state = stateName;
  ui.statusText.textContent = text;
}

function onStatus(s, info) {
  clearInterval(state.countdownTimer);
  state.countdownTimer = null;
  if (s === "connecting") {
    setStatus("connecting", info.attempt ? `connecting (attempt ${info.attempt + 1})…` : "connecting…");
  } else if (s === "online") {
    setStatus("online", `online · ${cometLabel()}`);
    if (state.wasOnline) {
      notice(`Reconnected to ${cometLabel()}.`);
      // A new session: it rejoined the room it was in; catch up on who is here.
      refreshMembers();
    }
    state.wasOnline = true;
    setComposerEnabled(true);
  } else if (s === "reconnecting") {
    setComposerEnabled(false);
    const tick = () => {
      const secs = Math.max(0, Math.ceil((info.retryAt - Date.now()) / 1000));
      const why = info.reason ? ` — ${info.reason}` : "";
      setStatus("reconnecting", `reconnecting in ${secs}s (attempt ${info.attempt})${why}`);
    };
    tick();
    state.countdownTimer = setInterval(tick, 250);
  } else if (s === "closed") {
    setComposerEnabled(false);
    setStatus("closed", info.reason ? `disconnected: ${info.reason}` : "disconnected");
    if (info.fatal) notice(`Disconnected for good: ${info.reason}`);
  }
}

function cometLabel() {
  return ui.comet.value || "comet";
}

function setComposerEnabled(on) {
  ui.send.disabled = !on;
  ui.join.disabled = !on;
}

// ---- messages -----------------------------------------------------------------------------

function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function append(node) {
  const stick = nearBottom();
  ui.messages.append(node);
  if (stick) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function notice(text) {
  append(el("li", { class: "notice", "data-testid": "notice" }, text));
}

/**
 * Renders one chat message. `dmPeer` is the other side of a direct message (null for room
 * messages). Returns the element so the sender can mark it delivered or failed.
 */
function renderMessage({ from, name, text, dm, dmPeer, mine, pending }) {
  const tag = dm ? (mine ? `direct to ${nameOf(dmPeer)}` : "direct message") : null;
  const node = el(
    "li",
    {
      class: `msg${mine ? " mine" : ""}${dm ? " dm" : ""}${pending ? " pending" : ""}`,
      "data-testid": "message",
      dataset: { from: String(from), dm: String(!!dm), mine: String(!!mine) },
    },
    avatar(from, name),
    el(
      "div",
      { class: "bubble" },
      el(
        "div",
        { class: "meta" },
        el("span", { class: "who" }, mine ? `${name} (you)` : name),
        tag ? el("span", { class: "tag", "data-testid": "dm-tag" }, tag) : null,
        el("time", {}, timeNow()),
      ),
      el("div", { class: "text", "data-testid": "message-text" }, text),
      el("div", { class: "err", "data-testid": "message-error", hidden: "" }),
    ),
  );
  append(node);
  return node;
}

function onPush(op, _body, text, meta) {
  if (op !== CHAT_OP) return;
  // A room message of a room this page has just left (while switching rooms).
  if (meta && meta.room && meta.room !== state.room) return;
  let msg;
  try {
    msg = JSON.parse(text);
  } catch {
    return;
  }
  const data = msg && typeof msg.data === "object" && msg.data ? msg.data : { text: String(msg?.data ?? "") };
  // Our own message echoed to this session (only if the server did not exclude the sender).
  if (data.cid && state.sentCids.has(data.cid)) return;
  const from = Number(msg.from);
  if (data.name && !state.names.has(from)) state.names.set(from, String(data.name));
  renderMessage({
    from,
    name: data.name ? String(data.name) : nameOf(from),
    text: String(data.text ?? JSON.stringify(data)),
    dm: !!data.dm,
    mine: state.me && from === state.me.mid,
  });
}

// ---- sending ------------------------------------------------------------------------------

function send(text) {
  const me = state.me;
  const dm = state.dm;
  const cid = randomId();
  state.sentCids.add(cid);
  const data = { text, name: me.name, cid };
  if (dm) data.dm = true;
  const node = renderMessage({
    from: me.mid,
    name: me.name,
    text,
    dm: !!dm,
    dmPeer: dm && dm.mid,
    mine: true,
    pending: true,
  });
  const target = dm ? { mid: dm.mid } : { room: state.room };
  // One at a time, so the room sees our messages in the order we typed them.
  state.sendChain = state.sendChain
    .then(() => state.client.sendMsg(target, CHAT_OP, data))
    .then(
      (r) => {
        node.classList.remove("pending");
        if (r.code === 0) {
          node.dataset.id = r.id || "";
          show(ui.sendError, "");
        } else {
          failed(node, r.message || `error ${r.code}`, r.code);
        }
      },
      (e) => failed(node, e.message || String(e)),
    );
}

function failed(node, why, code) {
  node.classList.remove("pending");
  node.classList.add("failed");
  node.dataset.error = String(code ?? "");
  const err = node.querySelector(".err");
  show(err, `not delivered: ${why}`);
  show(ui.sendError, `Could not send: ${why}`);
}

function setDm(member) {
  state.dm = member;
  ui.dmTarget.hidden = !member;
  ui.dmTarget.dataset.mid = member ? String(member.mid) : "";
  ui.dmName.textContent = member ? member.name : "";
  ui.message.placeholder = member ? `Message ${member.name} directly` : "Message the room";
  ui.composer.classList.toggle("dm", !!member);
  for (const li of ui.members.children) li.classList.toggle("selected", !!member && li.dataset.mid === String(member.mid));
  ui.message.focus();
}

// ---- members and presence -----------------------------------------------------------------

let membersInFlight = null;

function refreshMembers() {
  if (!state.me) return Promise.resolve();
  if (membersInFlight) return membersInFlight;
  const room = state.room;
  membersInFlight = (async () => {
    const all = [];
    let cursor = "";
    for (let page = 0; page < 20; page++) {
      const q = cursor ? `?cursor=${encodeURIComponent(cursor)}` : "";
      const data = await api("GET", `/rim/rooms/${encodeURIComponent(room)}/members${q}`);
      all.push(...(data.members || []));
      cursor = data.cursor == null ? "" : String(data.cursor);
      if (!cursor || cursor === "0") break;
    }
    if (room === state.room) renderMembers(all);
  })()
    .catch((e) => console.warn("member list:", e.message))
    .finally(() => {
      membersInFlight = null;
    });
  return membersInFlight;
}

function renderMembers(members) {
  members.sort((a, b) => (a.mid === state.me.mid ? -1 : b.mid === state.me.mid ? 1 : String(a.name).localeCompare(String(b.name))));
  const items = members.map((m) => {
    const mid = Number(m.mid);
    const name = m.name ? String(m.name) : `user ${mid}`;
    state.names.set(mid, name);
    const self = mid === state.me.mid;
    const li = el(
      "li",
      {
        class: `member${self ? " self" : ""}${state.dm && state.dm.mid === mid ? " selected" : ""}`,
        "data-testid": "member",
        dataset: { mid: String(mid) },
      },
      el(
        "button",
        {
          type: "button",
          title: self ? "This is you" : `Send ${name} a direct message`,
          onclick: () => {
            if (self) return;
            setDm(state.dm && state.dm.mid === mid ? null : { mid, name });
          },
        },
        avatar(mid, name),
        el("span", { class: "member-name" }, self ? `${name} (you)` : name),
        m.sessions > 1 ? el("span", { class: "sessions", title: "sessions" }, `×${m.sessions}`) : null,
      ),
    );
    return li;
  });
  ui.members.replaceChildren(...items);
  ui.memberCount.textContent = String(members.length);
}

function onRoomEvent(evt) {
  if (!evt || evt.room !== state.room) return;
  const mid = Number(evt.mid);
  refreshMembers().then(() => {
    if (state.me && mid === state.me.mid) return;
    notice(`${nameOf(mid)} ${evt.event === "join" ? "joined" : "left"} the room`);
  });
  // The count in a heartbeat reply lags membership by a comet renewal: ask now and once more soon.
  const client = state.client;
  if (client) {
    client.heartbeat().catch(() => {});
    setTimeout(() => client.state === "online" && client.heartbeat().catch(() => {}), 1500);
  }
}

// ---- login, connect, rooms ----------------------------------------------------------------

async function loadComets() {
  const forced = params.get("comet");
  let nodes = [];
  try {
    nodes = (await api("GET", "/goim/nodes/weighted?platform=web")).nodes || [];
  } catch (e) {
    if (!forced) show(ui.loginError, `Could not list comets: ${e.message}`);
  }
  const list = forced ? [forced, ...nodes.filter((n) => n !== forced)] : nodes;
  ui.comet.replaceChildren(
    ...list.map((n, i) => el("option", { value: n }, i === 0 && !forced ? `${n} (least loaded)` : n)),
  );
  if (!list.length) ui.comet.append(el("option", { value: "" }, "no comet is up"));
}

async function login(ev) {
  ev.preventDefault();
  const name = ui.name.value.trim();
  if (!name) return;
  show(ui.loginError, "");
  ui.login.disabled = true;
  try {
    if (!ui.comet.value) await loadComets();
    if (!ui.comet.value) throw new Error("no comet to connect to");
    const me = await api("POST", `/rim/dev/login?name=${encodeURIComponent(name)}`);
    state.me = { mid: Number(me.mid), name: me.name || name, token: me.token || "" };
    state.names.set(state.me.mid, state.me.name);
    enterChat();
    await connect();
  } catch (e) {
    show(ui.loginError, e.message || String(e));
    leaveChat();
  } finally {
    ui.login.disabled = false;
  }
}

function enterChat() {
  ui.loginView.hidden = true;
  ui.chatView.hidden = false;
  ui.whoami.hidden = false;
  ui.whoami.dataset.mid = String(state.me.mid);
  ui.meName.textContent = `${state.me.name} #${state.me.mid}`;
  ui.meAvatar.replaceWith((ui.meAvatar = avatar(state.me.mid, state.me.name)));
  ui.meAvatar.id = "me-avatar";
  ui.messages.replaceChildren();
  notice(`You are ${state.me.name} (mid ${state.me.mid}). Joining ${state.room}…`);
}

function leaveChat() {
  if (state.client) state.client.close();
  state.client = null;
  state.me = null;
  state.wasOnline = false;
  clearInterval(state.membersTimer);
  setDm(null);
  ui.chatView.hidden = true;
  ui.whoami.hidden = true;
  ui.loginView.hidden = false;
  setStatus("idle", "not connected");
}

async function connect() {
  const client = new RimClient({
    url: wsUrl(ui.comet.value),
    auth: {
      mid: state.me.mid,
      token: state.me.token,
      room_id: state.room,
      platform: "web",
      accepts: [CHAT_OP],
    },
    heartbeatMs: HEARTBEAT_MS,
    onPush,
    onStatus,
    onOnline: (n) => {
      ui.online.textContent = String(n);
    },
    onRoomEvent,
    // Push ids, and the room's last messages when joining it (and what was missed after a
    // reconnect): the room's history, kept by logic (`[history.rooms.chat]`).
    recover: true,
  });
  state.client = client;
  await client.connect();
  notice(`Joined ${state.room} on ${cometLabel()}.`);
  refreshMembers();
  clearInterval(state.membersTimer);
  state.membersTimer = setInterval(refreshMembers, MEMBERS_REFRESH_MS);
  ui.message.focus();
}

async function joinRoom(ev) {
  ev.preventDefault();
  const room = ui.room.value.trim();
  if (!state.client || room === state.room) return;
  show(ui.roomError, "");
  ui.join.disabled = true;
  const from = state.room;
  try {
    // Joined with its recent history (it follows the reply), then out of the old room: the
    // page shows one room, with its last messages first.
    ui.messages.replaceChildren();
    await state.client.joinRoom(room, { recent: true });
    // Runs as the reply is read, before the history that follows it is.
    notice(`Joined ${room}.`);
    state.room = room;
    await state.client.leaveRoom(from);
    setDm(null);
    ui.members.replaceChildren();
    await refreshMembers();
    state.client.heartbeat().catch(() => {});
  } catch (e) {
    show(ui.roomError, `Could not join ${room}: ${e.message}`);
    ui.room.value = state.room;
  } finally {
    ui.join.disabled = state.client?.state !== "online";
  }
}

ui.loginForm.addEventListener("submit", login);
ui.roomForm.addEventListener("submit", joinRoom);
ui.composer.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = ui.message.value.trim();
  if (!text || !state.client || state.client.state !== "online") return;
  ui.message.value = "";
  send(text);
});
ui.message.addEventListener("keydown", (ev) => {
  if (ev.key === "Escape" && state.dm) setDm(null);
});
ui.dmCancel.addEventListener("click", () => setDm(null));
ui.logout.addEventListener("click", leaveChat);
if (params.get("name")) ui.name.value = params.get("name");

loadComets();

// rim-client.js — a small browser client for rim (and goim) speaking the binary protocol over
// WebSocket. No dependencies, no build step: copy this file into your app and import it.
//
//   import { RimClient } from "./rim-client.js";
//
//   const client = new RimClient({
//     url: "ws://127.0.0.1:3102/sub",
//     auth: { mid: 7, token: "", room_id: "chat://lobby", platform: "web", accepts: [1000] },
//     heartbeatMs: 5000,                          // op 2 every 5 s; op 3 carries the online count
//     onPush: (op, body, text) => {               // every push: op, body bytes, body as UTF-8 text
//       if (op === 1000) console.log("chat", JSON.parse(text)); // {"from":<mid>,"data":...}
//     },
//     onStatus: (state, info) => console.log(state, info), // connecting | online | reconnecting | closed
//     onOnline: (n) => console.log("online in room:", n),
//     onRoomEvent: (evt) => console.log(evt),    // {"event":"join"|"leave","mid":N,"room":"..."}
//     recover: true,                              // rim: resume rooms after a reconnect (below)
//   });
//   await client.connect();                      // resolves once authenticated (op 8)
//   const r = await client.sendMsg({ room: "chat://lobby" }, 1000, { text: "hi" });
//   // r is {code:0,id:"..."} or {code:<negative>,message:"why"} (op 5, matched by seq)
//   await client.sendMsg({ mid: 42 }, 1000, { text: "just for you" });
//   await client.changeRoom("chat://other");     // op 12 → op 13 (exactly that room afterwards)
//   await client.joinRoom("chat://more");        // op 18 → op 19 (rim: besides the others)
//   await client.joinRoom("chat://more", { recent: true }); // with recover: its last messages again
//   await client.leaveRoom("chat://more");       // op 20 → op 21
//   const online = await client.heartbeat();     // op 2 → op 3 (4-byte big-endian count)
//   client.close();                              // deliberate: no reconnect
//
// Wire format (all integers big-endian): a 16-byte header — packLen i32 (header + body),
// headerLen i16 (= 16), ver i16, op i32, seq i32 — then the body. The server sends each reply as
// one frame per WebSocket message and pushes as one op 9 (Raw) frame whose body holds one or more
// whole frames back to back; this client unwraps op 9 and hands each inner push to onPush.
//
// When the connection drops (network, server restart, heartbeat silence) the client reconnects
// with exponential backoff and jitter, authenticates again and re-joins its rooms.
//
// Recovery (rim, `recover: true`): the client asks at Auth for each push's id and history (an
// op 25 PushMeta frame before each recorded push; onPush's fourth argument is that meta,
// {id, room} or {id, user:true}), remembers the last id per room and for the user, and after a
// reconnect resumes from there: what it missed arrives first, in order, then live pushes; a
// push it already had is dropped. A room it has no id for yet sends what the room's history
// keeps (the last messages), also for joinRoom. `client.session.recovered` says, per history,
// whether everything missed was still kept ({user: bool, rooms: {room: bool}}).
// A server-side refusal that retrying cannot fix (bad token, bad room id, replaced) stops it.

/** Operation codes of the goim/rim client protocol. */
export const OP = Object.freeze({
  HEARTBEAT: 2,
  HEARTBEAT_REPLY: 3,
  SEND_MSG: 4,
  SEND_MSG_REPLY: 5,
  DISCONNECT_REPLY: 6,
  AUTH: 7,
  AUTH_REPLY: 8,
  RAW: 9,
  CHANGE_ROOM: 12,
  CHANGE_ROOM_REPLY: 13,
  SUB: 14,
  SUB_REPLY: 15,
  UNSUB: 16,
  UNSUB_REPLY: 17,
  JOIN_ROOM: 18,
  JOIN_ROOM_REPLY: 19,
  LEAVE_ROOM: 20,
  LEAVE_ROOM_REPLY: 21,
  ROOM_EVENT: 24,
  PUSH_META: 25,
});

export const HEADER_LEN = 16;
const PROTO_VER = 1;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Encodes one frame. `body` is a string (sent as UTF-8), a Uint8Array, or empty. */
export function encodeFrame(op, seq, body = "") {
  const bytes = typeof body === "string" ? encoder.encode(body) : body || new Uint8Array(0);
  const buf = new ArrayBuffer(HEADER_LEN + bytes.length);
  const view = new DataView(buf);
  view.setInt32(0, HEADER_LEN + bytes.length);
  view.setInt16(4, HEADER_LEN);
  view.setInt16(6, PROTO_VER);
  view.setInt32(8, op);
  view.setInt32(12, seq);
  new Uint8Array(buf, HEADER_LEN).set(bytes);
  return buf;
}

/**
 * Decodes the frames held back to back in `bytes` (a Uint8Array), unwrapping op 9 (Raw)
 * recursively. Returns [{ver, op, seq, body: Uint8Array}]. Throws on a malformed frame.
 */
export function decodeFrames(bytes) {
  const frames = [];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let off = 0;
  while (off < bytes.length) {
    if (bytes.length - off < HEADER_LEN) throw new Error(`short frame header at byte ${off}`);
    const packLen = view.getInt32(off);
    const headerLen = view.getInt16(off + 4);
    if (headerLen !== HEADER_LEN) throw new Error(`headerLen is ${headerLen}, must be 16`);
    if (packLen < HEADER_LEN || off + packLen > bytes.length) {
      throw new Error(`packLen ${packLen} does not fit the ${bytes.length - off} bytes left`);
    }
    const frame = {
      ver: view.getInt16(off + 6),
      op: view.getInt32(off + 8),
      seq: view.getInt32(off + 12),
      body: bytes.subarray(off + HEADER_LEN, off + packLen),
    };
    if (frame.op === OP.RAW) frames.push(...decodeFrames(frame.body));
    else frames.push(frame);
    off += packLen;
  }
  return frames;
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** Throws the `{"error":...}` a request's reply frame carries, if any. */
function throwIfError(frame) {
  const text = decoder.decode(frame.body);
  const err = text.startsWith("{") ? parseJson(text) : undefined;
  if (err && err.error) throw new Error(err.error);
}

/** Orders two history ids ("ms-seq"): negative, 0 or positive. */
export function compareIds(a, b) {
  const [am, as] = a.split("-").map(Number);
  const [bm, bs] = b.split("-").map(Number);
  return am !== bm ? am - bm : as - bs;
}

// Reasons (op 6) after which reconnecting cannot help.
const FATAL_REASONS = [/^unauthorized/i, /^bad request/i, /^bad auth body/i, /^replaced$/i];

/** A rim/goim client over WebSocket (binary frames). See the top of this file for usage. */
export class RimClient {
  /**
   * @param {object} opts
   * @param {string} opts.url  WebSocket URL, e.g. "ws://host:port/sub"
   * @param {object} opts.auth Auth body: {mid, token, key?, room_id, platform, accepts}
   * @param {number} [opts.heartbeatMs=30000]  heartbeat interval
   * @param {number} [opts.requestTimeoutMs=10000]  how long sendMsg/changeRoom/heartbeat wait
   * @param {number} [opts.backoffBaseMs=500]  first reconnect delay (doubles per attempt)
   * @param {number} [opts.backoffMaxMs=30000]  reconnect delay cap
   * @param {number} [opts.maxBody=4096]  largest frame body the server accepts from a client
   * @param {(op:number, body:Uint8Array, text:string)=>void} [opts.onPush]
   * @param {(state:string, info:object)=>void} [opts.onStatus]
   * @param {(online:number)=>void} [opts.onOnline]
   * @param {(evt:{event:string, mid:number, room:string})=>void} [opts.onRoomEvent]
   * @param {boolean} [opts.recover=false]  rim: push ids, resume after reconnects (see above)
   */
  constructor(opts) {
    if (!opts || !opts.url) throw new Error("RimClient: url is required");
    this.url = opts.url;
    this.auth = { platform: "web", accepts: [], ...(opts.auth || {}) };
    this.heartbeatMs = opts.heartbeatMs ?? 30000;
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 10000;
    this.backoffBaseMs = opts.backoffBaseMs ?? 500;
    this.backoffMaxMs = opts.backoffMaxMs ?? 30000;
    this.maxBody = opts.maxBody ?? 4096;
    this.onPush = opts.onPush || (() => {});
    this.onStatus = opts.onStatus || (() => {});
    this.onOnline = opts.onOnline || (() => {});
    this.onRoomEvent = opts.onRoomEvent || (() => {});
    this.recover = !!opts.recover;
    /** Last id seen per history: "user" and each room id ("ms-seq"). */
    this.positions = new Map();
    this._meta = null;

    /** connecting | online | reconnecting | closed */
    this.state = "closed";
    /** What the server said when it last closed us (op 6 reason or close reason). */
    this.lastReason = "";
    /** The AuthReply body of the current session ({mid, key, room_id, heartbeat}), if any. */
    this.session = null;
    this.online = 0;

    this._ws = null;
    this._seq = 0;
    this._pending = new Map(); // seq → {op, resolve, reject, timer}
    this._closedByUser = true;
    this._attempt = 0;
    this._reconnectTimer = null;
    this._heartbeatTimer = null;
    this._lastRecv = 0;
    this._connectWaiters = [];
  }

  /** The room this client is in (or will re-join after a reconnect). */
  get room() {
    return this.auth.room_id || "";
  }

  /** Opens the connection and authenticates. Resolves when online; rejects on a fatal refusal. */
  connect() {
    this._closedByUser = false;
    const done = new Promise((resolve, reject) => this._connectWaiters.push({ resolve, reject }));
    if (this.state === "online") this._settleConnect(null);
    else if (!this._ws && !this._reconnectTimer) this._open();
    return done;
  }

  /** Closes the connection on purpose; no reconnect follows. */
  close() {
    this._closedByUser = true;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._teardown("closed by client");
    this._setState("closed", { reason: "closed by client" });
    this._settleConnect(new Error("closed by client"));
  }

  /**
   * Sends an upstream message (op 4) to a room ({room}) or a user ({mid}) with app op `op`.
   * Resolves with the op 5 reply: {code:0,id} or {code:<negative>,message}. Rejects only when it
   * could not be sent or no reply came (not connected, too large, timeout, connection lost).
   */
  sendMsg(target, op, data) {
    const body = { op, data };
    if (target && target.room !== undefined) body.room = target.room;
    else if (target && target.mid !== undefined) body.mid = Number(target.mid);
    else return Promise.reject(new Error("sendMsg: target must be {room} or {mid}"));
    const bytes = encoder.encode(JSON.stringify(body));
    if (bytes.length > this.maxBody) {
      return Promise.reject(new Error(`message is ${bytes.length} bytes, the limit is ${this.maxBody}`));
    }
    return this._request(OP.SEND_MSG, bytes).then((frame) => {
      const reply = parseJson(decoder.decode(frame.body));
      if (!reply || typeof reply.code !== "number") {
        return { code: -500, message: `unreadable reply: ${decoder.decode(frame.body)}` };
      }
      return reply;
    });
  }

  /**
   * Moves to `room` ("type://id"; "" leaves every room): afterwards the session is in exactly
   * that room. Resolves with the room; rejects on error.
   */
  changeRoom(room) {
    return this._request(OP.CHANGE_ROOM, room).then((frame) => {
      throwIfError(frame);
      this.auth.room_id = room;
      this.auth.rooms = [];
      if (this.session) this.session.room_id = room;
      return room;
    });
  }

  /**
   * Joins `room` besides the session's other rooms (rim). With `recover`, also catches up on the
   * room's history after the last id seen there, or sends its last messages when none was seen
   * or `{recent: true}` asks for them again (a page that cleared its view). Resolves with the
   * room; rejects on error.
   */
  joinRoom(room, { recent = false } = {}) {
    if (recent) this.positions.delete(room);
    const body = this.recover ? JSON.stringify({ room, recover: this.positions.get(room) ?? "" }) : room;
    return this._request(OP.JOIN_ROOM, body).then((frame) => {
      throwIfError(frame);
      // Re-joined after a reconnect, with the others.
      const rooms = this.auth.rooms || [];
      if (room !== this.auth.room_id && !rooms.includes(room)) this.auth.rooms = [...rooms, room];
      return room;
    });
  }

  /** Leaves `room`, staying in the others (rim). Resolves with it; rejects on error. */
  leaveRoom(room) {
    return this._request(OP.LEAVE_ROOM, room).then((frame) => {
      throwIfError(frame);
      if (this.auth.room_id === room) {
        // The next room becomes the first one, as on the server.
        const [next, ...rest] = this.auth.rooms || [];
        this.auth.room_id = next || "";
        this.auth.rooms = rest;
      } else {
        this.auth.rooms = (this.auth.rooms || []).filter((r) => r !== room);
      }
      return room;
    });
  }

  /** Sends a heartbeat now. Resolves with the online count of the room (op 3). */
  heartbeat() {
    return this._request(OP.HEARTBEAT, "").then(() => this.online);
  }

  // ---- internals -------------------------------------------------------------------------

  _setState(state, info = {}) {
    this.state = state;
    try {
      this.onStatus(state, info);
    } catch (e) {
      console.error("onStatus handler failed", e);
    }
  }

  _settleConnect(err) {
    const waiters = this._connectWaiters;
    this._connectWaiters = [];
    for (const w of waiters) (err ? w.reject(err) : w.resolve(this.session));
  }

  _nextSeq() {
    this._seq = (this._seq % 0x7fffffff) + 1;
    return this._seq;
  }

  _send(op, seq, body) {
    if (!this._ws || this._ws.readyState !== WebSocket.OPEN) return false;
    this._ws.send(encodeFrame(op, seq, body));
    return true;
  }

  _request(op, body) {
    if (this.state !== "online") return Promise.reject(new Error(`not connected (${this.state})`));
    const seq = this._nextSeq();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(seq);
        reject(new Error(`no reply to op ${op} within ${this.requestTimeoutMs} ms`));
      }, this.requestTimeoutMs);
      this._pending.set(seq, { op, resolve, reject, timer });
      if (!this._send(op, seq, body)) {
        clearTimeout(timer);
        this._pending.delete(seq);
        reject(new Error("not connected"));
      }
    });
  }

  _open() {
    this._setState("connecting", { url: this.url, attempt: this._attempt });
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (e) {
      this.lastReason = String(e.message || e);
      this._scheduleReconnect();
      return;
    }
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    this.lastReason = "";
    ws.onopen = () => {
      this._lastRecv = Date.now();
      this._meta = null;
      this._send(OP.AUTH, this._nextSeq(), JSON.stringify(this._authBody()));
    };
    ws.onmessage = (ev) => {
      if (ws !== this._ws) return;
      this._lastRecv = Date.now();
      const bytes = typeof ev.data === "string" ? encoder.encode(ev.data) : new Uint8Array(ev.data);
      let frames;
      try {
        frames = decodeFrames(bytes);
      } catch (e) {
        console.error("rim: dropping malformed message:", e.message);
        return;
      }
      for (const f of frames) this._onFrame(f);
    };
    ws.onclose = (ev) => {
      if (ws !== this._ws) return;
      this._drop(this.lastReason || ev.reason || `connection closed (code ${ev.code})`);
    };
    ws.onerror = () => {
      // onclose follows and decides what to do.
    };
  }

  // The Auth body: with `recover`, where to resume each room (and the user's history) from.
  _authBody() {
    if (!this.recover) return this.auth;
    const rooms = {};
    for (const room of [this.auth.room_id, ...(this.auth.rooms || [])]) {
      if (room) rooms[room] = this.positions.get(room) ?? "";
    }
    const recover = { rooms };
    if (this.positions.has("user")) recover.user = this.positions.get("user");
    return { ...this.auth, recover };
  }

  // Whether a tagged push is new for its history (and remembers it); untagged pushes always are.
  _fresh(meta) {
    if (!meta || typeof meta.id !== "string") return true;
    const source = meta.room ?? "user";
    const last = this.positions.get(source);
    if (last !== undefined && compareIds(meta.id, last) <= 0) return false;
    this.positions.set(source, meta.id);
    return true;
  }

  _onFrame(f) {
    switch (f.op) {
      case OP.PUSH_META:
        this._meta = parseJson(decoder.decode(f.body)) || null;
        return;
      case OP.AUTH_REPLY: {
        this.session = parseJson(decoder.decode(f.body)) || {};
        this._attempt = 0;
        this._setState("online", { session: this.session });
        this._startHeartbeat();
        this._settleConnect(null);
        return;
      }
      case OP.HEARTBEAT_REPLY: {
        if (f.body.length >= 4) {
          this.online = new DataView(f.body.buffer, f.body.byteOffset, 4).getInt32(0);
          try {
            this.onOnline(this.online);
          } catch (e) {
            console.error("onOnline handler failed", e);
          }
        }
        this._resolve(f, OP.HEARTBEAT);
        return;
      }
      case OP.SEND_MSG_REPLY:
        this._resolve(f, OP.SEND_MSG);
        return;
      case OP.CHANGE_ROOM_REPLY:
      case OP.JOIN_ROOM_REPLY:
      case OP.LEAVE_ROOM_REPLY:
      case OP.SUB_REPLY:
      case OP.UNSUB_REPLY:
        // A reply's op is its request's plus one.
        this._resolve(f, f.op - 1);
        return;
      case OP.DISCONNECT_REPLY: {
        const body = parseJson(decoder.decode(f.body));
        this.lastReason = (body && body.reason) || decoder.decode(f.body) || "disconnected";
        return; // the close follows
      }
      case OP.ROOM_EVENT: {
        const evt = parseJson(decoder.decode(f.body));
        if (evt) {
          try {
            this.onRoomEvent(evt);
          } catch (e) {
            console.error("onRoomEvent handler failed", e);
          }
        }
        return;
      }
      default: {
        if (f.op < 1000) return; // nothing else a client should act on
        const meta = this._meta;
        this._meta = null;
        if (!this._fresh(meta)) return; // had it already (a catch-up overlapping live pushes)
        try {
          this.onPush(f.op, f.body, decoder.decode(f.body), meta || undefined);
        } catch (e) {
          console.error("onPush handler failed", e);
        }
      }
    }
  }

  // Replies echo the request's seq; fall back to the oldest pending request of that op.
  _resolve(frame, requestOp) {
    let seq = frame.seq;
    if (!this._pending.has(seq) || this._pending.get(seq).op !== requestOp) {
      seq = undefined;
      for (const [s, p] of this._pending) {
        if (p.op === requestOp) {
          seq = s;
          break;
        }
      }
    }
    if (seq === undefined) return;
    const p = this._pending.get(seq);
    this._pending.delete(seq);
    clearTimeout(p.timer);
    p.resolve(frame);
  }

  _startHeartbeat() {
    clearInterval(this._heartbeatTimer);
    const beat = () => {
      // Nothing heard for three intervals: the connection is dead even if the socket is not.
      if (Date.now() - this._lastRecv > this.heartbeatMs * 3 + 1000) {
        this._drop("no reply from the server for three heartbeat intervals");
        return;
      }
      this.heartbeat().catch(() => {});
    };
    beat(); // goim clients heartbeat right after auth; it also gives the online count at once
    this._heartbeatTimer = setInterval(beat, this.heartbeatMs);
  }

  _teardown(reason) {
    clearInterval(this._heartbeatTimer);
    this._heartbeatTimer = null;
    const ws = this._ws;
    this._ws = null;
    this.session = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.close(1000);
    }
    for (const [, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(new Error(`connection lost: ${reason}`));
    }
    this._pending.clear();
  }

  // The connection is gone (or given up on): reconnect unless closed on purpose or refused for good.
  _drop(reason) {
    this.lastReason = reason;
    this._teardown(reason);
    if (this._closedByUser) return;
    if (FATAL_REASONS.some((re) => re.test(reason))) {
      this._closedByUser = true;
      this._setState("closed", { reason, fatal: true });
      this._settleConnect(new Error(reason));
      return;
    }
    this._scheduleReconnect();
  }

  _scheduleReconnect() {
    this._attempt += 1;
    const cap = Math.min(this.backoffMaxMs, this.backoffBaseMs * 2 ** (this._attempt - 1));
    const delayMs = Math.round(cap / 2 + Math.random() * (cap / 2)); // "equal jitter"
    const retryAt = Date.now() + delayMs;
    this._setState("reconnecting", { attempt: this._attempt, delayMs, retryAt, reason: this.lastReason });
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (!this._closedByUser) this._open();
    }, delayMs);
  }
}

'use strict';
// rim peer for the shared side-by-side load harness (../shared/bench beside this checkout; its README, "Adding a peer").
// Run from the rim checkout:  ../shared/bench/bench.sh --peer bench/peers/rim.js --scenario s1|s2|s3 ...
//
// WHAT IT STARTS (all on the run's redis, h.redisUrl; every pid is recorded by h.spawn and stopped by the harness)
//   rim-logic  x1  HTTP API (goim push routes, /readyz, /goim/nodes/instances) + LogicRpc for the comets
//   rim-job    x1  reads the push streams and delivers to the comets over CometRpc
//   rim-comet  x2  the harness's two nodes: WebSocket clients at ws://127.0.0.1:<h.ports[i]>/sub
//   serverPids = all four, so the harness's memory/CPU figures cover every server process.
//   The publisher POSTs to logic (pushNodes), not to the comets.
//
// BINARIES: $RIM_BIN (a directory holding rim-comet, rim-logic, rim-job) or else this checkout's target/release
//   (cargo build --release --bins). CONFIG: this checkout's config/{logic,job,comet}.toml (the commented
//   examples), overridden per process through the environment, RIM_<TIER>__<SECTION>__<FIELD>.
//
// PORTS (base = h.ports[0] - 1, the harness's --base-port, 17000 by default; the harness itself uses
//   base+1 / base+2 for the nodes and base+379 for redis; a run refuses to start if any of ours is busy)
//   comet WebSocket + /readyz  base+1, base+2   (= h.ports)
//   logic HTTP                 base+11          (pushNodes)
//   logic RPC                  base+12          (comet logic.addrs)
//   job ops HTTP               base+13          (/readyz, /metrics)
//   comet RPC                  base+21, base+22 (job -> comet)
//   comet ops (/metrics)       base+31, base+32
//   comet raw TCP listener     off              (listen.tcp = "": the harness only speaks WebSocket)
//
// OVERRIDES (everything else keeps the example files' values) and why
//   all tiers  listen.* as above, on 127.0.0.1 only; redis.url = the run's redis
//              log_level = "warn" and RUST_LOG=warn (the files say "info"; RUST_LOG would win over the file,
//              and an inherited RUST_LOG=debug would cost CPU on the measured processes)
//              shutdown_grace_ms = 1000 (10 s in the files; the harness waits 10 s after SIGTERM, then SIGKILLs)
//   logic+job  stream.partitions = 16 (the files' value, set explicitly: it must agree between logic and job)
//   logic      auth.secret = ""  -> trust mode: the mid a client claims in its Auth body is believed
//              push.secret = ""  -> push routes open, no Authorization header needed
//              (both are the files' dev defaults; set explicitly so an inherited environment cannot change them)
//              session.heartbeat_secs = 1800 (file: 60) -> comet idle timeout = 1800 s x session.heartbeat_misses
//              (5) = 9000 s and session TTL in redis 1800 x 6 s, far beyond bench.sh's 900 s watchdog. The load
//              client therefore sends NO heartbeats: idle S1 sessions cost nothing but their socket, as with the
//              other peers (nchan/ws clients send nothing either), and there is no per-connection client timer.
//              (With the file's 60 s the idle timeout would be 300 s: enough for bench.js's 240 s --max-s, but
//              with no margin for a longer run.)
//   comet      server_id = bench-comet-<port> (unique per node); logic.addrs = logic's RPC address
//              session.max_connections = 100000 (the file's value, explicit: the harness needs >= 20,000 per comet;
//              the process fd limit, 20000 here, is the real ceiling)
//   job        nothing else: room_batch (max 64, linger_ms 10), stream batch_max 256, delivery timeouts as in the file.
//              Note linger_ms 10 adds up to 10 ms to room pushes when traffic is light (paced S2).
//   --peer-conf 'RIM_JOB__ROOM_BATCH__LINGER_MS=0 RIM_COMET__SESSION__OUTBOUND_QUEUE=4096 ...' adds/overrides
//   environment for all four processes (each tier reads only its own RIM_<TIER>__ prefix); it is recorded in the
//   JSON line's peer_conf.
//
// CLIENT (connect(), the load client's hot path): goim binary frames over WebSocket (docs/protocol.md).
//   frame = 16-byte big-endian header [packLen i32][headerLen i16 = 16][ver i16 = 1][op i32][seq i32] + body.
//   Sends op 7 Auth {"mid":N,"room_id":"bench://<room>","accepts":[1000],"platform":"web"} (room_id only for room
//   targets); ready on op 8 AuthReply; op 6 DisconnectReply ({"reason":...}) or a close before that = failure.
//   Pushes arrive as op 9 (body = whole frames back to back) or, possibly, as a plain op 1000 frame; every op 1000
//   body is handed to onMsg as a Buffer slice (no copy, no JSON parsing). Op 3 and anything else is ignored.
// TARGETS
//   room  {kind:'room', id:'r0'}  -> rim room "bench://r0"; push POST /goim/push/room?operation=1000&type=bench&room=r0
//   user  {kind:'user', id:'u<i>'} -> mid i+1 (mids must be positive); push POST /goim/push/mids?operation=1000&mids=<i+1>
//   Room members (S2, S1 --s1-target room) authenticate as distinct mids from 2^40 up (per worker process: pid-based),
//   so they never collide with the S1/S3 user mids and each is its own user, as in a real room.
// The push body (the harness payload) is delivered to the clients untouched.
const fs = require('fs');
const path = require('path');
const http = require('http');
const net = require('net');

const CHECKOUT = path.join(__dirname, '..', '..');
const BIN_DIR = process.env.RIM_BIN || path.join(CHECKOUT, 'target', 'release');
const CONFIG_DIR = path.join(CHECKOUT, 'config');
const PARTITIONS = 16;            // stream.partitions of logic and job (must agree)
const HEARTBEAT_SECS = 1800;      // logic session.heartbeat_secs (see above)
const ROOM_TYPE = 'bench';
const OP_APP = 1000, OP_HEARTBEAT_REPLY = 3, OP_DISCONNECT = 6, OP_AUTH = 7, OP_AUTH_REPLY = 8, OP_RAW = 9;
const HOST = '127.0.0.1';

// ---- orchestrator side (runs once, in bench.js) ------------------------------------------------

function binary(name) {
  const p = path.join(BIN_DIR, name);
  try { fs.accessSync(p, fs.constants.X_OK); } catch {
    throw new Error(`${p} missing or not executable: run \`cargo build --release --bins\` in ${CHECKOUT}` +
      (process.env.RIM_BIN ? ' (or fix $RIM_BIN)' : ' (or set $RIM_BIN to a directory holding rim-comet, rim-logic, rim-job)'));
  }
  return p;
}

function configFile(tier) {
  const p = path.join(CONFIG_DIR, `${tier}.toml`);
  if (!fs.existsSync(p)) throw new Error(`${p} missing (the example config of rim-${tier})`);
  return p;
}

function portFree(port) {
  return new Promise(resolve => {
    const s = net.connect({ port, host: HOST });
    s.once('connect', () => { s.destroy(); resolve(false); });
    s.once('error', () => { s.destroy(); resolve(true); });
  });
}

// GET http://127.0.0.1:port/path -> {status, body}; rejects on connection errors or after 2 s.
function get(port, p) {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: HOST, port, path: p, agent: false, timeout: 2000 }, res => {
      const chunks = [];
      res.on('data', c => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
  });
}

// Polls check() (-> true when ready, or a string saying what is missing) until ready or timeoutMs.
async function waitFor(what, check, timeoutMs, logHint) {
  const until = Date.now() + timeoutMs;
  let last = 'no answer';
  for (;;) {
    try { const r = await check(); if (r === true) return; last = String(r); } catch (e) { last = e.message || String(e); }
    if (Date.now() > until) throw new Error(`rim: ${what} not ready after ${timeoutMs} ms (${last.slice(0, 300)}); see ${logHint}`);
    await new Promise(r => setTimeout(r, 100));
  }
}

// --peer-conf: whitespace-separated KEY=VALUE environment overrides for all four processes.
function extraEnv(peerConf) {
  const env = {};
  for (const kv of (peerConf || '').split(/\s+/).filter(Boolean)) {
    const i = kv.indexOf('=');
    if (i <= 0) throw new Error(`rim: --peer-conf takes KEY=VALUE pairs, got ${JSON.stringify(kv)}`);
    env[kv.slice(0, i)] = kv.slice(i + 1);
  }
  return env;
}

async function start(h) {
  const bins = { logic: binary('rim-logic'), job: binary('rim-job'), comet: binary('rim-comet') };
  const cfg = { logic: configFile('logic'), job: configFile('job'), comet: configFile('comet') };
  const base = h.ports[0] - 1;
  const P = {
    logicHttp: base + 11, logicRpc: base + 12, jobHttp: base + 13,
    cometRpc: h.ports.map((_, i) => base + 21 + i),
    cometOps: h.ports.map((_, i) => base + 31 + i),
  };
  for (const p of [P.logicHttp, P.logicRpc, P.jobHttp, ...P.cometRpc, ...P.cometOps]) {
    if (!(await portFree(p))) throw new Error(`rim: port ${p} busy (another run? choose another --base-port)`);
  }
  const log = name => path.join(h.dir, `${name}.log`);
  const common = { RUST_LOG: 'warn', NO_COLOR: '1' };
  const extra = extraEnv(h.peerConf);

  const logicEnv = {
    ...common,
    RIM_LOGIC__LOG_LEVEL: 'warn',
    RIM_LOGIC__SHUTDOWN_GRACE_MS: '1000',
    RIM_LOGIC__LISTEN__HTTP: `${HOST}:${P.logicHttp}`,
    RIM_LOGIC__LISTEN__RPC: `${HOST}:${P.logicRpc}`,
    RIM_LOGIC__REDIS__URL: h.redisUrl,
    RIM_LOGIC__STREAM__PARTITIONS: String(PARTITIONS),
    RIM_LOGIC__AUTH__SECRET: '',
    RIM_LOGIC__PUSH__SECRET: '',
    RIM_LOGIC__SESSION__HEARTBEAT_SECS: String(HEARTBEAT_SECS),
    ...extra,
  };
  const jobEnv = {
    ...common,
    RIM_JOB__LOG_LEVEL: 'warn',
    RIM_JOB__SHUTDOWN_GRACE_MS: '1000',
    RIM_JOB__LISTEN__HTTP: `${HOST}:${P.jobHttp}`,
    RIM_JOB__REDIS__URL: h.redisUrl,
    RIM_JOB__STREAM__PARTITIONS: String(PARTITIONS),
    ...extra,
  };
  const cometEnv = i => ({
    ...common,
    RIM_COMET__SERVER_ID: `bench-comet-${h.ports[i]}`,
    RIM_COMET__LOG_LEVEL: 'warn',
    RIM_COMET__SHUTDOWN_GRACE_MS: '1000',
    RIM_COMET__LISTEN__HTTP: `${HOST}:${h.ports[i]}`,
    RIM_COMET__LISTEN__TCP: '',
    RIM_COMET__LISTEN__RPC: `${HOST}:${P.cometRpc[i]}`,
    RIM_COMET__LISTEN__OPS: `${HOST}:${P.cometOps[i]}`,
    RIM_COMET__LOGIC__ADDRS: `${HOST}:${P.logicRpc}`,
    RIM_COMET__SESSION__MAX_CONNECTIONS: '100000',
    ...extra,
  });

  // logic first (it records stream.partitions in redis and must be up before comets register), then job.
  const logicPid = h.spawn('rim-logic', bins.logic, ['--config', cfg.logic], logicEnv);
  await h.waitPort(P.logicHttp);
  await waitFor('rim-logic /readyz', async () => { const r = await get(P.logicHttp, '/readyz'); return r.status === 200 || `HTTP ${r.status} ${r.body}`; }, 15000, log('rim-logic'));
  const jobPid = h.spawn('rim-job', bins.job, ['--config', cfg.job], jobEnv);
  const cometPids = h.ports.map((port, i) => h.spawn(`rim-comet-${port}`, bins.comet, ['--config', cfg.comet], cometEnv(i)));
  const pids = [logicPid, jobPid, ...cometPids];

  // comets: /readyz = registered with logic (first renew_node succeeded)
  for (const port of h.ports) {
    await h.waitPort(port);
    await waitFor(`rim-comet-${port} /readyz`, async () => { const r = await get(port, '/readyz'); return r.status === 200 || `HTTP ${r.status} ${r.body}`; }, 15000, log(`rim-comet-${port}`));
  }
  // logic lists both comets as live
  const want = h.ports.map(p => `bench-comet-${p}`);
  await waitFor('comet registration (GET /goim/nodes/instances)', async () => {
    const r = await get(P.logicHttp, '/goim/nodes/instances');
    if (r.status !== 200) return `HTTP ${r.status} ${r.body}`;
    const have = (JSON.parse(r.body).data || []).map(n => n.server);
    const missing = want.filter(s => !have.includes(s));
    return missing.length === 0 || `missing ${missing.join(', ')} (listed: ${have.join(', ') || 'none'})`;
  }, 15000, log('rim-logic'));
  // job: redis reachable and holding every partition lease (otherwise early pushes wait for a lease)
  await h.waitPort(P.jobHttp);
  await waitFor('rim-job (/readyz, all partitions held)', async () => {
    const r = await get(P.jobHttp, '/readyz'); if (r.status !== 200) return `readyz HTTP ${r.status} ${r.body}`;
    const m = await get(P.jobHttp, '/metrics');
    const held = /^rim_job_partitions_held\s+(\d+)/m.exec(m.body);
    return (held && +held[1] === PARTITIONS) || `partitions held: ${held ? held[1] : '?'} of ${PARTITIONS}`;
  }, 20000, log('rim-job'));
  // job re-reads the comet list every registry.refresh_ms (1 s): let one refresh pass after the registrations
  await new Promise(r => setTimeout(r, 1200));

  return {
    nodes: h.ports.map(port => ({ host: HOST, port })),
    pushNodes: [{ host: HOST, port: P.logicHttp }],
    serverPids: () => pids,
  };
}

function effectiveConf(peerConf) {
  return `rim ${path.relative(process.cwd(), BIN_DIR) || BIN_DIR}; heartbeat_secs ${HEARTBEAT_SECS}; partitions ${PARTITIONS}` +
    (peerConf ? `; ${peerConf}` : '');
}

// ---- targets ---------------------------------------------------------------------------------

// 'u<i>' -> mid i+1 (rim mids are positive int64; u0 would otherwise be mid 0)
function userMid(id) {
  const n = id.charCodeAt(0) === 117 /* u */ ? Number(id.slice(1)) : NaN;
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`rim peer: user target id ${JSON.stringify(id)} is not u<integer>`);
  return n + 1;
}

function pushPath(t) {
  return t.kind === 'room'
    ? `/goim/push/room?operation=${OP_APP}&type=${ROOM_TYPE}&room=${encodeURIComponent(t.id)}`
    : `/goim/push/mids?operation=${OP_APP}&mids=${userMid(t.id)}`;
}

// ---- load client (runs in the lib/worker.js processes) ---------------------------------------

function frame(op, seq, body) {
  const b = Buffer.allocUnsafe(16 + body.length);
  b.writeInt32BE(16 + body.length, 0);
  b.writeInt16BE(16, 4);
  b.writeInt16BE(1, 6);
  b.writeInt32BE(op, 8);
  b.writeInt32BE(seq, 12);
  body.copy(b, 16);
  return b;
}

// Room members: distinct mids 2^40 + pid * 2^20 + n (< 2^53 for any Linux pid), per worker process.
let roomMidNext = 2 ** 40 + process.pid * 2 ** 20;
let lateDisconnects = 0;   // op 6 / closes after a session was ready (logged, first few only)

function connect({ node, target, localAddress }, onMsg) {
  const WebSocket = require('ws'); // resolved through NODE_PATH = the harness's .cache/node_modules
  const room = target.kind === 'room';
  const mid = room ? ++roomMidNext : userMid(target.id);
  const auth = frame(OP_AUTH, 1, Buffer.from(room
    ? `{"mid":${mid},"room_id":"${ROOM_TYPE}://${target.id}","accepts":[${OP_APP}],"platform":"web"}`
    : `{"mid":${mid},"accepts":[${OP_APP}],"platform":"web"}`));
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://${node.host}:${node.port}/sub`, { perMessageDeflate: false, localAddress, handshakeTimeout: 30000 });
    ws.binaryType = 'nodebuffer';
    let ready = false, closing = false, reason = '';
    const late = what => {
      if (++lateDisconnects <= 5) console.error(`[rim peer] mid ${mid} on ${node.port}: ${what} after auth${lateDisconnects === 5 ? ' (further ones not logged)' : ''}`);
    };
    ws.on('error', e => { if (!ready) reject(e); });
    ws.on('close', (code, why) => {
      if (!ready) reject(new Error(`rim: closed before AuthReply: ${reason ? `op 6 "${reason}", ` : ''}close ${code} ${why}`));
      else if (!closing && reason === '') late(`close ${code} ${why}`);
    });
    ws.once('open', () => ws.send(auth));
    ws.on('message', d => {
      if (d.length < 16) return;
      const op = d.readInt32BE(8);
      if (op === OP_RAW) {
        // body = whole frames back to back
        const end = d.length;
        for (let o = 16; o + 16 <= end;) {
          const len = d.readInt32BE(o);
          if (len < 16 || o + len > end) break;
          if (d.readInt32BE(o + 8) === OP_APP) onMsg(d.subarray(o + d.readInt16BE(o + 4), o + len));
          o += len;
        }
      } else if (op === OP_APP) {
        onMsg(d.subarray(d.readInt16BE(4), d.length));
      } else if (op === OP_HEARTBEAT_REPLY) {
        // ignored (we send no heartbeats)
      } else if (op === OP_AUTH_REPLY) {
        if (!ready) { ready = true; resolve({ close: () => { closing = true; ws.close(); } }); }
      } else if (op === OP_DISCONNECT) {
        const body = d.toString('utf8', 16);
        try { reason = JSON.parse(body).reason || body; } catch { reason = body; }
        if (!ready) reject(new Error(`rim: op 6 ${reason}`));
        else late(`op 6 "${reason}"`);
      }
    });
  });
}

module.exports = { name: 'rim', start, pushPath, connect, effectiveConf };

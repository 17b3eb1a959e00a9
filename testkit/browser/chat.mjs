// Real-browser test of the chatroom demo: headless Debian Chromium, two users on two comets;
// later a third who joins and sees the room's history, and a fourth whose connection is cut
// (reset) while messages are sent: rim-client.js reconnects and the page shows them once, in
// order.
//
//   node chat.mjs LOGIC_URL COMET_A COMET_B [SCREENSHOT]
//   LOGIC_URL=http://127.0.0.1:3111 COMET_A=127.0.0.1:3102 COMET_B=127.0.0.1:3202 node chat.mjs
//
// LOGIC_URL serves the page; COMET_A/B are comet WebSocket addresses (host:port). SCREENSHOT
// (or env RIM_SCREENSHOT) is where alice's page is saved as a PNG at the end. Exits 0 when every
// step passed, 1 with the failing step otherwise, 2 when the whole run took over the time limit.
import { mkdirSync } from "node:fs";
import { connect as tcpConnect, createServer as tcpServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { chromium } from "playwright-core";

const [argLogic, argA, argB, argShot] = process.argv.slice(2);
const LOGIC_URL = (argLogic || process.env.LOGIC_URL || "").replace(/\/$/, "");
const COMET_A = argA || process.env.COMET_A;
const COMET_B = argB || process.env.COMET_B;
const SCREENSHOT = argShot || process.env.RIM_SCREENSHOT || "";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const TOTAL_MS = Number(process.env.RIM_BROWSER_TIMEOUT_MS || 60_000);
const STEP_MS = 15_000; // any single wait
const ROOM = "chat://lobby";

if (!LOGIC_URL || !COMET_A || !COMET_B) {
  console.error("usage: node chat.mjs LOGIC_URL COMET_A COMET_B [SCREENSHOT] (or env LOGIC_URL, COMET_A, COMET_B)");
  process.exit(64);
}

const started = Date.now();
const log = (msg) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}`);
const browserLogs = [];
const pages = {}; // name → page, for failure screenshots
let browser;
let relay;
let step = "start";

function dumpBrowserLogs() {
  if (browserLogs.length) console.error(`browser console (last 40 lines):\n  ${browserLogs.slice(-40).join("\n  ")}`);
}

const watchdog = setTimeout(() => {
  console.error(`FAIL: timed out after ${TOTAL_MS} ms during step: ${step}`);
  dumpBrowserLogs();
  const b = browser;
  browser = undefined;
  Promise.race([b ? b.close() : Promise.resolve(), new Promise((r) => setTimeout(r, 3000))]).finally(() => {
    process.exit(2);
  });
}, TOTAL_MS);

/** Runs one named step; its name is what a failure reports. */
async function check(name, fn) {
  step = name;
  log(name);
  await fn();
}

const byTestId = (id) => `[data-testid="${id}"]`;

async function openUser(name, comet) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const page = await context.newPage();
  pages[name] = page;
  page.setDefaultTimeout(STEP_MS);
  page.on("console", (m) => browserLogs.push(`${name} ${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => browserLogs.push(`${name} pageerror: ${e.message}`));
  page.on("requestfailed", (r) => browserLogs.push(`${name} request failed: ${r.url()} ${r.failure()?.errorText}`));
  // The Auth frames (op 7) the page sends and the replies (op 8) it gets, bodies parsed.
  const auths = [];
  page.on("websocket", (ws) => {
    const record = (dir) => (f) => {
      const b = typeof f.payload === "string" ? Buffer.from(f.payload) : f.payload;
      if (b.length < 16) return;
      const op = b.readInt32BE(8);
      if (op === 7 || op === 8) auths.push({ dir, op, body: JSON.parse(b.subarray(16, b.readInt32BE(0)).toString()) });
    };
    ws.on("framesent", record("sent"));
    ws.on("framereceived", record("received"));
  });
  const url = `${LOGIC_URL}/?comet=${encodeURIComponent(comet)}`;
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.locator(byTestId("comet-select")).waitFor();
  await page.waitForFunction(
    (c) => document.querySelector('[data-testid="comet-select"]').value === c,
    comet,
    { timeout: STEP_MS },
  );
  await page.fill(byTestId("name-input"), name);
  await page.click(byTestId("login-button"));
  await page.locator(`${byTestId("status")}[data-state="online"]`).waitFor({ timeout: STEP_MS });
  const mid = Number(await page.locator(byTestId("me")).getAttribute("data-mid"));
  if (!Number.isFinite(mid) || mid <= 0) throw new Error(`${name}: page shows no mid after login (got ${mid})`);
  const room = await page.inputValue(byTestId("room-input"));
  if (room !== ROOM) throw new Error(`${name}: default room is ${room}, expected ${ROOM}`);
  return { name, page, mid, auths };
}

/** Waits until `user` shows a member with `mid`. */
async function seesMember(user, mid) {
  await user.page.locator(`${byTestId("members")} ${byTestId("member")}[data-mid="${mid}"]`).waitFor({ timeout: STEP_MS });
}

/** Waits until `user`'s online count shows `n`. */
async function seesOnline(user, n) {
  await user.page.waitForFunction(
    (want) => document.querySelector('[data-testid="online-count"]')?.textContent.trim() === String(want),
    n,
    { timeout: STEP_MS },
  ).catch(async (e) => {
    const shown = await user.page.textContent(byTestId("online-count")).catch(() => "?");
    throw new Error(`${user.name}: online count stayed ${shown}, expected ${n} (${e.message.split("\n")[0]})`);
  });
}

async function send(user, text) {
  await user.page.fill(byTestId("message-input"), text);
  await user.page.click(byTestId("send-button"));
}

/** Texts of the messages `user` shows from `fromMid`, in page order. */
function messagesFrom(user, fromMid) {
  return user.page.$$eval(
    `${byTestId("messages")} ${byTestId("message")}[data-from="${fromMid}"]`,
    (els) => els.map((e) => ({ text: e.querySelector('[data-testid="message-text"]').textContent, dm: e.dataset.dm === "true" })),
  );
}

/** Waits until `user` shows a message from `fromMid` with exactly `text` (and dm flag if given). */
async function seesMessage(user, fromMid, text, { dm } = {}) {
  const dmSel = dm === undefined ? "" : `[data-dm="${dm}"]`;
  await user.page
    .locator(`${byTestId("messages")} ${byTestId("message")}[data-from="${fromMid}"]${dmSel}`)
    .filter({ has: user.page.locator(byTestId("message-text"), { hasText: new RegExp(`^${escapeRe(text)}$`) }) })
    .first()
    .waitFor({ timeout: STEP_MS })
    .catch(async (e) => {
      const seen = await messagesFrom(user, fromMid).catch(() => []);
      throw new Error(`${user.name} never saw ${JSON.stringify(text)} from ${fromMid}${dm === undefined ? "" : ` (dm=${dm})`}; ` +
        `saw ${JSON.stringify(seen)} (${e.message.split("\n")[0]})`);
    });
}

/** Waits until the sender's own copy of its last message is confirmed (op 5 code 0). */
async function confirmed(user) {
  await user.page.waitForFunction(
    () => {
      const mine = document.querySelectorAll('[data-testid="message"][data-mine="true"]');
      const last = mine[mine.length - 1];
      return last && !last.classList.contains("pending");
    },
    null,
    { timeout: STEP_MS },
  );
  const err = await user.page.$$eval('[data-testid="message"][data-mine="true"]', (els) => {
    const last = els[els.length - 1];
    return last.classList.contains("failed") ? last.querySelector('[data-testid="message-error"]').textContent : "";
  });
  if (err) throw new Error(`${user.name}: sending failed: ${err}`);
}

/**
 * A TCP relay in front of a comet (`target` = host:port) that a step can cut the way a lost
 * network does: every relayed connection is reset (RST both ways, no WebSocket close), and
 * connections made while it is cut are held, unanswered, until `resume` relays them.
 */
async function startRelay(target) {
  const at = target.lastIndexOf(":");
  const [host, port] = [target.slice(0, at), Number(target.slice(at + 1))];
  const live = new Set();
  const held = [];
  let cut = false;
  const forward = (client) => {
    const upstream = tcpConnect({ host, port });
    const pair = { client, upstream };
    live.add(pair);
    const end = () => {
      live.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    for (const s of [client, upstream]) s.on("error", end).on("close", end);
    client.pipe(upstream);
    upstream.pipe(client);
  };
  const server = tcpServer((client) => {
    client.setNoDelay(true);
    if (cut) {
      client.on("error", () => {});
      held.push(client); // not read: the WebSocket handshake waits
    } else {
      forward(client);
    }
  });
  await new Promise((resolve, reject) => server.once("error", reject).listen(0, "127.0.0.1", resolve));
  return {
    addr: `127.0.0.1:${server.address().port}`,
    /** Resets every relayed connection and holds new ones; returns how many were reset. */
    cut() {
      cut = true;
      const pairs = [...live];
      live.clear();
      for (const { client, upstream } of pairs) {
        client.resetAndDestroy();
        upstream.resetAndDestroy();
      }
      return pairs.length;
    },
    /** Relays again, the held connections first. */
    resume() {
      cut = false;
      for (const c of held.splice(0)) forward(c);
    },
    close() {
      server.close();
      for (const { client, upstream } of live) {
        client.destroy();
        upstream.destroy();
      }
      for (const c of held) c.destroy();
    },
  };
}

const escapeRe = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

async function main() {
  await check(`launch ${CHROMIUM}`, async () => {
    // chromium.launch gives the browser a fresh temporary profile (user-data-dir) of its own
    // and deletes it on close; each user then gets its own context (no shared storage).
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      timeout: STEP_MS,
      args: [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
  });

  let alice;
  let bob;
  await check(`alice logs in on comet A (${COMET_A})`, async () => {
    alice = await openUser("alice", COMET_A);
  });
  await check(`bob logs in on comet B (${COMET_B})`, async () => {
    bob = await openUser("bob", COMET_B);
  });
  if (alice.mid === bob.mid) throw new Error(`alice and bob got the same mid ${alice.mid}`);
  log(`alice is mid ${alice.mid}, bob is mid ${bob.mid}`);

  await check("each sees the other in the member list", async () => {
    await Promise.all([seesMember(alice, bob.mid), seesMember(bob, alice.mid), seesMember(alice, alice.mid)]);
  });
  await check("alice is told that bob joined (op 24 room event)", async () => {
    await alice.page
      .locator(`${byTestId("messages")} ${byTestId("notice")}`, { hasText: "bob joined the room" })
      .first()
      .waitFor({ timeout: STEP_MS });
  });
  await check("online count reaches 2 on both pages", async () => {
    await Promise.all([seesOnline(alice, 2), seesOnline(bob, 2)]);
  });

  await check("alice's room message reaches bob", async () => {
    await send(alice, "hello from alice");
    await confirmed(alice);
    await seesMessage(bob, alice.mid, "hello from alice", { dm: false });
  });
  await check("bob's room message reaches alice", async () => {
    await send(bob, "hi alice, bob here");
    await confirmed(bob);
    await seesMessage(alice, bob.mid, "hi alice, bob here", { dm: false });
  });

  await check("a burst of messages keeps its order", async () => {
    const burst = ["one", "two", "three", "four", "five"].map((w) => `alice says ${w}`);
    for (const text of burst) await send(alice, text);
    await seesMessage(bob, alice.mid, burst[burst.length - 1]);
    const got = (await messagesFrom(bob, alice.mid)).map((m) => m.text).filter((t) => burst.includes(t));
    if (JSON.stringify(got) !== JSON.stringify(burst)) {
      throw new Error(`bob saw alice's burst as ${JSON.stringify(got)}, sent ${JSON.stringify(burst)}`);
    }
    const own = (await messagesFrom(alice, alice.mid)).map((m) => m.text);
    if (own.filter((t) => t === burst[0]).length !== 1) throw new Error(`alice shows her own message ${own.filter((t) => t === burst[0]).length} times`);
  });

  await check("bob opens a direct message to alice from the member list", async () => {
    await bob.page.click(`${byTestId("members")} ${byTestId("member")}[data-mid="${alice.mid}"] button`);
    await bob.page.locator(`${byTestId("dm-target")}[data-mid="${alice.mid}"]`).waitFor({ state: "visible", timeout: STEP_MS });
  });
  await check("alice receives bob's direct message marked as DM", async () => {
    await send(bob, "psst, just for you");
    await confirmed(bob);
    await seesMessage(alice, bob.mid, "psst, just for you", { dm: true });
    await seesMessage(bob, bob.mid, "psst, just for you", { dm: true });
    await alice.page
      .locator(`${byTestId("message")}[data-from="${bob.mid}"][data-dm="true"] ${byTestId("dm-tag")}`)
      .first()
      .waitFor({ state: "visible", timeout: STEP_MS });
  });
  await check("bob's DM did not go to the room as a room message", async () => {
    const dms = (await messagesFrom(alice, bob.mid)).filter((m) => m.text === "psst, just for you");
    if (dms.length !== 1 || !dms[0].dm) throw new Error(`alice shows bob's DM as ${JSON.stringify(dms)}`);
  });

  const lobbyHistory = ["hello from alice", ...["one", "two", "three", "four", "five"].map((w) => `alice says ${w}`)];
  let carol;
  await check("carol logs in later and sees the lobby's recent messages first (room history)", async () => {
    carol = await openUser("carol", COMET_B);
    await seesMessage(carol, alice.mid, lobbyHistory[lobbyHistory.length - 1], { dm: false });
    const got = (await messagesFrom(carol, alice.mid)).map((m) => m.text);
    if (JSON.stringify(got) !== JSON.stringify(lobbyHistory)) {
      throw new Error(`carol shows alice's lobby history as ${JSON.stringify(got)}, expected ${JSON.stringify(lobbyHistory)}`);
    }
    await seesMessage(carol, bob.mid, "hi alice, bob here", { dm: false });
    const fromBob = (await messagesFrom(carol, bob.mid)).map((m) => m.text);
    if (fromBob.includes("psst, just for you")) throw new Error("carol was shown bob's direct message to alice");
  });
  await check("a live message reaches carol after the history", async () => {
    await send(alice, "welcome carol");
    await confirmed(alice);
    await seesMessage(carol, alice.mid, "welcome carol", { dm: false });
    const got = (await messagesFrom(carol, alice.mid)).map((m) => m.text);
    if (got[got.length - 1] !== "welcome carol" || got.length !== lobbyHistory.length + 1) {
      throw new Error(`carol shows ${JSON.stringify(got)}`);
    }
  });
  await check("bob switches to another room and back: the lobby's last messages show again", async () => {
    await bob.page.fill(byTestId("room-input"), "chat://side");
    await bob.page.click(byTestId("join-button"));
    await bob.page
      .locator(`${byTestId("messages")} ${byTestId("notice")}`, { hasText: "Joined chat://side." })
      .waitFor({ timeout: STEP_MS });
    // The switch is done when the page enables Join again (it moves focus meanwhile).
    await bob.page.waitForFunction(() => !document.querySelector('[data-testid="join-button"]').disabled, null, {
      timeout: STEP_MS,
    });
    const inSide = await bob.page.$$eval(`${byTestId("messages")} ${byTestId("message")}`, (els) => els.length);
    if (inSide !== 0) throw new Error(`bob's new room shows ${inSide} messages, expected none`);
    await bob.page.fill(byTestId("room-input"), ROOM);
    await bob.page.click(byTestId("join-button"));
    await seesMessage(bob, alice.mid, "welcome carol", { dm: false });
    const got = (await messagesFrom(bob, alice.mid)).map((m) => m.text);
    if (JSON.stringify(got) !== JSON.stringify([...lobbyHistory, "welcome carol"])) {
      throw new Error(`bob shows the lobby as ${JSON.stringify(got)}`);
    }
  });

  if (SCREENSHOT) {
    await check(`screenshot of alice's page → ${SCREENSHOT}`, async () => {
      mkdirSync(dirname(SCREENSHOT), { recursive: true });
      await alice.page.screenshot({ path: SCREENSHOT });
    });
  }

  let dave;
  const davesLobby = [...lobbyHistory, "welcome carol"];
  await check("dave logs in on comet B through a relay the test can cut, and sees the lobby", async () => {
    relay = await startRelay(COMET_B);
    dave = await openUser("dave", relay.addr);
    await seesMessage(dave, alice.mid, "welcome carol", { dm: false });
    const got = (await messagesFrom(dave, alice.mid)).map((m) => m.text);
    if (JSON.stringify(got) !== JSON.stringify(davesLobby)) {
      throw new Error(`dave shows the lobby as ${JSON.stringify(got)}, expected ${JSON.stringify(davesLobby)}`);
    }
  });
  const away = [1, 2, 3].map((i) => `sent while dave was cut off ${i}`);
  await check("dave's connection is reset; the page notices and tries to reconnect", async () => {
    const reset = relay.cut();
    if (reset !== 1) throw new Error(`the relay reset ${reset} connections, expected dave's one`);
    await dave.page.locator(`${byTestId("status")}[data-state="reconnecting"]`).waitFor({ timeout: STEP_MS });
  });
  await check("alice sends three messages while dave is away", async () => {
    for (const text of away) {
      await send(alice, text);
      await confirmed(alice);
    }
    await seesMessage(bob, alice.mid, away[away.length - 1], { dm: false });
    const state = await dave.page.getAttribute(byTestId("status"), "data-state");
    if (state === "online") throw new Error("dave's page is online while its connection is held");
    const got = (await messagesFrom(dave, alice.mid)).map((m) => m.text);
    if (JSON.stringify(got) !== JSON.stringify(davesLobby)) throw new Error(`dave shows ${JSON.stringify(got)} while away`);
  });
  await check("dave reconnects and shows what he missed once, in order, then live messages", async () => {
    relay.resume();
    await dave.page.locator(`${byTestId("status")}[data-state="online"]`).waitFor({ timeout: STEP_MS });
    await dave.page
      .locator(`${byTestId("messages")} ${byTestId("notice")}`, { hasText: "Reconnected to" })
      .first()
      .waitFor({ timeout: STEP_MS });
    await seesMessage(dave, alice.mid, away[away.length - 1], { dm: false });
    await send(alice, "welcome back dave");
    await confirmed(alice);
    await seesMessage(dave, alice.mid, "welcome back dave", { dm: false });
    // It resumed from the last id it had seen in the lobby, and got everything after it.
    const [auth1, reply1, auth2, reply2] = dave.auths;
    const shown = JSON.stringify(dave.auths);
    if (dave.auths.length !== 4 || [auth1, reply1, auth2, reply2].map((a) => a.op).join() !== "7,8,7,8") {
      throw new Error(`dave's page exchanged ${shown}, expected two Auth frames, each answered`);
    }
    if (auth1.body.recover?.rooms?.[ROOM] !== "") throw new Error(`first Auth: ${shown}`);
    if (!/^\d+-\d+$/.test(auth2.body.recover?.rooms?.[ROOM] ?? "")) throw new Error(`the reconnect's Auth names no last id: ${shown}`);
    if (reply2.body.recovered?.rooms?.[ROOM] !== true) throw new Error(`the reconnect was not recovered: ${shown}`);
    const got = (await messagesFrom(dave, alice.mid)).map((m) => m.text);
    const want = [...davesLobby, ...away, "welcome back dave"];
    if (JSON.stringify(got) !== JSON.stringify(want)) {
      throw new Error(`dave shows the lobby as ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
    }
  });
}

let code = 0;
try {
  await main();
  log("PASS: chat demo works in a real browser across two comets");
} catch (e) {
  code = 1;
  console.error(`FAIL at step "${step}": ${e && e.message ? e.message : e}`);
  dumpBrowserLogs();
  for (const [name, page] of Object.entries(pages)) {
    const path = join(tmpdir(), `rim-chat-failure-${name}.png`);
    await page.screenshot({ path, timeout: 5000 }).then(
      () => console.error(`${name}'s page at the failure: ${path}`),
      () => {},
    );
  }
} finally {
  if (browser) {
    await Promise.race([browser.close(), new Promise((r) => setTimeout(r, 5000))]).catch(() => {});
  }
  relay?.close();
  clearTimeout(watchdog);
}
process.exit(code);

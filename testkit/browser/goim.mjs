// goim's own JavaScript client (goim/client.js + goim/index.html, vendored unchanged) in
// headless Debian Chromium against a rim comet.
//
//   node goim.mjs COMET MESSAGE... [--again MESSAGE...]
//   COMET=127.0.0.1:3102 node goim.mjs 'mid message' 'room message' 'broadcast message'
//
// COMET is the comet's WebSocket address (host:port). The vendored files are served from a
// loopback port, as goim's examples/javascript/main.go serves them; the only shim, installed
// before any page script runs, makes `new WebSocket('ws://sh.tony.wiki:3102/sub')` (hardcoded in
// client.js) connect to ws://COMET/sub instead. No host name but COMET's resolves.
//
// stdout is the protocol with the caller (logs go to stderr):
//   1. `ready` once the page shows goim's "receive: auth reply" and "receive: heartbeat reply"
//      (the caller pushes after this line);
//   2. one JSON line once every MESSAGE was shown in #box as a received op 1000 message:
//      {"messages": [...bodies in page order], "box": [...every #box line], "status": "...",
//       "sockets": [{"requested", "opened"}...], "pageErrors": [...]}
//   3. with `--again`: the page is reloaded (goim's client connects anew, as a user reopening
//      it would), then `ready` and one JSON line as in 1 and 2 for the MESSAGEs after `--again`
//      (the caller pushes them after the second `ready`; `messages` are the new page's).
// Exits 0 after printing the JSON, 1 with the failing step otherwise, 2 when the whole run took
// over RIM_BROWSER_TIMEOUT_MS (60 s).
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const [argComet, ...argMessages] = process.argv.slice(2);
const COMET = argComet || process.env.COMET;
const againAt = argMessages.indexOf("--again");
const MESSAGES = againAt < 0 ? argMessages : argMessages.slice(0, againAt);
const AGAIN = againAt < 0 ? [] : argMessages.slice(againAt + 1);
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const TOTAL_MS = Number(process.env.RIM_BROWSER_TIMEOUT_MS || 60_000);
const STEP_MS = 15_000; // any single wait
const GOIM_WS = "ws://sh.tony.wiki:3102/sub"; // what client.js dials
const GOIM_DIR = join(dirname(fileURLToPath(import.meta.url)), "goim");
// git blob ids of goim's files at 1800484a45334ace0bfa63a56ab9cbbbb4b22dca (see goim/README.md).
const VERBATIM = {
  "client.js": "a90f6572e85883495f209508eb8d5c8902e3abe7",
  "index.html": "55c85e1ae9eb500d0979224a0264fa613f0e53fe",
};
// appendMsg's line for a pushed message (client.js: "receive: ver=.. op=.. seq=.. message=..").
const RECEIVED = /^receive: ver=\d+ op=1000 seq=-?\d+ message=([\s\S]*)$/;

if (!COMET || MESSAGES.length === 0) {
  console.error("usage: node goim.mjs COMET MESSAGE... (COMET = comet host:port, or env COMET)");
  process.exit(64);
}

const started = Date.now();
const log = (msg) => console.error(`[${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}`);
const browserLogs = [];
const pageErrors = [];
let browser;
let page;
let server;
let step = "start";

function dumpBrowserLogs() {
  if (browserLogs.length) console.error(`browser console (last 40 lines):\n  ${browserLogs.slice(-40).join("\n  ")}`);
}

async function boxLines() {
  return page ? page.$$eval("#box span", (els) => els.map((e) => e.textContent)).catch(() => []) : [];
}

const watchdog = setTimeout(async () => {
  console.error(`FAIL: timed out after ${TOTAL_MS} ms during step: ${step}`);
  console.error(`#box: ${JSON.stringify(await Promise.race([boxLines(), new Promise((r) => setTimeout(() => r([]), 2000))]))}`);
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

/** Waits until a line of #box matches `re`. */
async function boxShows(re, what) {
  await page
    .waitForFunction(
      ([src, flags]) => [...document.querySelectorAll("#box span")].some((e) => new RegExp(src, flags).test(e.textContent)),
      [re.source, re.flags],
      { timeout: STEP_MS },
    )
    .catch(async (e) => {
      throw new Error(`the page never showed ${what}; #box: ${JSON.stringify(await boxLines())} (${e.message.split("\n")[0]})`);
    });
}

/** Bodies of the op 1000 messages #box shows, in page order. */
async function receivedMessages() {
  return (await boxLines()).map((t) => RECEIVED.exec(t)).filter(Boolean).map((m) => m[1]);
}

async function main() {
  await check("goim's files are verbatim", async () => {
    for (const [file, blob] of Object.entries(VERBATIM)) {
      const bytes = readFileSync(join(GOIM_DIR, file));
      const id = createHash("sha1").update(`blob ${bytes.length}\0`).update(bytes).digest("hex");
      if (id !== blob) {
        throw new Error(`goim/${file} is not goim's file (git blob ${id}, expected ${blob}): restore it, see goim/README.md`);
      }
    }
  });

  let origin;
  await check("serve goim/index.html and goim/client.js on 127.0.0.1", async () => {
    const files = { "/index.html": ["index.html", "text/html; charset=utf-8"], "/client.js": ["client.js", "text/javascript"] };
    server = createServer((req, res) => {
      const hit = files[new URL(req.url, "http://x").pathname];
      if (!hit) {
        res.writeHead(404).end();
        return;
      }
      res.writeHead(200, { "content-type": hit[1], "cache-control": "no-store" });
      res.end(readFileSync(join(GOIM_DIR, hit[0])));
    });
    await new Promise((resolve, reject) => server.once("error", reject).listen(0, "127.0.0.1", resolve));
    origin = `http://127.0.0.1:${server.address().port}`;
  });

  await check(`launch ${CHROMIUM}`, async () => {
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
        // Nothing but the comet's host resolves, so the real sh.tony.wiki is unreachable should
        // the shim ever fail (the page comes from 127.0.0.1, an address).
        `--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE ${new URL(`ws://${COMET}`).hostname}`,
      ],
    });
  });

  await check(`open goim's index.html with ${GOIM_WS} sent to ws://${COMET}/sub`, async () => {
    const context = await browser.newContext();
    page = await context.newPage();
    page.setDefaultTimeout(STEP_MS);
    page.on("console", (m) => browserLogs.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => {
      pageErrors.push(e.message);
      browserLogs.push(`pageerror: ${e.message}`);
    });
    page.on("requestfailed", (r) => browserLogs.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));
    // The only shim: before client.js runs, goim's hardcoded address is swapped for the comet's.
    await context.addInitScript(
      ([from, to]) => {
        const Native = window.WebSocket;
        const sockets = [];
        class GoimRedirect extends Native {
          constructor(url, protocols) {
            const opened = String(url) === from ? to : url;
            super(opened, protocols);
            sockets.push({ requested: String(url), opened: String(opened) });
          }
        }
        window.WebSocket = GoimRedirect;
        window.__goimSockets = sockets;
      },
      [GOIM_WS, `ws://${COMET}/sub`],
    );
    await page.goto(`${origin}/index.html`, { waitUntil: "domcontentloaded" });
  });

  await connected();
  console.log(JSON.stringify(await shows(MESSAGES)));

  if (AGAIN.length) {
    await check("reload the page: goim's client connects again", async () => {
      await page.reload({ waitUntil: "domcontentloaded" });
    });
    await connected();
    console.log(JSON.stringify(await shows(AGAIN)));
  }
}

/** goim's client on the page authenticated and heartbeats; tells the caller `ready`. */
async function connected() {
  await check("goim's client authenticates (op 8 shown as \"receive: auth reply\")", async () => {
    await boxShows(/^receive: auth reply$/, "the auth reply");
    const status = (await page.textContent("#status")).trim();
    if (status !== "ok") throw new Error(`#status shows ${JSON.stringify(status)} after the auth reply, expected "ok"`);
  });
  await check("goim's client heartbeats (op 3 shown as \"receive: heartbeat reply\")", async () => {
    await boxShows(/^receive: heartbeat reply$/, "a heartbeat reply");
  });
  console.log("ready");
}

/** Waits until the page shows every one of `want`; returns what the page holds then. */
async function shows(want) {
  await check(`the page shows every push: ${JSON.stringify(want)}`, async () => {
    await page
      .waitForFunction(
        ([src, want]) => {
          const re = new RegExp(src);
          const got = [...document.querySelectorAll("#box span")].map((e) => re.exec(e.textContent)).filter(Boolean).map((m) => m[1]);
          return want.every((w) => got.includes(w));
        },
        [RECEIVED.source, want],
        { timeout: STEP_MS },
      )
      .catch(async (e) => {
        throw new Error(`saw ${JSON.stringify(await receivedMessages())}, waiting for ${JSON.stringify(want)} (${e.message.split("\n")[0]})`);
      });
  });
  return {
    messages: await receivedMessages(),
    box: await boxLines(),
    status: (await page.textContent("#status")).trim(),
    sockets: await page.evaluate(() => window.__goimSockets),
    pageErrors,
  };
}

let code = 0;
try {
  await main();
  log("PASS: goim's JavaScript client works against rim");
} catch (e) {
  code = 1;
  console.error(`FAIL at step "${step}": ${e && e.message ? e.message : e}`);
  dumpBrowserLogs();
} finally {
  if (browser) {
    await Promise.race([browser.close(), new Promise((r) => setTimeout(r, 5000))]).catch(() => {});
  }
  server?.close();
  clearTimeout(watchdog);
}
process.exit(code);

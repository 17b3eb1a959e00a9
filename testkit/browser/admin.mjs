// Real-browser test of logic's operator page (/admin): headless Debian Chromium.
//
//   node admin.mjs LOGIC_URL TOKEN SERVERS ROOM HOSTILE_ROOM [SCREENSHOT]
//
// SERVERS is the comma-separated server ids of the comets that must be listed, ROOM a room that
// must appear among the top rooms; while this runs the test pushes to ROOM, so the page's push
// rate must show pushes moving (above zero on two successive updates). HOSTILE_ROOM is a room
// whose name is markup with a script: it must be listed as text, and the script never run. TOKEN is given the way
// an operator would, in the address fragment. Exits 0 when every step passed, 1 with the failing
// step otherwise, 2 when the whole run took over the time limit.
import { chromium } from "playwright-core";

const [LOGIC_URL, TOKEN, SERVERS, ROOM, HOSTILE_ROOM, SCREENSHOT] = process.argv.slice(2);
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const TOTAL_MS = Number(process.env.RIM_BROWSER_TIMEOUT_MS || 60_000);
const STEP_MS = 15_000;

if (!LOGIC_URL || !TOKEN || !SERVERS || !ROOM || !HOSTILE_ROOM) {
  console.error("usage: node admin.mjs LOGIC_URL TOKEN SERVERS ROOM HOSTILE_ROOM [SCREENSHOT]");
  process.exit(64);
}

const started = Date.now();
const log = (msg) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}`);
const browserLogs = [];
let browser;
let page;
let step = "start";

const watchdog = setTimeout(() => {
  console.error(`FAIL: timed out after ${TOTAL_MS} ms during step: ${step}`);
  process.exit(2);
}, TOTAL_MS);

async function check(name, fn) {
  step = name;
  log(name);
  await fn();
}

const t = (id) => `[data-testid="${id}"]`;

try {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on("console", (m) => browserLogs.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => browserLogs.push(`pageerror: ${e.message}`));

  await check("without a token the page asks for one", async () => {
    await page.goto(`${LOGIC_URL}/admin?every=500`, { waitUntil: "domcontentloaded" });
    await page.locator(`${t("status")}[data-state="unauthorized"]`).waitFor();
    await page.locator(t("login-form")).waitFor({ state: "visible" });
  });

  await check("a token in the address opens it and leaves the address bar", async () => {
    await page.goto(`${LOGIC_URL}/admin?every=500#token=${encodeURIComponent(TOKEN)}`, { waitUntil: "domcontentloaded" });
    await page.locator(`${t("status")}[data-state="live"]`).waitFor();
    if (page.url().includes("token=")) throw new Error(`token still in the address: ${page.url()}`);
  });

  const servers = SERVERS.split(",");
  await check(`the comets ${servers.join(", ")} are listed`, async () => {
    await page.waitForFunction(
      (want) => {
        const have = [...document.querySelectorAll('[data-testid="node-row"]')].map((r) => r.dataset.server);
        return want.every((s) => have.includes(s)) && have.length === want.length;
      },
      servers,
      { timeout: STEP_MS },
    );
  });

  await check(`the room ${ROOM} is among the top rooms`, async () => {
    await page.locator(`${t("room-row")}[data-room="${ROOM}"]`).waitFor();
  });

  await check("a room named with markup is shown as text, its script never run", async () => {
    await page.waitForFunction(
      (room) => [...document.querySelectorAll('[data-testid="room-row"]')].some((r) => r.dataset.room === room),
      HOSTILE_ROOM,
      { timeout: STEP_MS },
    );
    const shown = await page.locator("#rooms").textContent();
    if (!shown.includes(HOSTILE_ROOM)) throw new Error(`room not shown as text: ${shown}`);
    if ((await page.locator("#rooms img").count()) > 0) throw new Error("the room's markup became an element");
    if (await page.evaluate(() => window.__xss)) throw new Error("the room's script ran");
  });

  await check("job workers hold partitions", async () => {
    await page.locator(t("worker-row")).first().waitFor();
    const unheld = await page.locator(`${t("partition-row")}.unheld`).count();
    if (unheld) throw new Error(`${unheld} partitions held by no live worker`);
  });

  await check("the push rate moves: above zero on two successive updates", async () => {
    const readRates = () => page.evaluate(() => ({
      updated: document.querySelector('[data-testid="updated"]').textContent,
      rin: Number(document.querySelector('[data-testid="rate-in"]').dataset.value || 0),
      rout: Number(document.querySelector('[data-testid="rate-out"]').dataset.value || 0),
    }));
    let seen = 0;
    let last = "";
    const deadline = Date.now() + STEP_MS;
    while (seen < 2) {
      if (Date.now() > deadline) throw new Error("push rate did not stay above zero");
      const r = await readRates();
      if (r.updated !== last) {
        last = r.updated;
        seen = r.rin > 0 && r.rout > 0 ? seen + 1 : 0;
        log(`  in ${r.rin.toFixed(1)}/s, out ${r.rout.toFixed(1)}/s`);
      }
      await page.waitForTimeout(100);
    }
  });

  if (SCREENSHOT) {
    await check(`screenshot → ${SCREENSHOT}`, async () => {
      // A few more polls, so the chart has a line to show.
      await page.waitForFunction(() => window.__rimSamples >= 8, null, { timeout: STEP_MS });
      await page.screenshot({ path: SCREENSHOT, fullPage: true });
    });
  }
  log("PASS");
  clearTimeout(watchdog);
  await browser.close();
  process.exit(0);
} catch (e) {
  console.error(`FAIL during step: ${step}\n${e.stack || e}`);
  if (browserLogs.length) console.error(`browser console:\n  ${browserLogs.slice(-40).join("\n  ")}`);
  clearTimeout(watchdog);
  if (browser) await browser.close().catch(() => {});
  process.exit(1);
}

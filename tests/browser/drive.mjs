// Drives Debian's headless Chromium through playwright-core for the terminal
// page's tests (tests/test_terminal_browser.py): one browser for the whole
// run, commands as JSON lines on stdin, one JSON answer line each on stdout.
//   node drive.mjs PLAYWRIGHT_DIR CHROMIUM
import { createRequire } from "node:module";
import * as readline from "node:readline";

const [playwrightDir, executablePath] = process.argv.slice(2);
const require = createRequire(playwrightDir + "/");
const { chromium } = require("playwright-core");

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const pages = new Map();
let next = 1;

// The rendered terminal: the text of xterm.js's row elements, one per line.
const rows = (page) =>
  page.$$eval(".xterm-rows > div", (divs) => divs.map((d) => d.textContent.replace(/\u00a0/g, " ").trimEnd()));

async function until(predicate, timeout, what) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error("timed out waiting for " + what);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

const commands = {
  async open({ url, width, height }) {
    const context = await browser.newContext({ viewport: { width, height } });
    const page = await context.newPage();
    const log = [];
    page.on("console", (m) => log.push(m.text()));
    page.on("pageerror", (e) => log.push("pageerror: " + e.message));
    await page.goto(url);
    const id = next++;
    pages.set(id, { page, context, log });
    return { page: id };
  },
  async fill({ page, fields }) {
    const { page: p } = pages.get(page);
    for (const [selector, value] of Object.entries(fields)) await p.fill(selector, value);
    return {};
  },
  async click({ page, selector }) {
    await pages.get(page).page.click(selector);
    return {};
  },
  async type({ page, text }) {
    const { page: p } = pages.get(page);
    await p.click(".xterm");
    for (const line of text.split("\n")) {
      if (line) await p.keyboard.type(line);
      if (text.includes("\n")) await p.keyboard.press("Enter");
      if (!text.includes("\n")) break;
    }
    return {};
  },
  async rows({ page }) {
    return { rows: await rows(pages.get(page).page) };
  },
  async waitLine({ page, line, timeout }) {
    const { page: p } = pages.get(page);
    const found = await until(async () => (await rows(p)).some((r) => r.trim() === line), timeout, "a line " + JSON.stringify(line));
    return { found: !!found, rows: await rows(p) };
  },
  async state({ page }) {
    const { page: p, log } = pages.get(page);
    const state = await p.evaluate(() => {
      const s = window.tunneldTerminal || {};
      return {
        state: s.state, reason: s.reason, message: s.message,
        rows: s.term ? s.term.rows : null, cols: s.term ? s.term.cols : null,
        status: document.getElementById("status").textContent,
      };
    });
    return { ...state, log };
  },
  async waitState({ page, state, timeout }) {
    const { page: p } = pages.get(page);
    await until(() => p.evaluate((wanted) => (window.tunneldTerminal || {}).state === wanted, state), timeout, "state " + state);
    return commands.state({ page });
  },
  async resize({ page, width, height }) {
    await pages.get(page).page.setViewportSize({ width, height });
    return {};
  },
  async close({ page }) {
    const { context } = pages.get(page);
    pages.delete(page);
    await context.close();
    return {};
  },
  async quit() {
    await browser.close();
    setImmediate(() => process.exit(0));
    return {};
  },
};

const input = readline.createInterface({ input: process.stdin });
process.stdout.write(JSON.stringify({ ready: true, version: browser.version() }) + "\n");
for await (const line of input) {
  const request = JSON.parse(line);
  let answer;
  try {
    answer = { ok: true, ...(await commands[request.cmd](request)) };
  } catch (error) {
    answer = { ok: false, error: String(error && error.stack || error) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
await browser.close();

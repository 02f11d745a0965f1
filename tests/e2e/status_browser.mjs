// Drives Debian's chromium with puppeteer-core (tools/node_modules) through the broker's /status
// page (issue 18). Run by status_page_test.py, which starts the broker and passes a JSON config:
//   node status_browser.mjs config.json
// Prints one JSON line of what it saw; exits 1 with the reason on the first failed check.
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, "..", "..", "tools", "package.json"));
const puppeteer = require("puppeteer-core");
const cfg = JSON.parse(readFileSync(process.argv[2], "utf8"));

function check(ok, what) {
  if (!ok) throw new Error(what);
}
// "1h 02m", "59m 07s", "42s" → seconds.
function seconds(text) {
  let s = 0;
  for (const [, n, unit] of text.matchAll(/(\d+)([dhms])/g)) s += Number(n) * {d: 86400, h: 3600, m: 60, s: 1}[unit];
  return s;
}

const seen = {};
const browser = await puppeteer.launch({
  executablePath: cfg.chromium,
  headless: true,
  // Root in CI containers: Chromium's sandbox needs user namespaces it may not have.
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check"],
});
try {
  const page = await browser.newPage();
  const origin = new URL(cfg.url).origin;
  const elsewhere = [];
  page.on("request", r => { if (!r.url().startsWith(origin)) elsewhere.push(r.url()); });
  const consoleErrors = [];
  page.on("pageerror", e => consoleErrors.push(String(e)));
  // The browser's own way in: the server asks for HTTP Basic credentials, the password is the token.
  await page.authenticate({username: "admin", password: cfg.admin_token});
  await page.setViewport({width: 1280, height: 900});
  const started = Date.now();
  const response = await page.goto(cfg.url, {waitUntil: "domcontentloaded"});
  check(response.status() === 200, `GET /status answered ${response.status()}`);

  // The account table: every account, grouped by tier, each with its state.
  await page.waitForSelector(`.account[data-account-id="${cfg.expect.quota_account}"]`, {timeout: 15000});
  seen.first_render_ms = Date.now() - started;
  const cards = await page.$$eval(".account", els => els.map(e => ({id: e.dataset.accountId, state: e.dataset.state})));
  check(cards.length === cfg.expect.accounts, `${cards.length} account cards, expected ${cfg.expect.accounts}`);
  const tiers = await page.$$eval(".cards", els => els.map(e => e.dataset.tier));
  check(JSON.stringify(tiers) === JSON.stringify(cfg.expect.tiers), `tier groups ${tiers}, expected ${cfg.expect.tiers}`);

  // A quota bar with the fake's fraction.
  const bar = await page.$eval(`.account[data-account-id="${cfg.expect.quota_account}"] .bar[role=meter]`,
                               b => ({now: b.getAttribute("aria-valuenow"), width: b.firstChild.getBoundingClientRect().width,
                                      full: b.getBoundingClientRect().width}));
  check(bar.now === String(cfg.expect.quota_percent), `quota bar at ${bar.now}%, expected ${cfg.expect.quota_percent}%`);
  check(Math.abs(bar.width / bar.full - cfg.expect.quota_percent / 100) < 0.02, `quota bar drawn ${bar.width}/${bar.full} px`);
  seen.quota_bar = bar;

  // A cooldown with its reason and a countdown that ticks.
  const row = `#cooldowns tr[data-account="${cfg.expect.cooling_account}"]`;
  await page.waitForSelector(row, {timeout: 10000});
  const reason = await page.$eval(row, r => r.cells[2].textContent);
  check(reason.includes(cfg.expect.cooling_reason), `cooldown reason "${reason}"`);
  const first = await page.$eval(`${row} .countdown`, c => c.textContent);
  check(seconds(first) > cfg.expect.cooling_seconds - 120 && seconds(first) <= cfg.expect.cooling_seconds,
        `countdown "${first}" for a ${cfg.expect.cooling_seconds}s cooldown`);
  await page.waitForFunction((sel, before) => document.querySelector(sel)?.textContent !== before, {timeout: 5000},
                             `${row} .countdown`, first);
  seen.countdown = [first, await page.$eval(`${row} .countdown`, c => c.textContent)];

  // A disabled account with its reason.
  const off = `#disabled tr[data-account="${cfg.expect.disabled_account}"]`;
  const offText = await page.$eval(off, r => r.textContent);
  check(offText.includes(cfg.expect.disabled_reason), `disabled row "${offText}"`);
  check((await page.$eval(`.account[data-account-id="${cfg.expect.disabled_account}"]`, e => e.dataset.state)) === "disabled",
        "the disabled account's card is not marked disabled");
  seen.disabled = offText;

  // The page follows a ReportOutcome (the real tbctl against the real broker).
  const reported = Date.now();
  check(!(await page.$(`#cooldowns tr[data-account="${cfg.report.account}"]`)), `${cfg.report.account} cools before the report`);
  execFileSync(cfg.tbctl, ["--target", cfg.target, "--token_file", cfg.admin_token_file, "report-outcome", "--account", cfg.report.account, "--model",
                           cfg.report.model, "--http_status", "429", "--error_body", cfg.report.error_body]);
  await page.waitForSelector(`#cooldowns tr[data-account="${cfg.report.account}"]`, {timeout: 10000});
  seen.update_after_report_ms = Date.now() - reported;

  // Nothing secret in the rendered page or in the JSON it reads.
  const html = await page.content();
  const json = await page.evaluate(async () => (await fetch("status.json?limit=500", {cache: "no-store"})).text());
  check(JSON.parse(json).accounts.length === cfg.expect.accounts, "status.json (through the page) lists every account");
  for (const s of cfg.secrets) {
    check(!html.includes(s), `the page's HTML holds a secret (${s.slice(0, 6)}…)`);
    check(!json.includes(s), `status.json holds a secret (${s.slice(0, 6)}…)`);
  }
  seen.html_bytes = html.length;
  seen.json_bytes = json.length;

  await page.screenshot({path: cfg.screenshot, fullPage: true});
  // Readable on a phone: nothing wider than the screen but the scrollable tables.
  await page.setViewport({width: 390, height: 844, isMobile: true, hasTouch: true, deviceScaleFactor: 2});
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 1, `the page is ${overflow}px wider than a phone's screen`);
  await page.screenshot({path: cfg.phone_screenshot, fullPage: true});

  check(elsewhere.length === 0, `requests to other origins: ${elsewhere.join(", ")}`);
  check(consoleErrors.length === 0, `script errors: ${consoleErrors.join("; ")}`);
  console.log(JSON.stringify({ok: true, ...seen}));
} catch (e) {
  console.log(JSON.stringify({ok: false, error: String(e.message || e), ...seen}));
  process.exitCode = 1;
} finally {
  await browser.close();
}

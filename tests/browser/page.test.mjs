// The web page as a person uses it, in Debian's headless Chromium driven by playwright-core.
// GOZON_URL is a running `gozon serve --role all` (or the nginx gateway in front of both roles).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

const BASE = process.env.GOZON_URL ?? "http://127.0.0.1:8000";
const SHOTS = new URL("./screenshots/", import.meta.url).pathname;
const SETTLE = 10_000;
mkdirSync(SHOTS, { recursive: true });

let browser;
before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});
after(async () => browser?.close());

async function open(viewport = { width: 1280, height: 900 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  const requests = [];
  page.on("request", (request) => requests.push(request.url()));
  page.on("pageerror", (error) => assert.fail(`page error: ${error.message}`));
  await page.goto(BASE);
  return { page, requests, context };
}

async function logIn(page, user) {
  await page.fill("#login-user", user);
  await page.click("#login-submit");
  await page.waitForSelector("#app-view:not(.d-none)");
  await page.waitForSelector("[data-testid=live-status]:text('live')", { timeout: SETTLE });
}

const order = (page, amount) => page.locator("[data-testid=order]", { hasText: amount }).first();

test("a person tops up, pays an order, and sees a refused one cancelled, all without reloading", async () => {
  const { page, requests, context } = await open();
  const user = `pw-${Date.now()}`;
  await logIn(page, user);
  await page.screenshot({ path: `${SHOTS}01-logged-in.png` });

  await page.click("#create-account");
  await page.waitForSelector("[data-testid=balance]:text('0.00')");
  await page.fill("#topup-amount", "100");
  await page.click("#topup-submit");
  await page.waitForSelector("[data-testid=balance]:text('100.00')");

  let loads = 0;
  page.on("load", () => loads++);
  const listCallsBefore = requests.filter((url) => url.includes("/api/orders/orders")).length;

  await page.fill("#order-amount", "30");
  await page.click("#order-submit");
  const paid = order(page, "30.00");
  await paid.waitFor();
  await paid.locator("[data-testid=status]:text('FINISHED')").waitFor({ timeout: SETTLE });
  await page.waitForSelector("[data-testid=balance]:text('70.00')", { timeout: SETTLE });
  await page.screenshot({ path: `${SHOTS}02-order-finished.png` });

  await page.fill("#order-amount", "500");
  await page.click("#order-submit");
  const refused = order(page, "500.00");
  await refused.locator("[data-testid=status]:text('CANCELLED')").waitFor({ timeout: SETTLE });
  assert.equal(await refused.locator("[data-testid=reason]").innerText(), "insufficient funds");
  assert.match(await page.locator("[data-testid=balance]").innerText(), /^70\.00/);
  await page.screenshot({ path: `${SHOTS}03-order-cancelled.png`, fullPage: true });

  // Pushed, not polled and not reloaded: the page holds an event stream and did not fetch the
  // list again or reload while the statuses changed.
  assert.equal(loads, 0, "the page was not reloaded");
  assert.ok(requests.some((url) => url.includes("/api/orders/events")), "an EventSource was opened");
  const listCallsAfter = requests.filter((url) => url.includes("/api/orders/orders")).length;
  assert.equal(listCallsAfter, listCallsBefore, "statuses arrived over the stream, not by polling");

  // The session survives a reload (localStorage), and logging out forgets it.
  await page.reload();
  await page.waitForSelector(`[data-testid=current-user]:text('${user}')`);
  await page.locator("[data-testid=order]").nth(1).waitFor();
  await page.click("#logout");
  await page.waitForSelector("#login-view:not(.d-none)");
  await context.close();
});

test("a refused top-up shows the server's reason in words", async () => {
  const { page, context } = await open();
  await logIn(page, `pw-neg-${Date.now()}`);
  await page.click("#create-account");
  await page.waitForSelector("[data-testid=balance]:text('0.00')");
  await page.fill("#topup-amount", "-5");
  await page.click("#topup-submit");
  const error = page.locator("[data-testid=error]").first();
  await error.waitFor();
  const text = await error.innerText();
  assert.match(text, /Top-up refused/);
  assert.match(text, /amount must be/);
  assert.match(await page.locator("[data-testid=balance]").innerText(), /^0\.00/);
  await page.screenshot({ path: `${SHOTS}04-negative-top-up.png` });
  await context.close();
});

test("the page works at phone width", async () => {
  const { page, context } = await open({ width: 390, height: 844 });
  await logIn(page, `pw-phone-${Date.now()}`);
  await page.click("#create-account");
  await page.fill("#topup-amount", "10");
  await page.click("#topup-submit");
  await page.waitForSelector("[data-testid=balance]:text('10.00')");
  await page.fill("#order-amount", "2.50");
  await page.click("#order-submit");
  await order(page, "2.50").locator("[data-testid=status]:text('FINISHED')").waitFor({ timeout: SETTLE });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
  assert.equal(overflow, false, "nothing wider than the screen");
  await page.screenshot({ path: `${SHOTS}05-phone.png`, fullPage: true });
  await context.close();
});

// The web page against `gozon serve --auth jwt`: a person pastes a token instead of a user id,
// tops up, pays an order and sees it FINISHED live. Run by scripts/test-browser, which starts the
// server and mints GOZON_TOKEN (with the payments:top_up scope) for the user GOZON_TOKEN_USER.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

const BASE = (process.env.GOZON_URL ?? "http://127.0.0.1:8000").replace(/\/$/, "");
const TOKEN = process.env.GOZON_TOKEN;
const USER = process.env.GOZON_TOKEN_USER;
const SHOTS = new URL("./screenshots/", import.meta.url).pathname;
const SETTLE = 15_000;
mkdirSync(SHOTS, { recursive: true });

let browser;
before(async () => {
  assert.ok(TOKEN && USER, "GOZON_TOKEN and GOZON_TOKEN_USER are set");
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});
after(async () => browser?.close());

test("in jwt mode a person pastes a token, pays an order and sees it live", async (t) => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  t.after(() => context.close());
  const page = await context.newPage();
  const errors = [];
  const unauthorized = [];
  page.on("pageerror", (error) => errors.push(error.message));
  page.on("response", (r) => {
    if (r.status() === 401 && !r.url().includes("user_id=probe")) unauthorized.push(r.url());
  });
  await page.goto(BASE + "/");
  // The page learns the server wants tokens and asks for one instead of a user id.
  await page.waitForSelector("#token-field:not(.d-none)");
  assert.equal(await page.isVisible("#login-user"), false);
  await page.fill("#login-token", "not-a-token");
  await page.click("#login-submit");
  await page.waitForSelector("#login-token.is-invalid");
  await page.fill("#login-token", TOKEN);
  await page.screenshot({ path: `${SHOTS}jwt-01-token.png` });
  await page.click("#login-submit");
  await page.waitForSelector("#app-view:not(.d-none)");
  assert.equal(await page.locator("[data-testid=current-user]").innerText(), USER);
  // The stream opened with a ticket: live, not polling.
  await page.waitForSelector("[data-testid=live-status]:text-is('live')", { timeout: SETTLE });

  await page.click("#create-account");
  await page.waitForSelector("[data-testid=balance]:text('0.00')");
  await page.fill("#topup-amount", "100");
  await page.click("#topup-submit");
  await page.waitForSelector("[data-testid=balance]:text('100.00')");

  const created = page.waitForResponse((r) => r.url().includes("/api/orders/create_order"));
  await page.fill("#order-amount", "30");
  await page.click("#order-submit");
  const order = await (await created).json();
  const row = page.locator(`[data-testid=order][data-order-id="${order.id}"]`);
  await row.locator("[data-testid=status]:text-is('FINISHED')").waitFor({ timeout: SETTLE });
  await page.waitForSelector("[data-testid=balance]:text('70.00')", { timeout: SETTLE });
  await page.screenshot({ path: `${SHOTS}jwt-02-paid.png` });
  assert.deepEqual(unauthorized, [], "every call carried the token");
  assert.deepEqual(errors, [], "no script errors on the page");
});

// The web page as a person uses it, in Debian's headless Chromium driven by playwright-core
// (never a downloaded browser). Run by scripts/test-browser, which starts a server; by hand:
//   GOZON_URL=http://127.0.0.1:8000 node --test page.test.mjs
// GOZON_URL is a running `gozon serve --role all` (or the nginx gateway in front of both roles).
// Screenshots of the key steps land in screenshots/ (git-ignored).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

const BASE = (process.env.GOZON_URL ?? "http://127.0.0.1:8000").replace(/\/$/, "");
const SHOTS = new URL("./screenshots/", import.meta.url).pathname;
const SETTLE = 15_000; // a saga normally ends within 200 ms; allow for a busy machine
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

const unique = (prefix) => `${prefix}-${Date.now()}-${Math.floor(Math.random() * 1e6)}`;

// A fresh browser profile on the page, recording every request it makes and every script error.
async function open(t, viewport = { width: 1280, height: 900 }) {
  const context = await browser.newContext({ viewport });
  t.after(() => context.close());
  const page = await context.newPage();
  const requests = [];
  const errors = [];
  page.on("request", (request) => requests.push(new URL(request.url()).pathname));
  page.on("pageerror", (error) => errors.push(error.message));
  t.after(() => assert.deepEqual(errors, [], "no script errors on the page"));
  await page.goto(BASE + "/");
  await page.waitForSelector("#login-view:not(.d-none)");
  return { page, requests };
}

async function logIn(page, user) {
  await page.fill("#login-user", user);
  await page.click("#login-submit");
  await page.waitForSelector("#app-view:not(.d-none)");
  await page.waitForSelector("[data-testid=live-status]:text-is('live')", { timeout: SETTLE });
}

async function createAccount(page) {
  await page.click("#create-account");
  await page.waitForSelector("[data-testid=balance]:text('0.00')");
}

async function topUp(page, amount, expectedBalance) {
  await page.fill("#topup-amount", amount);
  await page.click("#topup-submit");
  await page.waitForSelector(`[data-testid=balance]:text('${expectedBalance}')`);
}

// Places an order and returns its row (found by the id the page shows for it).
async function placeOrder(page, amount) {
  const created = page.waitForResponse((r) => r.url().includes("/api/orders/create_order"));
  await page.fill("#order-amount", amount);
  await page.click("#order-submit");
  const order = await (await created).json();
  assert.equal(order.status, "NEW");
  const row = page.locator(`[data-testid=order][data-order-id="${order.id}"]`);
  await row.waitFor();
  return row;
}

const status = (row, text) => row.locator(`[data-testid=status]:text-is('${text}')`).waitFor({ timeout: SETTLE });
const balance = (page) => page.locator("[data-testid=balance]").innerText();
const count = (requests, path) => requests.filter((p) => p === path).length;

test("a person tops up, pays an order and sees a refused one cancelled, live, without reloading", async (t) => {
  const { page, requests } = await open(t);
  await page.screenshot({ path: `${SHOTS}01-login.png` });
  const user = unique("pw");
  await logIn(page, user);
  await page.waitForSelector("#no-account:not(.d-none)");
  await page.screenshot({ path: `${SHOTS}02-no-account.png` });

  await createAccount(page);
  await topUp(page, "100", "100.00");

  let loads = 0;
  page.on("load", () => loads++);
  const listCalls = count(requests, "/api/orders/orders");

  const paid = await placeOrder(page, "30");
  await status(paid, "FINISHED");
  await page.waitForSelector("[data-testid=balance]:text('70.00')", { timeout: SETTLE });
  assert.equal(await paid.locator("[data-testid=amount]").innerText(), "30.00\u00a0₽");
  assert.equal(await balance(page), "70.00\u00a0₽");
  await page.screenshot({ path: `${SHOTS}03-order-finished.png` });

  const refused = await placeOrder(page, "500");
  await status(refused, "CANCELLED");
  assert.equal(await refused.locator("[data-testid=reason]").innerText(), "insufficient funds");
  assert.equal(await balance(page), "70.00\u00a0₽");
  // Newest first.
  const rows = page.locator("[data-testid=order]");
  assert.equal(await rows.count(), 2);
  assert.equal(await rows.nth(0).getAttribute("data-order-id"), await refused.getAttribute("data-order-id"));
  await page.screenshot({ path: `${SHOTS}04-order-cancelled.png`, fullPage: true });

  // Pushed, not polled and not reloaded: the page opened the event stream, and neither reloaded
  // nor read the order list again while the statuses changed (nor in a poll period after).
  await page.waitForTimeout(2500);
  assert.equal(loads, 0, "the page was not reloaded");
  assert.ok(count(requests, "/api/orders/events") >= 1, "an EventSource connection was made");
  assert.equal(count(requests, "/api/orders/orders"), listCalls, "statuses came over the stream, not by polling");
  assert.equal(await page.locator("[data-testid=error]").count(), 0, "no error shown");

  // The session survives a reload (localStorage), and logging out forgets it.
  await page.reload();
  await page.waitForSelector(`[data-testid=current-user]:text-is('${user}')`);
  await page.waitForSelector("[data-testid=balance]:text('70.00')");
  assert.equal(await rows.count(), 2);
  await page.click("#logout");
  await page.waitForSelector("#login-view:not(.d-none)");
  assert.equal(await page.evaluate(() => localStorage.getItem("gozon.userId")), null);
});

test("refusals are shown in words: the server's for a negative top-up, and a network failure", async (t) => {
  const { page } = await open(t);
  const user = unique("pw-neg");
  await logIn(page, user);
  await createAccount(page);

  // What the server says about -5, asked directly, must be what the person reads.
  const direct = await fetch(`${BASE}/api/payments/add_funds?user_id=${user}&amount=-5`, { method: "POST" });
  assert.equal(direct.status, 400);
  const { message } = await direct.json();
  assert.ok(message);

  await page.fill("#topup-amount", "-5");
  await page.click("#topup-submit");
  const error = page.locator("[data-testid=error]").first();
  await error.waitFor();
  assert.equal(await error.innerText(), `Top-up refused: ${message}`);
  assert.equal(await balance(page), "0.00\u00a0₽");
  await page.screenshot({ path: `${SHOTS}05-negative-top-up.png` });

  // No answer at all (the request never reaches the server).
  await page.route("**/api/payments/add_funds*", (route) => route.abort("internetdisconnected"));
  await page.fill("#topup-amount", "5");
  await page.click("#topup-submit");
  await page.locator("[data-testid=error]", { hasText: "Could not top up: the server cannot be reached" }).waitFor();
  assert.equal(await balance(page), "0.00\u00a0₽");
  await page.unroute("**/api/payments/add_funds*");
  // Sent again, the same top-up carries the same Idempotency-Key, and is applied once.
  const keys = [];
  page.on("request", (r) => r.url().includes("add_funds") && keys.push(r.headers()["idempotency-key"]));
  await page.click("#topup-submit");
  await page.waitForSelector("[data-testid=balance]:text('5.00')");
  assert.equal(keys.length, 1);
  assert.match(keys[0], /^[0-9a-f]{32}$/);
  // Once the top-up went through, its earlier failures are no longer shown.
  await page.locator("[data-testid=error]").first().waitFor({ state: "detached" });
});

test("a user id is checked before anything is sent", async (t) => {
  const { page, requests } = await open(t);
  const before = requests.length;
  const cases = [["", /Enter a user id/], ["has space", /not spaces/], ["émile", /not “é”/],
    ["x".repeat(65), /at most 64 characters; this one has 65/]];
  for (const [bad, why] of cases) {
    await page.fill("#login-user", bad);
    await page.click("#login-submit");
    await page.waitForSelector("#login-user.is-invalid");
    const error = page.locator("#login-error");
    assert.ok(await error.isVisible(), `a reason is shown for ${JSON.stringify(bad)}`);
    assert.match(await error.innerText(), why);
    assert.ok(await page.locator("#app-view").isHidden());
  }
  assert.equal(requests.length, before, "nothing was sent for an invalid id");
  await page.screenshot({ path: `${SHOTS}06-invalid-user-id.png` });
  await page.fill("#login-user", "Ok_id-1.2");
  await page.click("#login-submit");
  await page.waitForSelector("#app-view:not(.d-none)");
});

test("while the event stream is down the page polls, and goes live again when it is back", async (t) => {
  const { page, requests } = await open(t);
  await page.route("**/api/orders/events*", (route) => route.abort("connectionrefused"));
  await page.fill("#login-user", unique("pw-poll"));
  await page.click("#login-submit");
  await page.waitForSelector("[data-testid=live-status]:text-is('polling')", { timeout: SETTLE });
  await createAccount(page);
  await topUp(page, "10", "10.00");

  const listCalls = count(requests, "/api/orders/orders");
  const row = await placeOrder(page, "4");
  await status(row, "FINISHED");
  await page.waitForSelector("[data-testid=balance]:text('6.00')", { timeout: SETTLE });
  assert.ok(count(requests, "/api/orders/orders") > listCalls, "the list was polled");
  await page.screenshot({ path: `${SHOTS}07-polling.png` });

  await page.unroute("**/api/orders/events*");
  await page.waitForSelector("[data-testid=live-status]:text-is('live')", { timeout: SETTLE });
  // Live again: polling stopped.
  const afterReconnect = count(requests, "/api/orders/orders");
  await page.waitForTimeout(4500);
  assert.ok(count(requests, "/api/orders/orders") <= afterReconnect + 1, "no polling once live");
});

test("the page works at phone width, and an order without an account is cancelled for it", async (t) => {
  const { page } = await open(t, { width: 390, height: 844 });
  await logIn(page, unique("pw-phone"));
  const orphan = await placeOrder(page, "3");
  await status(orphan, "CANCELLED");
  assert.equal(await orphan.locator("[data-testid=reason]").innerText(), "no account");
  assert.ok(await page.locator("#create-account").isVisible(), "no account yet: offered to create one");
  assert.equal(await page.locator("[data-testid=error]").count(), 0, "no account yet is not an error");

  await createAccount(page);
  await topUp(page, "1234567.8", "1\u202f234\u202f567.80");
  const row = await placeOrder(page, "2.50");
  await status(row, "FINISHED");
  await page.waitForSelector("[data-testid=balance]:text('565.30')", { timeout: SETTLE });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
  assert.equal(overflow, false, "nothing is wider than the screen");
  await page.screenshot({ path: `${SHOTS}08-phone.png`, fullPage: true });
});

test("a long history loads a page at a time: older orders on demand", async (t) => {
  const user = unique("pw-many");
  // 105 orders placed through the API (no account: each is cancelled at once).
  for (let batch = 0; batch < 7; batch++) {
    await Promise.all(Array.from({ length: 15 }, () =>
      fetch(`${BASE}/api/orders/create_order?user_id=${user}&amount=1`, { method: "POST" })
        .then((r) => assert.equal(r.status, 201))));
  }
  const { page } = await open(t);
  await logIn(page, user);
  const rows = page.locator("[data-testid=order]");
  await page.waitForFunction(() => document.querySelectorAll("[data-testid=order]").length === 100);
  assert.equal(await page.isVisible("[data-testid=load-more]"), true);
  await page.click("[data-testid=load-more]");
  await page.waitForFunction(() => document.querySelectorAll("[data-testid=order]").length === 105);
  await page.waitForSelector("[data-testid=load-more]", { state: "hidden" });
  assert.equal(await rows.count(), 105);
});

test("a person pays an order, refunds it and sees the money come back, and cancels a new one", async (t) => {
  const { page } = await open(t);
  const user = unique("pw-refund");
  await logIn(page, user);
  await createAccount(page);
  await topUp(page, "100", "100.00");
  const paid = await placeOrder(page, "30");
  await status(paid, "FINISHED");
  await page.waitForSelector("[data-testid=balance]:text('70.00')", { timeout: SETTLE });
  await paid.locator("[data-testid=order-action]:text-is('Refund')").click();
  // REFUNDING, then REFUNDED, pushed over the stream; the balance and the ledger follow.
  await status(paid, "REFUNDED");
  await page.waitForSelector("[data-testid=balance]:text('100.00')", { timeout: SETTLE });
  await page.waitForFunction(() => document.querySelectorAll("[data-testid=ledger-entry]").length === 3, null, { timeout: SETTLE });
  const kinds = await page.locator("[data-testid=ledger-entry]").evaluateAll((rows) => rows.map((r) => r.dataset.kind));
  assert.deepEqual(kinds, ["refund", "debit", "top_up"]);
  assert.equal(await paid.locator("[data-testid=order-action]").isVisible(), false);
  await page.screenshot({ path: `${SHOTS}07-refunded.png`, fullPage: true });

  // A NEW order is paid within milliseconds, too fast for a click: cancel one through the API
  // right after placing it. Cancelled before or after its debit, its money comes back.
  const created = page.waitForResponse((r) => r.url().includes("/api/orders/create_order"));
  await page.fill("#order-amount", "5");
  await page.click("#order-submit");
  const order = await (await created).json();
  const row = page.locator(`[data-testid=order][data-order-id="${order.id}"]`);
  await row.waitFor();
  const cancelled = await page.evaluate(async (id) =>
    (await fetch(`api/orders/cancel_order?id=${id}`, { method: "POST" })).json(), order.id);
  assert.ok(["CANCELLED", "REFUNDING"].includes(cancelled.status), JSON.stringify(cancelled));
  await row.locator("[data-testid=status]:text-matches('CANCELLED|REFUNDED')").waitFor({ timeout: SETTLE });
  await page.waitForSelector("[data-testid=balance]:text('100.00')", { timeout: SETTLE });
});

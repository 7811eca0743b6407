// Gozon's web page: plain JavaScript over the JSON API; order statuses arrive live over
// Server-Sent Events, and are polled every 2 s while the stream is down.
// URLs are relative, so the page works from `gozon serve` and behind the nginx gateway alike.
"use strict";

const USER_KEY = "gozon.userId";
const TOKEN_KEY = "gozon.token";
const USER_ID = /^[A-Za-z0-9._-]{1,64}$/;
const POLL_MS = 2000;
// How far along its life an order is: an answer describing an earlier stage is stale.
const STAGE = { NEW: 0, FINISHED: 1, CANCELLED: 1, REFUNDING: 2, REFUNDED: 3 };
const REASONS = {
  no_account: "no account",
  insufficient_funds: "insufficient funds",
  cancelled_by_user: "cancelled by you",
  payment_timeout: "no payment in time",
};
const BADGES = {
  NEW: "text-bg-warning",
  FINISHED: "text-bg-success",
  CANCELLED: "text-bg-danger",
  REFUNDING: "text-bg-info",
  REFUNDED: "text-bg-secondary",
};
const ENTRY_KINDS = { top_up: "top-up", debit: "payment", refund: "refund" };

const state = {
  mode: "none", // "jwt" when the server asks for bearer tokens (it answers 401 without one)
  token: null, // in jwt mode: the pasted token, sent on every call
  user: null,
  session: 0, // bumped on every log in and log out: answers meant for an earlier session are dropped
  orders: new Map(), // id -> order, as the server last described it
  olderCursor: undefined, // where the next older page starts: undefined before the first page, null at the end
  rows: new Map(), // id -> its <li>
  stream: null,
  pollTimer: null,
  reopenTimer: null,
  balanceTicket: 0, // balance answers are shown only if no later-asked one was shown already
  balanceShown: 0,
  balanceLoading: false,
  balanceAgain: false,
  retryKeys: new Map(), // action -> { params, key } of a submission whose outcome is unknown
};
const $ = (id) => document.getElementById(id);

// ---- API -------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status; // 0: no answer at all
    this.code = code;
  }
}

async function api(method, path, params = {}, idempotencyKey = null) {
  const query = new URLSearchParams(params).toString();
  const headers = { Accept: "application/json" };
  if (idempotencyKey) headers["Idempotency-Key"] = idempotencyKey;
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  let response;
  try {
    response = await fetch(query ? `${path}?${query}` : path, { method, headers, cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, "network", "the server cannot be reached; check your connection and try again.");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null; // e.g. a gateway's HTML error page
  }
  if (!response.ok) {
    const status = `${response.status} ${response.statusText}`.trim();
    const message = body && typeof body.message === "string" && body.message
      ? body.message
      : response.status >= 500
        ? `the service is unavailable right now (${status}); try again in a moment.`
        : `the server answered ${status}.`;
    throw new ApiError(response.status, body && body.error ? body.error : "http_error", message);
  }
  return body;
}

function randomKey() {
  // crypto.randomUUID needs a secure context; the page may be served over plain http.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// A POST that got no answer (network failure, 5xx) may or may not have happened. Sending the same
// values again reuses its Idempotency-Key, so the server does it at most once; anything else
// (success, other values, a 4xx refusal) starts afresh.
async function post(action, path, params) {
  const signature = JSON.stringify(params);
  let pending = state.retryKeys.get(action);
  if (!pending || pending.signature !== signature) pending = { signature, key: randomKey() };
  state.retryKeys.set(action, pending);
  try {
    const body = await api("POST", path, params, pending.key);
    state.retryKeys.delete(action);
    resolved(action); // an earlier failure of this action is past
    return body;
  } catch (error) {
    if (error.status >= 400 && error.status < 500) state.retryKeys.delete(action);
    throw error;
  }
}

// ---- Formatting ------------------------------------------------------------------------------

// The API sends exact decimal strings ("1234.50"): group the digits without ever using floats.
function money(text) {
  const [whole, fraction = ""] = String(text).split(".");
  const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, "\u202f");
  return `${grouped}.${fraction.padEnd(2, "0")}\u00a0₽`;
}

function when(timestamp) {
  const date = new Date(timestamp);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleString();
}

// ---- Messages to the person ------------------------------------------------------------------

// Errors stay until closed; notices go after 4 s. An alert already on screen is not repeated
// (polling while the server is unreachable would otherwise add one every 2 s).
function notify(text, kind = "danger", topic = "") {
  const alerts = $("alerts");
  const same = [...alerts.children].find((alert) => alert.dataset.text === text);
  if (same) {
    alerts.prepend(same);
    return;
  }
  // One notice at a time: a newer one replaces it.
  if (kind !== "danger") alerts.querySelectorAll("[data-testid=notice]").forEach((n) => n.remove());
  const alert = document.createElement("div");
  alert.className = `alert alert-${kind} alert-dismissible fade show py-2 mb-2`;
  alert.setAttribute("role", kind === "danger" ? "alert" : "status");
  alert.dataset.testid = kind === "danger" ? "error" : "notice";
  alert.dataset.text = text;
  alert.dataset.topic = topic;
  alert.append(text);
  const close = document.createElement("button");
  close.type = "button";
  close.className = "btn-close";
  close.setAttribute("aria-label", "Close");
  close.addEventListener("click", () => alert.remove());
  alert.append(close);
  alerts.prepend(alert);
  if (kind !== "danger") setTimeout(() => alert.remove(), 4000);
  while (alerts.children.length > 4) alerts.lastElementChild.remove();
}

// Background loads (balance, order list) and actions clear their own error once they work again.
function resolved(topic) {
  for (const alert of [...$("alerts").children]) if (alert.dataset.topic === topic) alert.remove();
}

// what: [when the server refused, when there was no usable answer] or one text for both.
function explain(error, what, topic = "") {
  const [refused, failed] = Array.isArray(what) ? what : [what, what];
  const unanswered = error.status === 0 || error.status >= 500;
  notify(`${unanswered ? failed : refused}: ${error.message}`, "danger", topic);
}

function clearAlerts() {
  $("alerts").replaceChildren();
}

// ---- Views -----------------------------------------------------------------------------------

function showLogin() {
  $("login-view").classList.remove("d-none");
  $("app-view").classList.add("d-none");
  $("session").classList.add("d-none");
  $(state.mode === "jwt" ? "login-token" : "login-user").focus();
}

function showApp() {
  $("login-view").classList.add("d-none");
  $("app-view").classList.remove("d-none");
  $("session").classList.remove("d-none");
  $("current-user").textContent = state.user;
  $("current-user").title = state.user;
}

// account: the account, null for "no account yet", undefined for "unknown" (still loading).
function showBalance(account) {
  $("account-loading").classList.toggle("d-none", account !== undefined);
  $("no-account").classList.toggle("d-none", account !== null);
  $("account").classList.toggle("d-none", !account);
  if (account) $("balance").textContent = money(account.balance);
}

function orderRow(order) {
  let item = state.rows.get(order.id);
  if (!item) {
    item = document.createElement("li");
    item.className = "list-group-item px-0";
    item.dataset.orderId = order.id;
    item.dataset.testid = "order";
    item.innerHTML =
      '<div class="d-flex justify-content-between align-items-center gap-2">' +
      '<span class="order-amount fw-semibold" data-testid="amount"></span>' +
      '<span class="order-status badge" data-testid="status"></span></div>' +
      '<div class="d-flex justify-content-between gap-2 small">' +
      '<span class="order-time text-muted"></span>' +
      '<span class="order-note text-end" data-testid="note"></span></div>' +
      '<div class="d-flex justify-content-between align-items-center gap-2">' +
      '<span class="order-id text-muted" data-testid="order-id"></span>' +
      '<button class="order-action btn btn-sm btn-outline-danger d-none" type="button" data-testid="order-action"></button></div>';
    item.querySelector(".order-action").addEventListener("click", (event) => cancelOrder(item.dataset.orderId, event.target));
    state.rows.set(order.id, item);
  }
  item.dataset.status = order.status;
  item.querySelector(".order-amount").textContent = money(order.amount);
  item.querySelector(".order-time").textContent = when(order.created_at);
  item.querySelector(".order-id").textContent = order.id;
  const badge = item.querySelector(".order-status");
  badge.className = `order-status badge ${BADGES[order.status] || "text-bg-secondary"}`;
  badge.textContent = order.status;
  // A NEW order can be cancelled; a paid one refunded.
  const action = item.querySelector(".order-action");
  const label = { NEW: "Cancel", FINISHED: "Refund" }[order.status];
  action.classList.toggle("d-none", !label);
  action.textContent = label || "";
  action.dataset.action = label ? label.toLowerCase() : "";
  const note = item.querySelector(".order-note");
  note.replaceChildren();
  if (order.status === "REFUNDING" || order.status === "REFUNDED") {
    note.className = "order-note text-end text-muted";
    note.textContent = order.status === "REFUNDING" ? "refund on its way…" : "refunded";
  } else if (order.status === "CANCELLED") {
    const reason = document.createElement("span");
    reason.dataset.testid = "reason";
    reason.textContent = REASONS[order.reason] || order.reason || "no reason given";
    note.className = "order-note text-end text-danger";
    note.append(reason);
  } else if (order.status === "NEW") {
    note.className = "order-note text-end text-muted";
    note.textContent = "awaiting payment…";
  } else {
    note.className = "order-note text-end text-success";
    note.textContent = "paid";
  }
  return item;
}

function renderOrders() {
  const newestFirst = [...state.orders.values()].sort((a, b) =>
    Date.parse(b.created_at) - Date.parse(a.created_at) || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0));
  $("orders").replaceChildren(...newestFirst.map(orderRow));
  $("no-orders").classList.toggle("d-none", newestFirst.length > 0);
}

// Applies an order as the server described it; returns true when its status changed. A status
// only moves forward (NEW, then FINISHED or CANCELLED, then REFUNDING and REFUNDED), so a late
// answer describing an earlier stage is ignored.
function upsertOrder(order) {
  if (!order || typeof order.id !== "string" || order.user_id !== state.user) return false;
  const known = state.orders.get(order.id);
  if (known && (STAGE[order.status] ?? 0) < (STAGE[known.status] ?? 0)) return false;
  state.orders.set(order.id, order);
  return !known || known.status !== order.status;
}

function setLive(text, kind, title) {
  const badge = $("live-status");
  badge.textContent = text;
  badge.className = `badge text-bg-${kind}`;
  badge.title = title;
}

// ---- Loading ---------------------------------------------------------------------------------

async function loadBalance() {
  const session = state.session;
  const ticket = ++state.balanceTicket;
  let account;
  try {
    account = await api("GET", "api/payments/balance", { user_id: state.user });
  } catch (error) {
    if (session !== state.session) return;
    if (error.code !== "account_not_found") {
      explain(error, "Could not load the balance", "balance");
      $("account-loading").textContent = "The balance is unavailable right now.";
      return;
    }
    account = null;
  }
  if (session !== state.session) return;
  resolved("balance");
  applyBalance(account, ticket);
  if (account) loadLedger(session);
}

// The account's latest balance changes, under the balance.
async function loadLedger(session) {
  let body;
  try {
    body = await api("GET", "api/payments/transactions", { user_id: state.user, limit: 10 });
  } catch (error) {
    return; // the balance above is what matters; the next refresh tries again
  }
  if (session !== state.session) return;
  const rows = ((body && body.transactions) || []).map((entry) => {
    const item = document.createElement("li");
    item.className = "list-group-item px-0 py-1 d-flex justify-content-between small";
    item.dataset.testid = "ledger-entry";
    item.dataset.kind = entry.kind;
    const what = document.createElement("span");
    what.textContent = `${ENTRY_KINDS[entry.kind] || entry.kind} · ${when(entry.created_at)}`;
    const amount = document.createElement("span");
    amount.className = entry.kind === "debit" ? "text-danger" : "text-success";
    amount.textContent = `${entry.kind === "debit" ? "−" : "+"}${money(entry.amount)}`;
    item.append(what, amount);
    return item;
  });
  $("ledger").replaceChildren(...rows);
  $("ledger-title").classList.toggle("d-none", rows.length === 0);
}

function applyBalance(account, ticket) {
  if (ticket < state.balanceShown) return; // a later-asked answer is on screen already
  state.balanceShown = ticket;
  showBalance(account);
}

// Events can come in bursts: one balance request at a time, and one more after it if asked meanwhile.
async function refreshBalance() {
  if (state.balanceLoading) {
    state.balanceAgain = true;
    return;
  }
  state.balanceLoading = true;
  try {
    do {
      state.balanceAgain = false;
      await loadBalance();
    } while (state.balanceAgain);
  } finally {
    state.balanceLoading = false;
  }
}

// The newest page of orders (refreshed after the stream reconnects and while polling); older
// pages are read when the person asks for them.
async function loadOrders(cursor = null) {
  const session = state.session;
  const params = { user_id: state.user };
  if (cursor) params.cursor = cursor;
  let body;
  try {
    body = await api("GET", "api/orders/orders", params);
  } catch (error) {
    if (session === state.session) explain(error, "Could not load your orders", "orders");
    return;
  }
  if (session !== state.session) return;
  resolved("orders");
  let changed = false;
  for (const order of (body && body.orders) || []) changed = upsertOrder(order) || changed;
  // The first page sets where older orders start; each older page moves it on.
  if (cursor || state.olderCursor === undefined) state.olderCursor = (body && body.next_cursor) || null;
  $("load-more").classList.toggle("d-none", !state.olderCursor);
  renderOrders();
  if (changed) refreshBalance();
}

// ---- Live updates: Server-Sent Events, polling while the stream is down ----------------------

function startPolling() {
  if (state.pollTimer === null) state.pollTimer = setInterval(loadOrders, POLL_MS);
}

function stopPolling() {
  if (state.pollTimer !== null) clearInterval(state.pollTimer);
  state.pollTimer = null;
}

// In jwt mode an EventSource cannot send the token: it opens the stream with a short-lived
// ticket, fetched afresh for every (re)connection.
async function streamUrl() {
  const url = `api/orders/events?user_id=${encodeURIComponent(state.user)}`;
  if (state.mode !== "jwt") return url;
  const { ticket } = await api("POST", "api/orders/events/ticket");
  return `${url}&ticket=${encodeURIComponent(ticket)}`;
}

async function openStream() {
  closeStream();
  const session = state.session;
  let url;
  try {
    url = await streamUrl();
  } catch (error) {
    if (session !== state.session) return;
    setLive("polling", "warning", `The live stream is down: checking every ${POLL_MS / 1000} s until it is back.`);
    startPolling();
    state.reopenTimer = setTimeout(() => {
      state.reopenTimer = null;
      if (session === state.session) openStream();
    }, POLL_MS);
    return;
  }
  if (session !== state.session) return;
  const stream = new EventSource(url);
  state.stream = stream;
  stream.onopen = () => {
    if (state.stream !== stream) return;
    setLive("live", "success", "Status changes are pushed to this page as they happen.");
    stopPolling();
    loadOrders(); // catch up on whatever changed while the stream was down
  };
  stream.onmessage = (event) => {
    if (state.stream !== stream) return;
    let order;
    try {
      order = JSON.parse(event.data);
    } catch (e) {
      return;
    }
    upsertOrder(order);
    renderOrders();
    refreshBalance();
  };
  stream.onerror = () => {
    if (state.stream !== stream) return;
    setLive("polling", "warning", `The live stream is down: checking every ${POLL_MS / 1000} s until it is back.`);
    startPolling();
    // The browser retries by itself after a dropped connection, but not after a refused one.
    if (stream.readyState === EventSource.CLOSED && state.reopenTimer === null) {
      state.reopenTimer = setTimeout(() => {
        state.reopenTimer = null;
        if (state.stream === stream) openStream();
      }, POLL_MS);
    }
  };
}

function closeStream() {
  if (state.stream) state.stream.close();
  state.stream = null;
  if (state.reopenTimer !== null) clearTimeout(state.reopenTimer);
  state.reopenTimer = null;
  stopPolling();
}

// ---- Actions ---------------------------------------------------------------------------------

function resetSession(user) {
  closeStream();
  state.session++;
  state.user = user;
  state.orders.clear();
  state.rows.clear();
  state.olderCursor = undefined;
  $("load-more").classList.add("d-none");
  $("ledger").replaceChildren();
  $("ledger-title").classList.add("d-none");
  state.retryKeys.clear();
  state.balanceShown = state.balanceTicket;
  clearAlerts();
}

function login(user, token = null) {
  resetSession(user);
  state.token = token;
  localStorage.setItem(USER_KEY, user);
  if (token) localStorage.setItem(TOKEN_KEY, token);
  showApp();
  $("account-loading").textContent = "Loading…";
  showBalance(undefined);
  renderOrders();
  setLive("connecting…", "secondary", "Connecting to the live stream.");
  refreshBalance();
  loadOrders();
  openStream();
}

function logout() {
  const user = state.user;
  resetSession(null);
  state.token = null;
  localStorage.removeItem(USER_KEY);
  localStorage.removeItem(TOKEN_KEY);
  $("login-user").value = user || "";
  $("login-token").value = "";
  showLogin();
}

async function busy(button, work) {
  button.disabled = true;
  try {
    await work();
  } finally {
    button.disabled = false;
  }
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.mode === "jwt") {
    logInWithToken();
    return;
  }
  const input = $("login-user");
  const user = input.value.trim();
  if (!USER_ID.test(user)) {
    input.classList.add("is-invalid");
    $("login-error").textContent = whyNotUserId(user);
    input.focus();
    return;
  }
  input.classList.remove("is-invalid");
  login(user);
});

// Says what is wrong with a user id the server would refuse (the rules of README.md).
function whyNotUserId(user) {
  if (!user) return "Enter a user id.";
  const chars = [...user];
  if (chars.length > 64) return `A user id has at most 64 characters; this one has ${chars.length}.`;
  const bad = [...new Set(chars.filter((c) => !/[A-Za-z0-9._-]/.test(c)))]
    .map((c) => (c === " " ? "spaces" : `“${c}”`));
  return `A user id has only Latin letters, digits, “-”, “_” and “.”; not ${bad.join(", ")}.`;
}

$("login-user").addEventListener("input", () => $("login-user").classList.remove("is-invalid"));
$("login-token").addEventListener("input", () => $("login-token").classList.remove("is-invalid"));

// The user a token acts for: its `sub`, read (not verified: the server does that) from the
// middle part of the JWT. Null when the text is not such a token.
function tokenSubject(token) {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const json = atob(parts[1].replace(/-/g, "+").replace(/_/g, "/"));
    const claims = JSON.parse(json);
    return typeof claims.sub === "string" && USER_ID.test(claims.sub) ? claims.sub : null;
  } catch (e) {
    return null;
  }
}

function logInWithToken() {
  const input = $("login-token");
  const token = input.value.trim();
  const user = tokenSubject(token);
  if (!user) {
    input.classList.add("is-invalid");
    $("token-error").textContent = token
      ? "This is not a token this page can read: a JWT of three dot-separated parts whose payload names a user in `sub`."
      : "Paste your access token.";
    input.focus();
    return;
  }
  input.classList.remove("is-invalid");
  login(user, token);
}

// Whether the server asks for tokens: a list read without one is refused (401) in jwt mode.
async function detectMode() {
  try {
    const response = await fetch("api/orders/orders?user_id=probe", {
      headers: { Accept: "application/json" },
      cache: "no-store",
    });
    return response.status === 401 ? "jwt" : "none";
  } catch (e) {
    return "none";
  }
}

function applyMode() {
  const jwt = state.mode === "jwt";
  $("user-field").classList.toggle("d-none", jwt);
  $("token-field").classList.toggle("d-none", !jwt);
  $("login-user").required = !jwt;
  $("login-token").required = jwt;
}

$("logout").addEventListener("click", logout);

$("load-more").addEventListener("click", () => busy($("load-more"), () => loadOrders(state.olderCursor)));

$("create-account").addEventListener("click", () => busy($("create-account"), async () => {
  const session = state.session;
  const ticket = ++state.balanceTicket;
  try {
    const account = await post("create_account", "api/payments/create_account", { user_id: state.user });
    if (session !== state.session) return;
    applyBalance(account, ticket);
    notify("Account created.", "success");
  } catch (error) {
    if (session !== state.session) return;
    explain(error, ["Account not created", "Could not create the account"], "create_account");
    refreshBalance();
  }
}));

$("topup-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("topup-submit"), async () => {
    const session = state.session;
    const ticket = ++state.balanceTicket;
    const amount = $("topup-amount").value.trim(); // the server has the last word on amounts
    try {
      const account = await post("add_funds", "api/payments/add_funds", { user_id: state.user, amount });
      if (session !== state.session) return;
      applyBalance(account, ticket);
      $("topup-amount").value = "";
      notify(`Added ${money(amountOf(amount))}.`, "success");
    } catch (error) {
      if (session !== state.session) return;
      explain(error, ["Top-up refused", "Could not top up"], "add_funds");
      if (error.code === "account_not_found") refreshBalance();
    }
  });
});

// Cancels a NEW order or refunds a paid one; the new status arrives with the answer (and live).
function cancelOrder(id, button) {
  busy(button, async () => {
    const session = state.session;
    try {
      const order = await post(`cancel_order:${id}`, "api/orders/cancel_order", { id });
      if (session !== state.session) return;
      upsertOrder(order);
      renderOrders();
      refreshBalance();
    } catch (error) {
      if (session !== state.session) return;
      explain(error, ["Not cancelled", "Could not cancel the order"], `cancel_order:${id}`);
    }
  });
}

// "100" -> "100.00", for the notice after a successful top-up (the server accepted it as it is).
function amountOf(text) {
  const [whole, fraction = ""] = text.split(".");
  return `${whole.replace(/^0+(?=\d)/, "")}.${fraction.padEnd(2, "0")}`;
}

$("order-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("order-submit"), async () => {
    const session = state.session;
    const amount = $("order-amount").value.trim();
    try {
      const order = await post("create_order", "api/orders/create_order", { user_id: state.user, amount });
      if (session !== state.session) return;
      upsertOrder(order);
      renderOrders();
      $("order-amount").value = "";
    } catch (error) {
      if (session !== state.session) return;
      explain(error, ["Order refused", "Could not place the order"], "create_order");
    }
  });
});

async function start() {
  state.mode = await detectMode();
  applyMode();
  if (state.mode === "jwt") {
    const token = localStorage.getItem(TOKEN_KEY);
    const user = token && tokenSubject(token);
    if (user) login(user, token);
    else showLogin();
    return;
  }
  const saved = localStorage.getItem(USER_KEY);
  if (saved && USER_ID.test(saved)) login(saved);
  else showLogin();
}

start();

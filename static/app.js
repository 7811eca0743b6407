// Gozon's web page: plain JavaScript over the JSON API, live order status over Server-Sent Events.
"use strict";

const USER_KEY = "gozon.userId";
const USER_ID = /^[A-Za-z0-9._-]{1,64}$/;
const POLL_MS = 2000;

const state = { user: null, orders: new Map(), stream: null, pollTimer: null };
const $ = (id) => document.getElementById(id);

// ---- API -------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, params = {}) {
  const query = new URLSearchParams(params).toString();
  let response;
  try {
    response = await fetch(query ? `${path}?${query}` : path, { method, headers: { Accept: "application/json" } });
  } catch (e) {
    throw new ApiError(0, "network", "Cannot reach the server. Check your connection and try again.");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.message ? body.message : `The server answered ${response.status}.`;
    throw new ApiError(response.status, body && body.error ? body.error : "http_error", message);
  }
  return body;
}

// ---- Formatting ------------------------------------------------------------------------------

// The API sends exact decimal strings ("1234.50"); group the digits without ever using floats.
function money(text) {
  const [whole, fraction = "00"] = String(text).split(".");
  const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, "\u202f");
  return `${grouped}.${fraction.padEnd(2, "0")} ₽`;
}

const REASONS = { no_account: "no account", insufficient_funds: "insufficient funds" };
const BADGES = { NEW: "text-bg-warning", FINISHED: "text-bg-success", CANCELLED: "text-bg-danger" };

// ---- Messages to the person ------------------------------------------------------------------

function notify(text, kind = "danger") {
  const alert = document.createElement("div");
  alert.className = `alert alert-${kind} alert-dismissible fade show`;
  alert.setAttribute("role", "alert");
  alert.dataset.testid = kind === "danger" ? "error" : "notice";
  alert.textContent = text;
  const close = document.createElement("button");
  close.type = "button";
  close.className = "btn-close";
  close.setAttribute("aria-label", "Close");
  close.addEventListener("click", () => alert.remove());
  alert.appendChild(close);
  $("alerts").prepend(alert);
  if (kind !== "danger") setTimeout(() => alert.remove(), 4000); // errors stay until read
  while ($("alerts").children.length > 4) $("alerts").lastElementChild.remove();
}

function clearAlerts() {
  $("alerts").replaceChildren();
}

function explain(error, what) {
  notify(`${what}: ${error.message}`);
}

// ---- Views -----------------------------------------------------------------------------------

function showLogin() {
  $("login-view").classList.remove("d-none");
  $("app-view").classList.add("d-none");
  $("session").classList.add("d-none");
  $("login-user").focus();
}

function showApp() {
  $("login-view").classList.add("d-none");
  $("app-view").classList.remove("d-none");
  $("session").classList.remove("d-none");
  $("current-user").textContent = state.user;
}

function showBalance(account) {
  $("no-account").classList.toggle("d-none", account !== null);
  $("account").classList.toggle("d-none", account === null);
  if (account) $("balance").textContent = money(account.balance);
}

function renderOrder(order) {
  let item = document.querySelector(`[data-order-id="${order.id}"]`);
  if (!item) {
    item = document.createElement("li");
    item.className = "list-group-item d-flex justify-content-between align-items-start gap-2 px-0";
    item.dataset.orderId = order.id;
    item.dataset.testid = "order";
    item.innerHTML =
      '<div class="flex-grow-1"><div class="order-amount fw-semibold"></div>' +
      '<div class="order-id text-muted"></div><div class="small text-muted order-time"></div></div>' +
      '<div class="text-end"><span class="badge" data-testid="status"></span>' +
      '<div class="small text-danger order-reason" data-testid="reason"></div></div>';
  }
  item.querySelector(".order-amount").textContent = money(order.amount);
  item.querySelector(".order-id").textContent = order.id;
  item.querySelector(".order-time").textContent = new Date(order.created_at).toLocaleString();
  const badge = item.querySelector("[data-testid=status]");
  badge.className = `badge ${BADGES[order.status] || "text-bg-secondary"}`;
  badge.textContent = order.status;
  item.dataset.status = order.status;
  item.querySelector(".order-reason").textContent = order.reason ? REASONS[order.reason] || order.reason : "";
  return item;
}

function renderOrders() {
  const sorted = [...state.orders.values()].sort((a, b) =>
    Date.parse(b.created_at) - Date.parse(a.created_at) || (a.id < b.id ? 1 : -1));
  $("orders").replaceChildren(...sorted.map(renderOrder));
  $("no-orders").classList.toggle("d-none", sorted.length > 0);
}

// Applies an order as the server sent it; returns true when its status changed.
function upsertOrder(order) {
  const known = state.orders.get(order.id);
  if (known && Date.parse(known.updated_at) > Date.parse(order.updated_at)) return false;
  state.orders.set(order.id, order);
  return !known || known.status !== order.status;
}

function setLive(text, kind) {
  const badge = $("live-status");
  badge.textContent = text;
  badge.className = `badge text-bg-${kind}`;
}

// ---- Loading ---------------------------------------------------------------------------------

async function loadBalance() {
  try {
    showBalance(await api("GET", "/api/payments/balance", { user_id: state.user }));
  } catch (error) {
    if (error.code === "account_not_found") showBalance(null);
    else explain(error, "Could not load the balance");
  }
}

async function loadOrders() {
  try {
    const body = await api("GET", "/api/orders/orders", { user_id: state.user });
    let settled = false;
    for (const order of body.orders) settled = upsertOrder(order) || settled;
    renderOrders();
    if (settled) await loadBalance();
  } catch (error) {
    explain(error, "Could not load your orders");
  }
}

// ---- Live updates: Server-Sent Events, polling while the stream is down ----------------------

function startPolling() {
  if (state.pollTimer === null) state.pollTimer = setInterval(loadOrders, POLL_MS);
}

function stopPolling() {
  if (state.pollTimer !== null) clearInterval(state.pollTimer);
  state.pollTimer = null;
}

function openStream() {
  closeStream();
  const stream = new EventSource(`/api/orders/events?user_id=${encodeURIComponent(state.user)}`);
  state.stream = stream;
  stream.onopen = () => {
    setLive("live", "success");
    stopPolling();
    loadOrders(); // catch up on whatever changed while the stream was down
  };
  stream.onmessage = (event) => {
    let order;
    try {
      order = JSON.parse(event.data);
    } catch (e) {
      return;
    }
    if (order.user_id !== state.user) return;
    const changed = upsertOrder(order);
    renderOrders();
    if (changed && order.status !== "NEW") loadBalance();
  };
  stream.onerror = () => {
    setLive("polling", "warning");
    startPolling();
    // The browser reconnects by itself unless the stream was closed for good.
    if (stream.readyState === EventSource.CLOSED) {
      setTimeout(() => { if (state.stream === stream) openStream(); }, POLL_MS);
    }
  };
}

function closeStream() {
  if (state.stream) state.stream.close();
  state.stream = null;
  stopPolling();
}

// ---- Actions ---------------------------------------------------------------------------------

function login(user) {
  state.user = user;
  state.orders.clear();
  localStorage.setItem(USER_KEY, user);
  clearAlerts();
  showApp();
  renderOrders();
  setLive("connecting…", "secondary");
  loadBalance();
  loadOrders();
  openStream();
}

function logout() {
  closeStream();
  state.user = null;
  state.orders.clear();
  localStorage.removeItem(USER_KEY);
  clearAlerts();
  showLogin();
}

// Whatever was typed goes to the server, which has the last word and says what is wrong.
function readAmount(input) {
  return input.value.trim();
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
  const user = $("login-user").value.trim();
  if (!USER_ID.test(user)) {
    $("login-user").classList.add("is-invalid");
    $("login-error").textContent = "A user id is 1–64 letters, digits, “-”, “_” or “.”.";
    return;
  }
  $("login-user").classList.remove("is-invalid");
  login(user);
});

$("logout").addEventListener("click", logout);

$("create-account").addEventListener("click", () => busy($("create-account"), async () => {
  try {
    showBalance(await api("POST", "/api/payments/create_account", { user_id: state.user }));
    notify("Account created.", "success");
  } catch (error) {
    explain(error, "Could not create the account");
    await loadBalance();
  }
}));

$("topup-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("topup-submit"), async () => {
    try {
      const account = await api("POST", "/api/payments/add_funds", {
        user_id: state.user, amount: readAmount($("topup-amount")),
      });
      showBalance(account);
      $("topup-amount").value = "";
    } catch (error) {
      explain(error, "Top-up refused");
    }
  });
});

$("order-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("order-submit"), async () => {
    try {
      const order = await api("POST", "/api/orders/create_order", {
        user_id: state.user, amount: readAmount($("order-amount")),
      });
      upsertOrder(order);
      renderOrders();
      $("order-amount").value = "";
    } catch (error) {
      explain(error, "Order refused");
    }
  });
});

const saved = localStorage.getItem(USER_KEY);
if (saved && USER_ID.test(saved)) login(saved);
else showLogin();

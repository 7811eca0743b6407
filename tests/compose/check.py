#!/usr/bin/env python3
"""The compose deployment, run for real (scripts/test-compose runs this after building images).

Drives docker-compose.yml through COMPOSE (a command: `docker compose`, or scripts/compose-podman)
with containers under ENGINE (docker or podman), and checks, each printed as ok/FAILED:
up from nothing; the page, /docs and a paid and a refused order through port 8000; only 8000
published, on loopback; no guest user; quorum queues; the per-role broker users; then, under
a steady load of orders through the gateway, orders and payments killed and started again at
new addresses, then recreated from a changed image (`up -d`), with every call answered in its
normal time and every order placed meanwhile final, balances exact and `gozon audit` passing;
a second `up -d` changes nothing; `down -v` leaves nothing behind.
"""

import json
import os
import random
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

COMPOSE = shlex.split(os.environ["COMPOSE"])
ENGINE = os.environ.get("ENGINE", "podman")
PROJECT = os.environ["COMPOSE_PROJECT_NAME"]
BASE = "http://127.0.0.1:8000"
GOZON = os.environ["GOZON_BIN"]
REBUILD = shlex.split(os.environ["REBUILD_APP_IMAGE"])
# A call through the gateway answers within this, whatever is down behind it (a gateway that
# waits on a dead address answers only after its 5 s connect timeout).
NORMAL = 2.0

passed, failed = [], []


def check(name, ok, detail=""):
    (passed if ok else failed).append(name)
    print(f"{'ok' if ok else 'FAILED'}: {name}{f' ({detail})' if detail else ''}", flush=True)
    return ok


def run(*args, check_rc=True, quiet=False):
    result = subprocess.run(list(args), capture_output=True, text=True)
    if check_rc and result.returncode != 0:
        print(result.stdout, result.stderr, file=sys.stderr)
        raise SystemExit(f"command failed: {' '.join(args)}")
    return result


def compose(*args, **kw):
    return run(*COMPOSE, *args, **kw)


def call(method, path, timeout=10.0):
    """(status, body as JSON or text, seconds); status 0 when nothing answered."""
    request = urllib.request.Request(BASE + path, method=method)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except (urllib.error.URLError, OSError):
        return 0, None, time.monotonic() - started
    took = time.monotonic() - started
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")
    return status, body, took


def wait_final(order_id, within=30.0):
    deadline = time.monotonic() + within
    while True:
        status, body, _ = call("GET", f"/api/orders/order?id={order_id}")
        if status == 200 and body["status"] != "NEW":
            return body
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def container(service):
    return f"{PROJECT}-{service}-1"


def engine_json(*args):
    return json.loads(run(ENGINE, *args).stdout or "[]")


def project_containers():
    return engine_json("ps", "-a", "--format", "json", "--filter", f"label=com.docker.compose.project={PROJECT}")


def address(service):
    return run(ENGINE, "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
               container(service)).stdout.strip()


def wait_healthy(service, within=90.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if run(ENGINE, "exec", container(service), "curl", "-fsS", "http://127.0.0.1:8000/health/ready",
               check_rc=False).returncode == 0:
            return True
        time.sleep(0.5)
    return False


def rabbitmqctl(*args):
    return run(ENGINE, "exec", container("rabbitmq"), "rabbitmqctl", "-q", *args).stdout


class Load(threading.Thread):
    """Orders through the gateway at a steady rate (10/s), with an Idempotency-Key each and
    retried until answered, as a careful client does; every call's status and time kept."""

    def __init__(self, funded, unfunded):
        super().__init__(daemon=True)
        self.funded, self.unfunded = funded, unfunded
        self.stop = threading.Event()
        self.calls = []  # (time, path kind, status, seconds)
        self.placed = []  # (order id, user, amount)

    def run(self):
        self.began = time.monotonic()
        n = 0
        while not self.stop.is_set():
            n += 1
            user = random.choice(self.funded) if n % 5 else random.choice(self.unfunded)
            amount = random.choice(["1", "2.50", "3"])
            key = f"load-{PROJECT}-{n}"
            for attempt in range(100):
                status, body, took = self.post_with_key(user, amount, key)
                self.calls.append((time.monotonic(), "create_order", status, took))
                if status == 201:
                    self.placed.append((body["id"], user, amount))
                    break
                if self.stop.is_set() and attempt > 20:
                    break
                time.sleep(0.2)
            status, _, took = call("GET", f"/api/payments/balance?user_id={random.choice(self.funded)}")
            self.calls.append((time.monotonic(), "balance", status, took))
            time.sleep(0.1)

    @staticmethod
    def post_with_key(user, amount, key):
        request = urllib.request.Request(
            f"{BASE}/api/orders/create_order?user_id={user}&amount={amount}", method="POST",
            headers={"Idempotency-Key": key})
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read()), time.monotonic() - started
        except urllib.error.HTTPError as error:
            return error.code, None, time.monotonic() - started
        except (urllib.error.URLError, OSError):
            return 0, None, time.monotonic() - started


def restart_at_a_new_address(service):
    """Kills the role's container and starts it again while its old address is taken, so it
    comes back elsewhere; returns (old, new, seconds until healthy again)."""
    old = address(service)
    run(ENGINE, "kill", container(service))
    run(ENGINE, "wait", container(service), check_rc=False)
    network = f"{PROJECT}_default"
    holder = f"{PROJECT}-ipholder-{service}"
    # The engine frees a killed container's address when its clean-up has run, a moment after
    # the kill: until then the address is still taken.
    deadline = time.monotonic() + 15
    while True:
        held = run(ENGINE, "run", "-d", "--rm", "--name", holder, "--network", network, "--ip", old,
                   "--entrypoint", "sleep", "debian:bookworm-slim", "600", check_rc=False)
        if held.returncode == 0:
            break
        run(ENGINE, "rm", "-f", "-t", "0", holder, check_rc=False, quiet=True)
        if time.monotonic() > deadline:
            print(held.stdout, held.stderr, file=sys.stderr)
            raise SystemExit(f"{old} was not freed within 15 s of killing {container(service)}")
        time.sleep(0.5)
    time.sleep(3)
    started = time.monotonic()
    run(ENGINE, "start", container(service))
    healthy = wait_healthy(service)
    took = time.monotonic() - started
    new = address(service)
    run(ENGINE, "rm", "-f", "-t", "0", holder, check_rc=False)
    return old, new, took if healthy else None


def main():
    compose("down", "-v", check_rc=False)
    started = time.monotonic()
    compose("up", "-d")
    for service in ("orders", "payments"):
        wait_healthy(service)
    up_took = time.monotonic() - started
    status, _, _ = call("GET", "/")
    deadline = time.monotonic() + 30
    while status != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
        status, _, _ = call("GET", "/")
    check("up from nothing", status == 200, f"{up_took:.0f} s to every role ready")

    status, page, _ = call("GET", "/")
    head, _, _ = call("HEAD", "/app.js")
    check("the page through port 8000", status == 200 and "<title>Gozon" in str(page) and head == 200)
    status, docs, _ = call("GET", "/docs")
    spec_status, spec, _ = call("GET", "/openapi.json")
    check("/docs and /openapi.json through port 8000",
          status == 200 and "swagger" in str(docs).lower() and spec_status == 200
          and "/api/orders/create_order" in spec.get("paths", {}))

    call("POST", "/api/payments/create_account?user_id=ci-paid")
    call("POST", "/api/payments/add_funds?user_id=ci-paid&amount=50")
    _, paid, _ = call("POST", "/api/orders/create_order?user_id=ci-paid&amount=20")
    _, refused, _ = call("POST", "/api/orders/create_order?user_id=ci-paid&amount=100")
    _, stranger, _ = call("POST", "/api/orders/create_order?user_id=ci-nobody&amount=5")
    finals = [wait_final(order["id"]) if isinstance(order, dict) and "id" in order else None
              for order in (paid, refused, stranger)]
    outcome = [(f or {}).get("status") for f in finals] + [(f or {}).get("reason") for f in finals[1:]]
    _, balance, _ = call("GET", "/api/payments/balance?user_id=ci-paid")
    check("a paid and a refused order through port 8000",
          outcome == ["FINISHED", "CANCELLED", "CANCELLED", "insufficient_funds", "no_account"]
          and balance.get("balance") == "30.00", f"{outcome}, balance {balance}")

    published = {c["Names"][0] if isinstance(c["Names"], list) else c["Names"]: c.get("Ports") or []
                 for c in project_containers()}
    ports = [(name, p.get("host_ip"), p.get("host_port")) for name, ps in published.items() for p in ps]
    check("only 8000 is published, on 127.0.0.1", ports == [(container("gateway"), "127.0.0.1", 8000)], f"{ports}")

    users = rabbitmqctl("list_users")
    check("no guest user on the broker", "guest" not in users.split() and "gozon-orders" in users, users.replace("\n", " "))
    queues = [line.split("\t") for line in rabbitmqctl("list_queues", "name", "type").splitlines()]
    gozon_queues = [q for q in queues if q[0].startswith("gozon.")]
    check("the queues are quorum queues", len(gozon_queues) == 4 and all(q[1] == "quorum" for q in gozon_queues),
          f"{gozon_queues}")
    permissions = {line.split("\t")[0]: line.split("\t")[1:] for line in rabbitmqctl("list_permissions").splitlines()}
    wanted = {role: run(GOZON, "broker-permissions", "--context", role).stdout.strip().split("\t")
              for role in ("orders", "payments")}
    check("each role has a broker user with its own rights only",
          all(permissions.get(f"gozon-{role}") == rights for role, rights in wanted.items()), f"{permissions}")

    # Faults under load.
    funded = [f"ci-load-{i}" for i in range(8)]
    for user in funded:
        call("POST", f"/api/payments/create_account?user_id={user}")
        call("POST", f"/api/payments/add_funds?user_id={user}&amount=40")
    load = Load(funded, [f"ci-broke-{i}" for i in range(3)])
    load.start()
    time.sleep(3)
    moves = {}
    phases = []  # (s after the load began, what started then)
    for service in ("payments", "orders"):
        phases.append((round(time.monotonic() - load.began, 1), f"{service} killed"))
        moves[service] = restart_at_a_new_address(service)
        time.sleep(3)
    phases.append((round(time.monotonic() - load.began, 1), "up -d with a changed image"))
    before = {c["Names"][0] if isinstance(c["Names"], list) else c["Names"]: c["Id"] for c in project_containers()}
    run(*REBUILD)
    recreated = compose("up", "-d").stdout
    for service in ("orders", "payments"):
        wait_healthy(service)
    time.sleep(4)
    load.stop.set()
    load.join(timeout=60)
    after = {c["Names"][0] if isinstance(c["Names"], list) else c["Names"]: c["Id"] for c in project_containers()}

    check("orders and payments came back at new addresses",
          all(old != new and took is not None for old, new, took in moves.values()),
          ", ".join(f"{s} {o} -> {n} in {t and round(t, 1)} s" for s, (o, n, t) in moves.items()))
    check("`up -d` with a changed image recreates the roles and keeps the gateway",
          before.get(container("orders")) != after.get(container("orders"))
          and before.get(container("payments")) != after.get(container("payments"))
          and before.get(container("gateway")) == after.get(container("gateway")), recreated.replace("\n", "; "))
    slowest = max(took for _, _, _, took in load.calls)
    unanswered = [c for c in load.calls if c[2] == 0]
    check(f"every call through the gateway answered within {NORMAL:.0f} s while roles restarted",
          slowest < NORMAL and not unanswered,
          f"{len(load.calls)} calls, slowest {slowest:.2f} s, statuses "
          f"{sorted(set(c[2] for c in load.calls))}; slowest three (ended s after the load began, call, "
          f"status, s): {[(round(c[0] - load.began, 1), c[1], c[2], round(c[3], 2)) for c in sorted(load.calls, key=lambda c: -c[3])[:3]]}; {phases}")
    # After the last restart every call succeeds again.
    tail = [c for c in load.calls if c[0] > load.calls[-1][0] - 3]
    check("calls succeed again once the roles are back", tail and all(c[2] in (200, 201) for c in tail),
          f"last 3 s: {sorted(set(c[2] for c in tail))}")
    deadline = time.monotonic() + 60
    finals = [wait_final(order_id, within=max(0.0, deadline - time.monotonic())) for order_id, _, _ in load.placed]
    check("every order placed meanwhile reached a final state",
          load.placed and all(finals), f"{len(load.placed)} orders, {sum(1 for f in finals if not f)} not final")
    minor = lambda text: int(round(float(text) * 100))
    spent = {user: 0 for user in funded}
    for final, (_, user, amount) in zip(finals, load.placed):
        if final and final["status"] == "FINISHED":
            spent[user] += minor(amount)
    exact = True
    for user in funded:
        _, body, _ = call("GET", f"/api/payments/balance?user_id={user}")
        exact &= minor(body["balance"]) == 4000 - spent[user]
    check("balances are exact", exact)
    owner = f"postgres://gozon:{os.environ['POSTGRES_PASSWORD']}@postgres:5432/gozon"
    audit = run(ENGINE, "run", "--rm", "--network", f"{PROJECT}_default", "gozon:local", "audit",
                "--database-url", owner, check_rc=False)
    check("gozon audit passes", audit.returncode == 0, audit.stdout.strip().splitlines()[-1] if audit.stdout else audit.stderr)

    before = {c["Names"][0] if isinstance(c["Names"], list) else c["Names"]: c["Id"] for c in project_containers()}
    again = compose("up", "-d").stdout
    after = {c["Names"][0] if isinstance(c["Names"], list) else c["Names"]: c["Id"] for c in project_containers()}
    check("a second `up -d` changes nothing", before == after, again.replace("\n", "; "))

    compose("down", "-v")
    left = project_containers()
    volumes = run(ENGINE, "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout.split()
    networks = [n for n in run(ENGINE, "network", "ls", "--format", "{{.Name}}").stdout.split() if n.startswith(PROJECT)]
    check("`down -v` leaves nothing behind", not left and not volumes and not networks, f"{left} {volumes} {networks}")

    print(f"compose: {len(passed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

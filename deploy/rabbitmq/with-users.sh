#!/bin/sh
# The compose broker's entrypoint: writes its users and their rights as definitions that the
# node imports at every boot (so the passwords are always the ones in the environment), then
# runs the image's own entrypoint. An administrator (`gozon`, for people: rabbitmqctl, the
# management UI) and one user per role with rights on its own names only
# (gozon::messaging::amqp::permissions; tests/api/deployment.rs keeps them equal): neither role
# can purge or delete the other's queues. No `guest`. Passwords: letters and digits.
set -eu
definitions=/tmp/gozon-definitions.json
umask 077
cat >"$definitions" <<JSON
{
  "users": [
    {"name": "gozon", "password": "${RABBITMQ_PASSWORD}", "tags": "administrator"},
    {"name": "gozon-orders", "password": "${GOZON_ORDERS_AMQP_PASSWORD}", "tags": ""},
    {"name": "gozon-payments", "password": "${GOZON_PAYMENTS_AMQP_PASSWORD}", "tags": ""}
  ],
  "vhosts": [{"name": "/"}],
  "permissions": [
    {"user": "gozon", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"},
    {"user": "gozon-orders", "vhost": "/",
     "configure": "^gozon\\\\.orders\\\\..*\$",
     "write": "^(gozon\\\\.orders\\\\..*|gozon\\\\.payments\\\\.inbound)\$",
     "read": "^gozon\\\\.orders\\\\..*\$"},
    {"user": "gozon-payments", "vhost": "/",
     "configure": "^gozon\\\\.payments\\\\..*\$",
     "write": "^(gozon\\\\.payments\\\\..*|gozon\\\\.orders\\\\.inbound)\$",
     "read": "^gozon\\\\.payments\\\\..*\$"}
  ]
}
JSON
# The node runs as `rabbitmq` once the image's entrypoint has dropped root.
chown rabbitmq "$definitions" 2>/dev/null || true
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="${RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS:-} -rabbit load_definitions \"$definitions\""
exec docker-entrypoint.sh "$@"

#!/bin/bash
# The official rabbitmq image's entrypoint, in short: as root, own the data directory and drop
# to `rabbitmq`; RABBITMQ_DEFAULT_USER/RABBITMQ_DEFAULT_PASS become the node's default user.
set -euo pipefail
if [ "$(id -u)" = 0 ]; then
  mkdir -p /var/lib/rabbitmq /var/log/rabbitmq
  chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
  exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "$0" "$@"
fi
export HOME=/var/lib/rabbitmq
if [ -n "${RABBITMQ_DEFAULT_USER:-}" ] && [ -n "${RABBITMQ_DEFAULT_PASS:-}" ]; then
  conf=$(mktemp -d)
  cp /etc/rabbitmq/conf.d/*.conf "$conf/"
  printf 'default_user = %s\ndefault_pass = %s\n' "$RABBITMQ_DEFAULT_USER" "$RABBITMQ_DEFAULT_PASS" >"$conf/20-default-user.conf"
  export RABBITMQ_CONFIG_FILES=$conf
fi
# The server itself, in the foreground (Debian's wrapper would send its output to a file and not
# pass signals on).
if [ "${1:-}" = rabbitmq-server ]; then
  shift
  exec /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
fi
exec "$@"

#!/bin/bash
# The official nginx image's entrypoint, in short: with NGINX_ENTRYPOINT_LOCAL_RESOLVERS set,
# NGINX_LOCAL_RESOLVERS holds the container's name server (from /etc/resolv.conf: the first
# only, the network's own; podman lists the host's after it, which nginx would ask in turn, and
# they know no service names. Docker lists 127.0.0.11 alone); every
# /etc/nginx/templates/*.template is written, its ${VARIABLES} of the environment filled in, to
# NGINX_ENVSUBST_OUTPUT_DIR (default /etc/nginx/conf.d) without the suffix.
set -euo pipefail
if [ -n "${NGINX_ENTRYPOINT_LOCAL_RESOLVERS:-}" ]; then
  NGINX_LOCAL_RESOLVERS=$(awk '$1=="nameserver" {if ($2 ~ ":") print "[" $2 "]"; else print $2; exit}' /etc/resolv.conf)
  export NGINX_LOCAL_RESOLVERS
fi
output=${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}
defined=$(printf '${%s} ' $(env | cut -d= -f1))
for template in /etc/nginx/templates/*.template; do
  [ -f "$template" ] || continue
  envsubst "$defined" <"$template" >"$output/$(basename "$template" .template)"
done
exec "$@"

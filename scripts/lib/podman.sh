# Sourced: makes podman usable on a machine of this kind (rootful, runc; no systemd, so no
# timers for health checks; no registry, so images are built locally by scripts/images).
# Installs podman, runc and debootstrap from the OS packages when they are missing.
podman_ready() {
  if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
    echo "installing podman, runc and debootstrap (Debian packages)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
  fi
  # The default ulimits need a capability this machine lacks; crun fails on hybrid cgroups.
  local conf=${XDG_RUNTIME_DIR:-/tmp}/gozon-containers.conf
  printf '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n' >"$conf"
  export CONTAINERS_CONF=$conf
}

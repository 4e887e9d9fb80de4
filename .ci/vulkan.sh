#!/usr/bin/env bash
# Installs what ORT's WebGPU provider needs to run on a machine without a GPU: the Vulkan loader
# (libvulkan1) and Mesa's Vulkan drivers, whose llvmpipe (lavapipe) is a software Vulkan device.
# Dawn refuses bookworm's Mesa 22 ("No supported adapters"); Mesa 25 from bookworm-backports
# works. Idempotent (every step checks before it acts); runs as root; output on stderr.
#
#   1. Nothing to do when libvulkan1 and mesa-vulkan-drivers ≥ 25 are installed.
#   2. On bookworm, adds Debian's bookworm-backports suite unless an apt source already names it
#      (/etc/apt/sources.list.d/bookworm-backports.sources, signed by Debian's archive key).
#   3. apt-get update, then installs libvulkan1 and mesa-vulkan-drivers (from backports on bookworm).
#   4. Checks that llvmpipe's driver manifest is where the Vulkan loader looks.
set -euo pipefail

log() { echo "vulkan.sh: $*" >&2; }

installed_version() { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null | awk '$3 == "installed" { print $4 }'; }

mesa_ok() {
  local v
  v=$(installed_version mesa-vulkan-drivers)
  [ -n "$v" ] && [ -n "$(installed_version libvulkan1)" ] && dpkg --compare-versions "$v" ge 25
}

# 1. Already there.
if mesa_ok; then
  log "libvulkan1 $(installed_version libvulkan1) and mesa-vulkan-drivers $(installed_version mesa-vulkan-drivers) already installed"
else
  . /etc/os-release
  target=()
  if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    # 2. The backports suite, unless some source already has it.
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      log "adding bookworm-backports to apt's sources"
      cat >/etc/apt/sources.list.d/bookworm-backports.sources <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    fi
    target=(-t bookworm-backports)
  fi
  # 3. Install (mesa-vulkan-drivers pulls the matching mesa-libgallium from the same suite).
  log "installing libvulkan1 and mesa-vulkan-drivers ${target[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "${target[@]}" libvulkan1 mesa-vulkan-drivers >&2
  if ! mesa_ok; then
    log "mesa-vulkan-drivers $(installed_version mesa-vulkan-drivers) is older than 25: Dawn will find no adapter"
    exit 1
  fi
fi

# 4. The loader finds drivers through their JSON manifests.
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  log "no llvmpipe driver manifest under /usr/share/vulkan/icd.d"
  exit 1
fi
log "Vulkan ready: $(ls /usr/share/vulkan/icd.d | tr '\n' ' ')"

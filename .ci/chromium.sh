#!/usr/bin/env bash
# Installs Debian's Chromium, which the web playground's end-to-end tests drive (playwright-core
# with executablePath /usr/bin/chromium; playwright's own browser downloads are never used).
# Idempotent: nothing to do when the package is installed. Runs as root; output on stderr.
set -euo pipefail

log() { echo "chromium.sh: $*" >&2; }

if dpkg-query -W -f='${Status}\n' chromium 2>/dev/null | grep -q '^install ok installed$' && [ -x /usr/bin/chromium ]; then
  log "chromium $(dpkg-query -W -f='${Version}' chromium) already installed"
  exit 0
fi
log "installing chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq chromium >&2
[ -x /usr/bin/chromium ] || {
  log "no /usr/bin/chromium after the install"
  exit 1
}
log "chromium $(dpkg-query -W -f='${Version}' chromium) installed"

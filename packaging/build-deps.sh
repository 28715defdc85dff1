#!/usr/bin/env bash
# Installs what building, running and testing llmspyd needs on Debian 12.
# Idempotent: a package already installed is not asked for again.
set -euo pipefail
pkgs=(clang llvm libbpf-dev libbpf1 bpftool make python3 python3-venv python3-dev gcc
      ca-certificates curl wget gnutls-bin openssl nodejs golang-go
      systemd systemd-container debootstrap dpkg-dev fakeroot iproute2 util-linux
      bpftrace binutils)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm ships inside some nodejs builds (NodeSource's) and conflicts with Debian's npm package there;
# Debian's own nodejs needs it separately (the agent tests install agents with npm)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if ((${#missing[@]})); then
  [ "$(id -u)" = 0 ] || { echo "build-deps: need root to install: ${missing[*]}" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

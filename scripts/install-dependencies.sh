#!/usr/bin/env bash
# Installs the Debian packages RTVirt builds and tests with. Idempotent; needs root (or sudo).
set -euo pipefail
packages=(libcgroup-dev libnuma-dev cgroup-tools pkg-config rt-tests iproute2 zlib1g-dev)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
run=()
[ "$(id -u)" -eq 0 ] || run=(sudo)
"${run[@]}" apt-get update
DEBIAN_FRONTEND=noninteractive "${run[@]}" apt-get install -y --no-install-recommends "${missing[@]}"

#!/bin/bash
# Set up a Debian 12 host for Hull (as root): system packages, a virtualenv with Hull and
# its test tools in /opt/hull/venv, `hull` on PATH, and /etc/hull/configuration.toml.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=/opt/hull/venv

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-host.sh: run as root (it installs packages)" >&2
    exit 1
fi

packages=(
    qemu-system-x86 busybox-static                        # run VMs; demo and test rootfs
    qemu-system-arm                                       # arm64 guests under TCG (test_arm64.py)
    linux-source-6.1 build-essential flex bison bc        # hull kernel build
    libelf-dev libssl-dev cpio xz-utils zstd kmod
    lz4                                                   # hull image build (lz4 initrd)
    python3 python3-venv python3-dev                      # Hull itself
    runc                                                  # benchmarks compare against it
    containerd                                            # shim v2 tests (private instance)
    containernetworking-plugins iproute2                  # CRI tests: CNI bridge + host-local
    iptables                                              # podman --network bridge -p (CNI portmap)
    podman conmon docker.io                               # client tests (test_clients.py)
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-host.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own Python (3.11): the guest image carries the same version.
if [ ! -x "$venv/bin/python" ]; then
    /usr/bin/python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -e "$repo[test]"
ln -sf "$venv/bin/hull" /usr/local/bin/hull
ln -sf "$venv/bin/containerd-shim-hull-v2" /usr/local/bin/containerd-shim-hull-v2
if [ ! -e /etc/hull/configuration.toml ]; then
    install -D -m 0644 "$repo/src/hull/config/configuration.toml" /etc/hull/configuration.toml
fi
echo "setup-host.sh: hull is $(command -v hull) ($(hull --version | head -n1))"

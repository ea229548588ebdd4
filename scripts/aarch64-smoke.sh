#!/usr/bin/env bash
# Run the real daemon as an aarch64 process under QEMU user-mode emulation on this x86-64
# machine, against the native Mosquitto, and check it end to end (scripts/aarch64_check.py).
# Everything comes from Debian's packages and PyPI: qemu-user-static, an arm64 sysroot
# unpacked from .deb files (not installed: python3:arm64 would conflict with the host's), and
# the project's dependencies as aarch64 wheels.
#
# Skip it for quick local runs with EDGE_AGENT_SKIP_AARCH64=1 (ignored when CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

if [ "${EDGE_AGENT_SKIP_AARCH64:-0}" = "1" ] && [ "${CI:-}" != "true" ]; then
  echo "aarch64 smoke test skipped (EDGE_AGENT_SKIP_AARCH64=1)"
  exit 0
fi

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
HOST_PY=${HOST_PY:-.venv/bin/python}
CACHE=${EDGE_AGENT_AARCH64_CACHE:-.cache/aarch64}
PYVER=3.11   # Debian bookworm's Python = Raspberry Pi OS bookworm's
mkdir -p "$CACHE/debs"

if ! command -v qemu-aarch64-static >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  as_root dpkg --add-architecture arm64
  as_root apt-get update -qq
fi

PACKAGES="python$PYVER-minimal libpython$PYVER-minimal libpython$PYVER-stdlib libc6 libgcc-s1
  libstdc++6 libgomp1 libffi8 libssl3 zlib1g libbz2-1.0 liblzma5 libexpat1 libuuid1 libcrypt1
  libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libnsl2 libtirpc3 libdb5.3 libgssapi-krb5-2
  libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1"
if [ ! -f "$CACHE/sysroot/usr/bin/python$PYVER" ]; then
  echo "== arm64 sysroot from Debian packages"
  (cd "$CACHE/debs" && for p in $PACKAGES; do
     ls "${p}"_*_arm64.deb >/dev/null 2>&1 || apt-get download -q "$p:arm64" 2>/dev/null \
       || { apt-get update -qq && apt-get download -q "$p:arm64"; }
   done)
  rm -rf "$CACHE/sysroot"
  mkdir -p "$CACHE/sysroot"
  for deb in "$CACHE"/debs/*.deb; do dpkg -x "$deb" "$CACHE/sysroot"; done
fi
SYSROOT=$(realpath "$CACHE/sysroot")

echo "== aarch64 wheels for Python $PYVER"
rm -rf "$CACHE/site" "$CACHE/wheel"
"$HOST_PY" -m pip wheel -q --no-deps -w "$CACHE/wheel" . 2>/dev/null
"$HOST_PY" -m pip install -q --target "$CACHE/site" --only-binary=:all: \
  --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
  --platform manylinux_2_28_aarch64 --python-version "$PYVER" --implementation cp \
  "$CACHE"/wheel/*.whl 2>&1 | grep -v "dependency conflicts\|requires torch\|resolver does not" || true
SITE=$(realpath "$CACHE/site")
[ -d "$SITE/onnxruntime" ] || { echo "aarch64 wheels missing (onnxruntime)" >&2; exit 1; }

# onnxruntime reads /proc/cpuinfo at import; QEMU 7.2 shows the host's x86 file and the
# import crashes (SIGSEGV). The emulated process gets an ARM one (a Raspberry Pi 4's),
# bind-mounted in a private mount namespace, so nothing outside it changes.
CPUINFO=$(realpath tests/fixtures/hw/raspberry-pi-4/proc/cpuinfo)
if [ "$(id -u)" -eq 0 ]; then NS="unshare --mount --"; else NS="sudo unshare --mount --"; fi
PYTHON_CMD="$NS sh -c 'mount --bind $CPUINFO /proc/cpuinfo && exec \"\$0\" \"\$@\"' \
qemu-aarch64-static -L $SYSROOT $SYSROOT/usr/bin/python$PYVER"

echo "== the daemon under emulation"
"$HOST_PY" scripts/aarch64_check.py --python "$PYTHON_CMD" \
  --env QEMU_CPU=cortex-a72 --env OPENBLAS_NUM_THREADS=1 --env PYTHONPATH="$SITE" \
  --env PYTHONDONTWRITEBYTECODE=1
echo "aarch64 smoke test: $(( $(date +%s) - started )) s"

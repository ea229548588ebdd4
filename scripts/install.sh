#!/usr/bin/env bash
# Install edge-agent as a systemd service on Debian, Ubuntu, Raspberry Pi OS (64-bit) or
# JetPack. Idempotent: run it again to upgrade; the config is never overwritten.
#
#   sudo scripts/install.sh                       # install from this checkout and start
#   sudo scripts/install.sh --ort-wheel FILE.whl  # Jetson: NVIDIA's onnxruntime-gpu wheel (kept for upgrades)
#   sudo scripts/install.sh --device-id ID        # a new config names the device ID
#   sudo scripts/install.sh --uninstall [--purge] # remove (--purge: config, state, user too)
#
# The device id defaults to the host name, read each time the agent starts: give every
# device its own host name (or --device-id), or two devices kick each other off the broker.
#
# Options for images and tests: --root DIR (install under DIR: no users, no systemctl),
# --no-start (install but do not enable/start), --pip-args "ARGS" (extra pip arguments).
set -euo pipefail

SOURCE=$(cd "$(dirname "$0")/.." && pwd)
ROOT=""
START=1
UNINSTALL=0
PURGE=0
ORT_WHEEL=""
PIP_ARGS=""
DEVICE_ID=""
PYTHON=${PYTHON:-python3}

while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=$(realpath -m "$2"); shift 2 ;;
    --no-start) START=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    --ort-wheel) ORT_WHEEL=$(realpath "$2"); shift 2 ;;
    --pip-args) PIP_ARGS=$2; shift 2 ;;
    --device-id) DEVICE_ID=$2; shift 2 ;;
    # the comment block at the top, without its "# " and without any code
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -n "$DEVICE_ID" ] && ! [[ "$DEVICE_ID" =~ ^[A-Za-z0-9._-]{1,64}$ ]]; then
  echo "install.sh: --device-id must match [A-Za-z0-9._-]{1,64}, got '$DEVICE_ID'" >&2
  exit 2
fi

PREFIX=$ROOT/opt/edge-agent
CONF_DIR=$ROOT/etc/edge-agent
UNIT=$ROOT/etc/systemd/system/edge-agent.service
STATE=$ROOT/var/lib/edge-agent
SERVICE_USER=edge-agent

say() { printf 'edge-agent install: %s\n' "$*"; }
have_systemd() { [ -z "$ROOT" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo), or use --root DIR for a staging install" >&2
  exit 1
fi

if [ "$UNINSTALL" -eq 1 ]; then
  if have_systemd; then
    systemctl disable --now edge-agent 2>/dev/null || true
  fi
  rm -f "$UNIT"
  have_systemd && systemctl daemon-reload
  rm -rf "$PREFIX"
  if [ "$PURGE" -eq 1 ]; then
    rm -rf "$CONF_DIR" "$STATE"
    if [ -z "$ROOT" ] && id "$SERVICE_USER" >/dev/null 2>&1; then
      userdel "$SERVICE_USER" || true
      say "removed, with config, state and the user $SERVICE_USER"
    else
      say "removed, with config and state"  # a staging root never had a user created
    fi
  else
    say "removed (config in $CONF_DIR and state in $STATE kept; --purge removes them)"
  fi
  exit 0
fi

case "$(uname -m)" in
  x86_64|aarch64) ;;
  armv7l|armv6l)
    echo "install.sh: this is a 32-bit ARM system; onnxruntime publishes no 32-bit ARM wheels." \
      "Install a 64-bit OS (Raspberry Pi OS 64-bit)." >&2
    exit 1 ;;
  *) say "warning: untested architecture $(uname -m)" ;;
esac

# A 32-bit userland on a 64-bit kernel (32-bit Raspberry Pi OS on a Pi 4/5) says aarch64
# above; its Python's pointer size tells the truth.
if [ "$("$PYTHON" -c 'import struct; print(struct.calcsize("P") * 8)')" = 32 ]; then
  echo "install.sh: $PYTHON is a 32-bit program (a 32-bit OS on a 64-bit kernel?); onnxruntime" \
    "publishes no 32-bit ARM wheels. Install a 64-bit OS (Raspberry Pi OS 64-bit)." >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "install.sh: edge-agent needs Python >= 3.10 ($PYTHON is $("$PYTHON" -V 2>&1))." \
    "JetPack 5 ships Python 3.8: upgrade to JetPack 6." >&2
  exit 1
fi
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  if [ -z "$ROOT" ] && command -v apt-get >/dev/null; then
    apt-get install -y python3-venv
  else
    echo "install.sh: the Python venv module is missing (apt-get install python3-venv)" >&2
    exit 1
  fi
fi

if [ -z "$ROOT" ] && ! id "$SERVICE_USER" >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/edge-agent --no-create-home \
    --shell /usr/sbin/nologin "$SERVICE_USER"
  say "created user $SERVICE_USER"
fi

if [ ! -x "$PREFIX/bin/python" ]; then
  mkdir -p "$(dirname "$PREFIX")"
  "$PYTHON" -m venv "$PREFIX"
  say "created the venv $PREFIX"
fi
# shellcheck disable=SC2086  # PIP_ARGS is a list of arguments on purpose
"$PREFIX/bin/python" -m pip install --quiet --upgrade pip $PIP_ARGS
# An onnxruntime wheel given once (--ort-wheel: NVIDIA's for Jetson, onnxruntime-openvino,
# ...) is kept in the venv, so an upgrade without the option does not leave the CPU wheel
# from PyPI in its place: pip would install it beside the GPU one, both in one package folder.
ORT_KEPT=$PREFIX/ort-wheel
if [ -n "$ORT_WHEEL" ]; then
  rm -rf "$ORT_KEPT"
  mkdir -p "$ORT_KEPT"
  cp "$ORT_WHEEL" "$ORT_KEPT/"
fi
KEPT_WHEEL=$(find "$ORT_KEPT" -maxdepth 1 -name '*.whl' 2>/dev/null | head -n 1 || true)
# Earlier versions installed the distribution as edge-agent (a name another PyPI project holds):
# the same package folder and command under the old name would be removed with it later.
if "$PREFIX/bin/python" -m pip show --quiet edge-agent >/dev/null 2>&1; then
  "$PREFIX/bin/python" -m pip uninstall --quiet --yes edge-agent
  say "removed the distribution's old name, edge-agent (now edge-agent-onnx)"
fi
# shellcheck disable=SC2086
"$PREFIX/bin/python" -m pip install --quiet --upgrade $PIP_ARGS "$SOURCE"
if [ -n "$KEPT_WHEEL" ]; then
  # the PyPI onnxruntime is CPU-only; this wheel brings the accelerator's providers
  "$PREFIX/bin/python" -m pip uninstall --quiet --yes onnxruntime 2>/dev/null || true
  # shellcheck disable=SC2086
  "$PREFIX/bin/python" -m pip install --quiet --force-reinstall --no-deps $PIP_ARGS "$KEPT_WHEEL"
  say "onnxruntime from $(basename "$KEPT_WHEEL") (kept in $ORT_KEPT for upgrades)"
fi
say "installed $("$PREFIX/bin/python" -c 'import agent; print(agent.__version__)') into $PREFIX"

install -d -m 0755 "$CONF_DIR"
if [ ! -f "$CONF_DIR/agent.yaml" ]; then
  install -m 0640 "$SOURCE/config/agent.example.yaml" "$CONF_DIR/agent.yaml"
  if [ -n "$DEVICE_ID" ]; then
    # the example names no device: turn its commented device_id line into this one
    sed -i "s/^# device_id: [^ ]*/device_id: $DEVICE_ID/" "$CONF_DIR/agent.yaml"
  fi
  [ -z "$ROOT" ] && chgrp "$SERVICE_USER" "$CONF_DIR/agent.yaml"
  say "wrote $CONF_DIR/agent.yaml from the example: edit it, then systemctl reload edge-agent"
else
  say "kept the existing $CONF_DIR/agent.yaml"
fi
if grep -q '^device_id:' "$CONF_DIR/agent.yaml"; then
  say "device id: $(sed -n 's/^device_id: *\([^ #]*\).*/\1/p' "$CONF_DIR/agent.yaml" | head -n 1) (set in agent.yaml)"
else
  HOST=$(hostname 2>/dev/null || cat /proc/sys/kernel/hostname)
  HOST=${HOST%%.*}
  if [ -n "$ROOT" ]; then
    say "device id: the host name of the machine it runs on, read at every start (here: $HOST)"
  else
    say "device id: $HOST (the host name, read at every start; set device_id in agent.yaml to choose another)"
  fi
  case "$HOST" in
    raspberrypi|localhost|ubuntu|debian|jetson|nano|orin|dietpi|armbian|edge|"")
      say "warning: '$HOST' is a stock host name that other devices share; two devices with one" \
        "id kick each other off the broker: sudo hostnamectl set-hostname NAME (or --device-id)" ;;
  esac
fi

install -d -m 0755 "$(dirname "$UNIT")"
install -m 0644 "$SOURCE/systemd/edge-agent.service" "$UNIT"
mkdir -p "$STATE/models" "$STATE/state"
[ -z "$ROOT" ] && chown -R "$SERVICE_USER:$SERVICE_USER" "$STATE"

if have_systemd; then
  systemctl daemon-reload
  if [ "$START" -eq 1 ]; then
    systemctl enable edge-agent
    systemctl restart edge-agent  # picks up a new version on upgrades
    say "running: systemctl status edge-agent; logs: journalctl -u edge-agent -o cat"
  fi
else
  say "systemd is not running here: start it with $PREFIX/bin/edge-agent run --config $CONF_DIR/agent.yaml"
fi
# check-config needs every dependency: an install made with --pip-args --no-deps (images built
# offline, the tests) cannot run it, and must not be told its config is wrong.
if ! "$PREFIX/bin/python" -c 'import agent.cli.main, onnxruntime, paho.mqtt.client, yaml, structlog' \
    2>/dev/null; then
  say "not checking the config: the venv $PREFIX lacks dependencies (installed with --no-deps?)"
elif ! "$PREFIX/bin/edge-agent" check-config "$CONF_DIR/agent.yaml"; then
  say "the config has problems (listed above): edit $CONF_DIR/agent.yaml"
fi

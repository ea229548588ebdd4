#!/bin/sh
# `make test` needs a mosquitto binary: the tests start private brokers on free ports (they
# never use a system service). Install it where this can be done without a password (root,
# or passwordless sudo, as .ci/run does); otherwise name the one command and stop, before
# pytest would fail in every broker fixture.
set -eu

found() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }
found && exit 0

if command -v apt-get >/dev/null 2>&1; then
  install_command="sudo apt-get install mosquitto"
  if [ "$(id -u)" -eq 0 ]; then
    as_root=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root="sudo -n"
  else
    as_root="none"
  fi
  if [ "$as_root" != "none" ]; then
    echo "mosquitto is not installed; the tests need it: installing it with apt-get" >&2
    $as_root apt-get update -qq
    $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto
    found && exit 0
    echo "apt-get installed mosquitto but no mosquitto binary is on PATH or in /usr/sbin" >&2
    exit 1
  fi
elif command -v brew >/dev/null 2>&1; then
  install_command="brew install mosquitto"
elif command -v dnf >/dev/null 2>&1; then
  install_command="sudo dnf install mosquitto"
else
  install_command="install Mosquitto with your system's package manager (https://mosquitto.org/download/)"
fi
echo "mosquitto is not installed, and the tests start private Mosquitto brokers." >&2
echo "Install it, then run make test again:  $install_command" >&2
exit 1

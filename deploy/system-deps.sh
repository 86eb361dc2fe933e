#!/bin/sh
# Installs the system packages nanofleet needs (Debian names), or says exactly how when we are not root.
#   deploy/system-deps.sh [--optional] mosquitto chromium curl sshd systemd-analyze postgresql
# With --optional a missing package is installed when we are root, and otherwise only reported (make run falls back
# to the embedded amqtt broker); without it, a missing package we cannot install stops the caller.
optional=0
if [ "$1" = "--optional" ]; then optional=1; shift; fi
missing=""
for tool in "$@"; do
  case "$tool" in
    mosquitto) command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto mosquitto-clients" ;;
    chromium)  command -v chromium >/dev/null 2>&1 || missing="$missing chromium" ;;
    curl)      command -v curl >/dev/null 2>&1 || missing="$missing curl" ;;
    sshd)      [ -x /usr/sbin/sshd ] || missing="$missing openssh-server" ;;  # the Ansible installer's test target
    postgresql) ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql" ;;  # store tests
    systemd-analyze) command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd" ;;  # unit checks
    *) echo "system-deps: unknown tool $tool" >&2; exit 2 ;;
  esac
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing:$missing"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null \
    || { echo "apt-get install$missing failed" >&2; exit 1; }
  exit 0
fi
if [ "$optional" = "1" ]; then
  echo "note: not installed:$missing (install with: sudo apt-get install -y$missing)"
  exit 0
fi
echo "missing system packages:$missing" >&2
echo "install them with:  sudo apt-get install -y$missing" >&2
exit 1

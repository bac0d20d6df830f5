#!/usr/bin/env bash
# The system tools the tests use, installed from Debian/Ubuntu packages where one is missing. The
# README's test command and .ci/run both call it. It needs apt-get and root (run as root, as CI
# does, or with sudo available); it installs nothing when every tool is already there.
#   prometheus (promtool, prometheus)      the generated rules are checked and a real server scrapes the proxy
#   prometheus-alertmanager (amtool, ...)  its config is checked and a real Alertmanager delivers an alert
#   openssh-server (sshd, ssh-keygen, ...) the 70B tunnel's restricted key and host-key pinning, against a real sshd
#   valgrind                               callgrind counts the relay's instructions (benchmarks only)
set -euo pipefail
missing=()
for tool in promtool prometheus amtool prometheus-alertmanager ssh-keygen ssh-keyscan valgrind; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
[ -x /usr/sbin/sshd ] || missing+=(sshd)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing the system tools the tests use (missing: ${missing[*]})" >&2
if ! command -v apt-get >/dev/null; then
  echo "no apt-get here: install prometheus, prometheus-alertmanager, openssh-server and valgrind yourself" >&2
  exit 1
fi
run_as_root=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "installing them needs root: run as root or install sudo" >&2; exit 1; }
  run_as_root=(sudo)
fi
"${run_as_root[@]}" apt-get update -qq
"${run_as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus prometheus-alertmanager \
  openssh-server valgrind >/dev/null

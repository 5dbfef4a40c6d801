#!/usr/bin/env bash
# Installs what a fresh machine lacks to build, test and demo pbx-operator: Debian packages,
# and the Go-built control plane (cached outside the repo, keyed by version).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

need_apt=()
for tool in curl:curl openssl:openssl python3:python3 kubectl:kubectl; do
  command -v "${tool%%:*}" >/dev/null || need_apt+=("${tool#*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "install-deps: Go is needed to build the control plane" >&2; exit 1; }
command -v cargo >/dev/null || { echo "install-deps: Rust (cargo) is needed" >&2; exit 1; }

# The PBX lab (Kamailio, PostgreSQL, SIPp) installs its own packages.
if [ -x "$here/lab/lab.sh" ]; then "$here/lab/lab.sh" install; fi
# A real SMTP server for the mail tests.
python3 -c "import aiosmtpd" 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore aiosmtpd

start=$(date +%s)
bin=$("$here/controlplane/build.sh")
echo "install-deps: control plane in $bin ($(( $(date +%s) - start ))s)" >&2

#!/usr/bin/env bash
# Installs what a fresh machine lacks to build, test and demo pbx-operator: Debian packages,
# and the Go-built control plane (cached outside the repo, keyed by version).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

need_apt=()
for tool in make:make cc:gcc curl:curl openssl:openssl python3:python3 kubectl:kubectl promtool:prometheus; do
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

# helm, from its Go module like the control plane, with the Kubernetes version it assumes set to
# the one we test against (a plain `go install` would assume 1.20 and refuse the chart).
helm_dir=${PBX_OPERATOR_CACHE:-$HOME/.cache/pbx-operator}/helm/v3.22.0
[ -x "$helm_dir/helm" ] || (cd /tmp && CGO_ENABLED=0 GOBIN="$helm_dir" go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=v3.22.0 -X helm.sh/helm/v3/internal/version.gitTreeState=clean -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=37 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=37" helm.sh/helm/v3/cmd/helm@v3.22.0)

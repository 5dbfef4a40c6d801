#!/usr/bin/env bash
# The demo: a local control plane, the CRDs, the operator, the examples applied, results shown.
#   tests/demo.sh          run it through, show the results, stop everything
#   tests/demo.sh --keep   leave it running (prints how to reach it) until Ctrl-C
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false; [ "${1:-}" = "--keep" ] && keep=true

bash tests/install-deps.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pbx-operator/target}
cargo build --locked --quiet
bin="$CARGO_TARGET_DIR/debug/pbx-operator"

demo=$(mktemp -d -t pbx-demo-XXXXXX)
operator_pid=""
cleanup() {
  [ -n "$operator_pid" ] && kill "$operator_pid" 2>/dev/null && wait "$operator_pid" 2>/dev/null || true
  tests/controlplane/controlplane.sh down --dir "$demo/controlplane"
  echo "demo: stopped; logs are in $demo" >&2
}
trap cleanup EXIT

tests/controlplane/controlplane.sh up --dir "$demo/controlplane"
export KUBECONFIG="$demo/controlplane/admin.kubeconfig"
k() { kubectl "$@" 2> >(grep -v 'version difference between client' >&2); }

echo; echo "== Installing the CRDs: pbx-operator crds | kubectl apply -f -"
"$bin" crds | k apply -f -
k wait --for condition=Established crd --all --timeout=60s >/dev/null

echo; echo "== Starting the operator (log: $demo/operator.log)"
"$bin" run > "$demo/operator.log" 2>&1 &
operator_pid=$!

echo; echo "== Applying examples/"
k create namespace acme >/dev/null
k apply -n acme -f examples/
sleep 3

echo; echo "== kubectl get pbx -n acme"
k get pbx -n acme
echo; echo "== Conditions"
k get pbx -n acme -o jsonpath='{range .items[*]}{.kind}/{.metadata.name}: {range .status.conditions[*]}{.type}={.status} ({.reason}) {end}{"\n"}{end}'

if $keep; then
  echo; echo "demo: running. In another shell: export KUBECONFIG=$KUBECONFIG; kubectl get pbx -A"
  echo "demo: Ctrl-C stops everything."
  wait "$operator_pid"
fi

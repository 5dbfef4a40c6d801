#!/usr/bin/env bash
# The demo: a local control plane, a real PBX (Kamailio on SQLite with SIPp phones), an SMTP
# server, the operator, the examples applied, results shown.
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
operator_pid="" smtp_pid=""
cleanup() {
  [ -n "$operator_pid" ] && kill "$operator_pid" 2>/dev/null && wait "$operator_pid" 2>/dev/null || true
  [ -n "$smtp_pid" ] && kill "$smtp_pid" 2>/dev/null || true
  bash tests/lab/lab.sh down --dir "$demo/lab" >/dev/null 2>&1 || true
  tests/controlplane/controlplane.sh down --dir "$demo/controlplane"
  echo "demo: stopped; logs are in $demo" >&2
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
k() { kubectl "$@" 2> >(grep -v 'version difference between client' >&2); }

say "Starting a Kubernetes control plane (kube-apiserver, etcd, kube-controller-manager)"
tests/controlplane/controlplane.sh up --dir "$demo/controlplane"
export KUBECONFIG="$demo/controlplane/admin.kubeconfig"

say "Starting the PBX: Kamailio on SQLite, 16 users, 8 SIPp phones"
bash tests/lab/lab.sh up --dir "$demo/lab" --db sqlite --users 16 --phones 8
# shellcheck disable=SC1091
. "$demo/lab/lab.env"
python3 -m aiosmtpd -n -l 127.0.0.1:2525 -c aiosmtpd.handlers.Mailbox "$demo/mail" >/dev/null 2>&1 &
smtp_pid=$!

say "Installing the CRDs: pbx-operator crds | kubectl apply -f -"
"$bin" crds | k apply -f -
k wait --for condition=Established crd --all --timeout=60s >/dev/null

say "Starting the operator (log: $demo/operator.log)"
"$bin" run > "$demo/operator.log" 2>&1 &
operator_pid=$!

say "Connecting to the PBX (examples/connection.yaml, Secret filled from the lab)"
k create namespace acme >/dev/null
k apply -n acme -f examples/connection.yaml
k create secret generic acme-pbx -n acme --from-literal=database-url="$LAB_DB_URL" \
  --from-literal=rpc-url="$LAB_RPC_URL" --dry-run=client -o yaml | k apply -f -
k wait -n acme --for condition=Ready pbxconnection/acme --timeout=60s
k get pbxconnection -n acme

sql() { sqlite3 "${LAB_DB_URL#sqlite://}" "$1"; }
say "Before: call and pickup groups of 201 and 202 (straight from Kamailio's tables)"
sql "SELECT username, attribute, value FROM usr_preferences WHERE attribute IN ('pbx.call_group','pbx.pickup_group') AND username IN ('201','202') ORDER BY 1,2"

say "CSV: pbx-operator export users --connection acme/acme, edited (204 gets 201's number, 205 a new caller ID policy), uploaded as ConfigMap q4-numbers"
"$bin" export users --connection acme/acme >"$demo/users.csv"
head -n 6 "$demo/users.csv"
{
  "$bin" export users --template
  echo '204,true,+15550100201,"Berlin, 3rd floor",,,,'
  echo '205,,,,,,Anonymous,'
  echo '206,,,,,,Secret,'
} >"$demo/changes.csv"
k create configmap q4-numbers -n acme --from-file=changes.csv="$demo/changes.csv" --dry-run=client -o yaml | k apply -f -

say "Applying examples/ (the nightly restart window of phonerestart-window.yaml stays Scheduled)"
for f in examples/bulkuserchange-*.yaml examples/bulkphonechange-*.yaml examples/phonerestart-now.yaml examples/userrecycle-*.yaml; do
  k apply -n acme -f "$f"
done
# The example's window is tonight's, whenever the demo runs (a window that passed ends Expired).
tonight=$(date -u -d 'tomorrow 02:00' +%Y-%m-%dT%H:%M:%SZ)
until=$(date -u -d 'tomorrow 03:00' +%Y-%m-%dT%H:%M:%SZ)
sed -e "s/^  notBefore: .*/  notBefore: \"$tonight\"/" -e "s/^  notAfter: .*/  notAfter:  \"$until\"/" \
  examples/phonerestart-window.yaml | k apply -n acme -f -
# Waits until a resource reaches a phase where it stops (done, validated or failed).
settled() {
  for _ in $(seq 1 120); do
    case $(k get -n acme "$1" -o jsonpath='{.status.phase}') in
      Succeeded|Validated|PartiallyFailed|Failed|Expired) return 0 ;;
    esac
    sleep 0.5
  done
}
for r in buc/q4-numbers buc/call-group-201-202 buc/sales-operators buc/support-reset-2fa-unlock buc/engineering-pickup-group \
  bpc/sales-yealink-t54w prs/sales-restart-now urc/leavers-2026-11 urc/new-hire-ana-diaz; do
  settled "$r"
done

say "kubectl get pbx -n acme"
k get pbx -n acme

say "Results of call-group-201-202: pbx-operator results bulkuserchange/call-group-201-202"
"$bin" results bulkuserchange/call-group-201-202 -n acme

say "After: the open callGroup was written, the closed pickupGroup was not"
sql "SELECT username, attribute, value FROM usr_preferences WHERE attribute IN ('pbx.call_group','pbx.pickup_group') AND username IN ('201','202') ORDER BY 1,2"

say "The validated plan of engineering-pickup-group (nothing written yet)"
k get buc engineering-pickup-group -n acme -o jsonpath='{.status.plan}' | python3 -m json.tool
hash=$(k get buc engineering-pickup-group -n acme -o jsonpath='{.status.plan.hash}')

say "Executing exactly that plan: mode Execute, approvedPlanHash $hash"
k patch buc engineering-pickup-group -n acme --type merge -p "{\"spec\":{\"mode\":\"Execute\",\"approvedPlanHash\":\"$hash\"}}"
settled buc/engineering-pickup-group
k get buc -n acme

say "The CSV validated (nothing written): pbx-operator results bulkuserchange/q4-numbers (input + Change OK + Notes)"
"$bin" results bulkuserchange/q4-numbers -n acme
say "Executing the validated CSV rows: mode Execute"
k patch buc q4-numbers -n acme --type merge -p '{"spec":{"mode":"Execute"}}'
for _ in $(seq 1 120); do
  case $(k get -n acme buc/q4-numbers -o jsonpath='{.status.phase}') in
    Succeeded|PartiallyFailed|Failed) break ;;
  esac
  sleep 0.5
done
"$bin" results bulkuserchange/q4-numbers -n acme
sql "SELECT username, alias_username FROM dbaliases WHERE username IN ('201','204') ORDER BY 1"

say "Phones of the sales group restarted: pbx-operator results phonerestart/sales-restart-now"
"$bin" results phonerestart/sales-restart-now -n acme
say "NOTIFYs each lab phone received (exactly one for each registered sales phone)"
bash tests/lab/lab.sh notify-counts --dir "$demo/lab"

say "Recycled extensions: pbx-operator results userrecycle/new-hire-ana-diaz"
"$bin" results userrecycle/new-hire-ana-diaz -n acme || true
sql "SELECT username, attribute, value FROM usr_preferences WHERE username IN ('209','210','211') AND attribute IN ('pbx.status','pbx.first_name','pbx.last_name','pbx.email') ORDER BY 1,2"

say "Audit trail: kubectl get events -n acme"
k get events -n acme --sort-by=.lastTimestamp -o custom-columns=OBJECT:.involvedObject.name,REASON:.reason,MESSAGE:.message | tail -n 20

if $keep; then
  echo; echo "demo: running. In another shell: export KUBECONFIG=$KUBECONFIG; kubectl get pbx -A"
  echo "demo: the PBX database is ${LAB_DB_URL}; mail lands in $demo/mail. Ctrl-C stops everything."
  wait "$operator_pid"
fi

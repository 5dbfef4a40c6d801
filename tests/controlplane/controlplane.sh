#!/usr/bin/env bash
# A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) as plain
# processes on free loopback ports, for the tests and the demo.
#
#   controlplane.sh build                      build the binaries once into the cache; print their dir
#   controlplane.sh up --dir DIR [--owner-pid PID]
#                                              start everything, wait for /readyz, write DIR/env,
#                                              DIR/admin.kubeconfig and DIR/user.kubeconfig
#   controlplane.sh down --dir DIR             stop everything started in DIR (safe to repeat)
#   controlplane.sh stop-apiserver --dir DIR   stop kube-apiserver only; etcd and its data stay
#   controlplane.sh start-apiserver --dir DIR  start it again as `up` did (same port, certs,
#                                              tokens, etcd) and wait for /readyz
#   controlplane.sh restart-apiserver --dir DIR  both
#
# With --owner-pid, a watchdog stops the control plane as soon as that process is gone, so a test
# run that fails, panics or is killed never leaves servers behind.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

log() { echo "controlplane: $*" >&2; }

# N distinct free loopback ports: all held open until every one is chosen.
free_ports() {
  python3 -c 'import socket,sys
socks=[socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

wait_for() { # url timeout_s [curl args...]
  local url=$1 timeout=$2; shift 2
  local deadline=$(( $(date +%s) + timeout ))
  until curl -fsS --max-time 2 "$@" "$url" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then return 1; fi
    sleep 0.2
  done
}

stop_dir() {
  local dir=$1
  [ -d "$dir" ] || return 0
  local pids=()
  for name in watchdog kube-controller-manager kube-apiserver etcd; do
    local pidfile="$dir/$name.pid"
    [ -f "$pidfile" ] || continue
    local pid; pid=$(cat "$pidfile")
    rm -f "$pidfile"
    # The watchdog runs `down` itself (bash execs the last command, so it has the same pid).
    [ "$pid" = "$$" ] && continue
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  for _ in $(seq 1 50); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  # Keep the logs for a post-mortem; the etcd data is large and worthless after a run.
  rm -rf "$dir/etcd"
}

kubeconfig() { # file server ca user token
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: pbx-test
  cluster:
    server: $2
    certificate-authority: $3
users:
- name: $4
  user:
    token: $5
contexts:
- name: $4@pbx-test
  context:
    cluster: pbx-test
    user: $4
    namespace: default
current-context: $4@pbx-test
KC
  chmod 600 "$1"
}

cmd_up() {
  local dir="" owner=""
  while [ $# -gt 0 ]; do
    case $1 in
      --dir) dir=$2; shift 2 ;;
      --owner-pid) owner=$2; shift 2 ;;
      *) log "unknown argument $1"; exit 2 ;;
    esac
  done
  [ -n "$dir" ] || { log "up needs --dir"; exit 2; }
  mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  local bin; bin=$("$here/build.sh")
  local start_ns; start_ns=$(date +%s%N)
  trap 'log "start failed; logs are in '"$dir"'"; stop_dir "'"$dir"'"' ERR

  # Certificates: a CA, a serving cert for 127.0.0.1, and the service-account signing key.
  local pki="$dir/pki"; mkdir -p "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=pbx-test-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$pki/san.ext"
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 2 -extfile "$pki/san.ext" -out "$pki/apiserver.crt" 2>/dev/null
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null

  # Two identities: an admin (system:masters bypasses RBAC) and an ordinary user who
  # can do nothing until a Role grants it, to test permissions for real.
  local admin_token user_token
  admin_token=$(openssl rand -hex 24); user_token=$(openssl rand -hex 24)
  printf '%s,admin,admin-uid,system:masters\n%s,alice,alice-uid,pbx-users\n' \
    "$admin_token" "$user_token" > "$pki/tokens.csv"

  local etcd_port etcd_peer api_port
  # Three distinct ports from one call: separate calls may be handed the same port again.
  read -r etcd_port etcd_peer api_port < <(free_ports 3)
  local etcd_url="http://127.0.0.1:$etcd_port"

  "$bin/etcd" --name pbx-test --data-dir "$dir/etcd" \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "pbx-test=http://127.0.0.1:$etcd_peer" \
    --unsafe-no-fsync --quota-backend-bytes=4294967296 --log-level=warn \
    > "$dir/etcd.log" 2>&1 &
  echo $! > "$dir/etcd.pid"
  wait_for "$etcd_url/health" 30 || { log "etcd did not become healthy; see $dir/etcd.log"; false; }

  # The command line is kept so stop-apiserver / start-apiserver can restart it on the same
  # port, certificates and etcd (outage drills).
  local api_cmd=("$bin/kube-apiserver" \
    --etcd-servers "$etcd_url" --bind-address 127.0.0.1 --secure-port "$api_port" \
    --advertise-address 127.0.0.1 \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" --token-auth-file "$pki/tokens.csv" \
    --authorization-mode RBAC \
    --service-cluster-ip-range 10.96.0.0/24 \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --enable-priority-and-fairness=false \
    --disable-admission-plugins ServiceAccount \
    --allow-privileged=true --v=1)
  printf '%q ' "${api_cmd[@]}" > "$dir/kube-apiserver.cmdline"
  "${api_cmd[@]}" > "$dir/kube-apiserver.log" 2>&1 &
  echo $! > "$dir/kube-apiserver.pid"
  local server="https://127.0.0.1:$api_port"
  wait_for "$server/readyz" 90 --cacert "$pki/ca.crt" -H "Authorization: Bearer $admin_token" \
    || { log "kube-apiserver did not become ready; see $dir/kube-apiserver.log"; false; }

  kubeconfig "$dir/admin.kubeconfig" "$server" "$pki/ca.crt" admin "$admin_token"
  kubeconfig "$dir/user.kubeconfig" "$server" "$pki/ca.crt" alice "$user_token"

  # The controller manager runs CronJob, Job, namespace and garbage-collector controllers.
  "$bin/kube-controller-manager" \
    --kubeconfig "$dir/admin.kubeconfig" --authentication-kubeconfig "$dir/admin.kubeconfig" \
    --authorization-kubeconfig "$dir/admin.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --controllers '*,-bootstrapsigner,-tokencleaner,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller' \
    --v=1 > "$dir/kube-controller-manager.log" 2>&1 &
  echo $! > "$dir/kube-controller-manager.pid"

  cat > "$dir/env" <<ENV
KUBECONFIG=$dir/admin.kubeconfig
PBX_TEST_ADMIN_KUBECONFIG=$dir/admin.kubeconfig
PBX_TEST_USER_KUBECONFIG=$dir/user.kubeconfig
PBX_TEST_USER_NAME=alice
PBX_TEST_API_SERVER=$server
ENV
  trap - ERR

  if [ -n "$owner" ]; then
    # setsid: the watchdog must outlive the shell that started it and not share its signals.
    setsid bash -c 'while kill -0 '"$owner"' 2>/dev/null; do sleep 1; done; "'"$here"'/controlplane.sh" down --dir "'"$dir"'"' \
      > /dev/null 2>&1 < /dev/null &
    echo $! > "$dir/watchdog.pid"
  fi
  local ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
  log "ready at $server in ${ms} ms (admin: $dir/admin.kubeconfig, unprivileged: $dir/user.kubeconfig)"
  echo "$ms" > "$dir/ready-ms"
}

# Stops kube-apiserver alone (etcd, its data and the controller manager keep running).
cmd_stop_apiserver() {
  local dir=$1 pidfile="$1/kube-apiserver.pid"
  [ -f "$pidfile" ] || { log "no kube-apiserver running in $dir"; exit 1; }
  local pid; pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null || true
  # It stops listening at once, then may linger on its etcd clients for many seconds.
  for _ in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  rm -f "$pidfile"
  log "kube-apiserver stopped (pid $pid)"
}

# Starts kube-apiserver again with the command line `up` used (same port, certificates, tokens
# and etcd), and waits until it is ready.
cmd_start_apiserver() {
  local dir=$1
  [ -f "$dir/kube-apiserver.cmdline" ] || { log "$dir was not started by up"; exit 1; }
  [ -f "$dir/kube-apiserver.pid" ] && kill -0 "$(cat "$dir/kube-apiserver.pid")" 2>/dev/null \
    && { log "kube-apiserver is already running in $dir"; exit 1; }
  local start_ns; start_ns=$(date +%s%N)
  bash -c "exec $(cat "$dir/kube-apiserver.cmdline")" >> "$dir/kube-apiserver.log" 2>&1 < /dev/null &
  echo $! > "$dir/kube-apiserver.pid"
  local server token
  server=$(sed -n 's/^PBX_TEST_API_SERVER=//p' "$dir/env")
  token=$(head -n1 "$dir/pki/tokens.csv" | cut -d, -f1)
  wait_for "$server/readyz" 90 --cacert "$dir/pki/ca.crt" -H "Authorization: Bearer $token" \
    || { log "kube-apiserver did not become ready again; see $dir/kube-apiserver.log"; exit 1; }
  log "kube-apiserver ready again at $server in $(( ($(date +%s%N) - start_ns) / 1000000 )) ms"
}

dir_arg() { # the DIR of "--dir DIR", or exit
  [ "${1:-}" = "--dir" ] && [ -n "${2:-}" ] || { log "$3 needs --dir DIR"; exit 2; }
  cd "$2" && pwd
}

case ${1:-} in
  build) "$here/build.sh" ;;
  stop-apiserver) d=$(dir_arg "${2:-}" "${3:-}" "$1"); cmd_stop_apiserver "$d" ;;
  start-apiserver) d=$(dir_arg "${2:-}" "${3:-}" "$1"); cmd_start_apiserver "$d" ;;
  restart-apiserver)
    d=$(dir_arg "${2:-}" "${3:-}" "$1"); cmd_stop_apiserver "$d"; cmd_start_apiserver "$d" ;;
  up) shift; cmd_up "$@" ;;
  down)
    shift; [ "${1:-}" = "--dir" ] && [ -n "${2:-}" ] || { log "down needs --dir DIR"; exit 2; }
    stop_dir "$2" ;;
  *) echo "usage: $0 build | up --dir DIR [--owner-pid PID] | down --dir DIR | stop-apiserver|start-apiserver|restart-apiserver --dir DIR" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# pbx-operator PBX test lab: a real Kamailio 5.6 (tests/lab/kamailio.cfg) on
# PostgreSQL, MySQL (MariaDB) or SQLite, seeded with users and phones, and SIPp processes that
# behave like registered desk phones (answer NOTIFY, reboot, re-register).
# Everything of one lab lives in one directory; several labs can run at once.
#
#   lab.sh install                      apt packages (idempotent)
#   lab.sh up --dir DIR --db sqlite|postgres|mysql --users N --phones M
#             [--silent K] [--no-reboot K] [--domain D] [--boot-ms MS]
#             [--fr-timer MS] [--rate R] [--no-nat] [--silent-spread]
#   lab.sh notify-counts --dir DIR      "<ext> <NOTIFYs received>" per phone
#   lab.sh notify-times --dir DIR       "<unix time> <ext> <call-id>" per NOTIFY, by time
#   lab.sh notify --dir DIR --ext E [--event EV]   NAT-aware tm.t_uac_wait NOTIFY
#   lab.sh rpc --dir DIR METHOD [ARG...] JSON-RPC call, string params
#   lab.sh sip-register --dir DIR --ext E [--expires S] [--password P]
#                                       one REGISTER, prints the final code
#   lab.sh phone-move --dir DIR --ext E [--drop-old]
#                                       E's SIPp started again on a new port; prints it
#   lab.sh db-stop|db-start --dir DIR   stop / start the lab's PostgreSQL or MariaDB (outage drills)
#   lab.sh down --dir DIR               stop everything (safe to repeat)
#
# See README.md next to this file.
set -euo pipefail

LAB_HOME=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PACKAGES=(kamailio kamailio-postgres-modules kamailio-sqlite-modules kamailio-mysql-modules
	kamailio-json-modules kamailio-utils-modules postgresql mariadb-server sip-tester
	sqlite3 curl jq perl iproute2 util-linux)
# Kamailio table schemas; `standard` first (it creates `version`).
KAM_SCHEMAS=(standard auth_db avpops group alias_db usrloc)
PORT_MIN=20000 # below the Linux ephemeral range (32768-60999)
PORT_SPAN=12000
FIRST_EXT=200
# mariadbd settings of a throw-away lab (also given to mariadb-install-db): small files, no
# fsync, no binary log; utf8mb4 so any text the operator writes fits.
MYSQLD_OPTS=(--skip-name-resolve --skip-log-bin --innodb-buffer-pool-size=32M
	--innodb-log-file-size=8M --innodb-data-file-path=ibdata1:12M:autoextend
	--innodb-flush-method=nosync --innodb-doublewrite=0 --innodb-flush-log-at-trx-commit=0
	--character-set-server=utf8mb4 --max-connections=200)

die() { echo "lab: $*" >&2; exit 1; }
log() { echo "lab: $*" >&2; }
now() { date +%s.%N; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

# ---------------------------------------------------------------- install --

cmd_install() {
	local missing=() p
	for p in "${PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ "$(id -u)" -eq 0 ] || die "installing ${missing[*]} needs root"
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y -q "${missing[@]}" >/dev/null; then
		apt-get update -q >/dev/null
		apt-get install -y -q "${missing[@]}" >/dev/null
	fi
}

# ------------------------------------------------------------------ utils --

abs_dir() { mkdir -p "$1" && (cd "$1" && pwd); }

check_dir_name() {
	[[ "$1" =~ ^[A-Za-z0-9/._+-]+$ ]] || die "DIR may only contain [A-Za-z0-9/._+-]: $1"
}

randhex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

pg_bindir() {
	local d
	d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
	[ -n "$d" ] || die "PostgreSQL server binaries not found (lab.sh install)"
	echo "$d"
}

# Run as the postgres OS user when we are root (initdb refuses root).
as_pg() {
	if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# alive PID: running (a zombie waiting to be reaped does not count)
alive() {
	[ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null &&
		! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}
# ours PID NAME: PID is alive and is a NAME process (a pid file that outlived
# a reboot must not make us signal some other program).
ours() { alive "$1" && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]; }

# Ports in use right now (any state, TCP and UDP).
ports_in_use() { ss -Htuan 2>/dev/null | awk '{n=split($5,a,":"); print a[n]}' | sort -un; }

PICKED=" "
# pick_port VAR [N]: set VAR to a port p with p..p+N-1 all free now and not
# handed out before by this script (kept in PICKED, so no subshells here).
pick_port() {
	local var=$1 n=${2:-1} used p i ok tries=0
	used=" $(ports_in_use | tr '\n' ' ') "
	while :; do
		tries=$((tries + 1))
		[ $tries -lt 500 ] || die "no free port found"
		p=$((PORT_MIN + (RANDOM * 32768 + RANDOM) % PORT_SPAN))
		ok=1
		for ((i = 0; i < n; i++)); do
			case "$used$PICKED" in *" $((p + i)) "*) ok=0 ;; esac
		done
		[ $ok -eq 1 ] || continue
		for ((i = 0; i < n; i++)); do PICKED+="$((p + i)) "; done
		printf -v "$var" '%s' "$p"
		return 0
	done
}

# Read DIR/lab.env into the environment (for commands other than up).
load_env() {
	[ -f "$DIR/lab.env" ] || die "$DIR/lab.env not found (is the lab up?)"
	set -a
	# shellcheck disable=SC1091
	. "$DIR/lab.env"
	set +a
}

rpc_raw() { # rpc_raw URL JSON
	curl -sS --max-time "${RPC_TIMEOUT:-60}" -H 'Content-Type: application/json' -d "$2" "$1"
}

rpc_call() { # rpc_call URL METHOD [string params...]
	local url=$1 m=$2
	shift 2
	rpc_raw "$url" "$(jq -cn --arg m "$m" '{jsonrpc:"2.0",id:1,method:$m,params:$ARGS.positional}' --args "$@")"
}

registered_count() { # number of contacts in ul.dump
	rpc_call "$1" ul.dump 2>/dev/null |
		jq '[.result.Domains[]?.Domain.AoRs[]?.Info.Contacts | length] | add // 0' 2>/dev/null || echo -1
}

# ------------------------------------------------------------------- down --

stop_pid() { # stop_pid NAME PID [GROUP]
	local name=$1 pid=$2 group=${3:-} i
	alive "$pid" || return 0
	if [ -n "$group" ]; then kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
	else kill -TERM "$pid" 2>/dev/null || true; fi
	for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
	if alive "$pid"; then
		log "$name ($pid) did not stop, killing"
		if [ -n "$group" ]; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
		kill -KILL "$pid" 2>/dev/null || true
	fi
}

do_down() {
	local f pid stopped=0
	[ -d "$DIR/run" ] || return 0
	for f in "$DIR"/run/sipp-*.pid; do
		[ -f "$f" ] || continue
		pid=$(cat "$f")
		if ours "$pid" sipp; then stop_pid sipp "$pid"; stopped=$((stopped + 1)); fi
		rm -f "$f"
	done
	if [ -f "$DIR/run/kamailio.pid" ]; then
		pid=$(cat "$DIR/run/kamailio.pid")
		# kamailio runs in its own process group (setsid): stop the group so
		# no worker outlives the main process.
		if ours "$pid" kamailio; then
			stop_pid kamailio "$pid" group
			kill -KILL -- "-$pid" 2>/dev/null || true
			stopped=$((stopped + 1))
		fi
		rm -f "$DIR/run/kamailio.pid"
	fi
	if [ -f "$DIR/run/mysql.pid" ]; then
		pid=$(cat "$DIR/run/mysql.pid")
		if ours "$pid" mariadbd; then stop_pid mariadbd "$pid"; stopped=$((stopped + 1)); fi
		rm -f "$DIR/run/mysql.pid"
	fi
	if [ -f "$DIR/run/pg.pwfile" ]; then rm -f "$(cat "$DIR/run/pg.pwfile")" "$DIR/run/pg.pwfile"; fi
	if [ -f "$DIR/run/pg.datadir" ]; then
		local data
		data=$(cat "$DIR/run/pg.datadir")
		if [ -f "$data/postmaster.pid" ]; then
			pid=$(head -1 "$data/postmaster.pid")
			if ours "$pid" postgres; then
				as_pg "$(pg_bindir)/pg_ctl" -D "$data" -m fast -w -t 30 stop >/dev/null 2>&1 ||
					stop_pid postgres "$pid"
				stopped=$((stopped + 1))
			fi
		fi
		# a data directory outside DIR (DIR not reachable by the postgres
		# user) is removed with the lab
		if [ -f "$DIR/run/pg.external" ]; then rm -rf "$data"; rm -f "$DIR/run/pg.external" "$DIR/pgdata"; fi
		rm -f "$DIR/run/pg.datadir"
	fi
	echo "$stopped"
}

cmd_down() {
	local n
	n=$(do_down)
	log "down: stopped $n process(es) in $DIR"
}

# -------------------------------------------------------------------- up --

# Seed SQL (same for PostgreSQL and SQLite) and DIR/phones.csv.
gen_seed() { # gen_seed USERS PHONES SILENT NOREBOOT DOMAIN PASSWORD NAT
	perl - "$@" "$FIRST_EXT" "$DIR/phones.csv" <<'PERL'
use strict; use warnings;
use Digest::MD5 qw(md5_hex);
my ($users, $phones, $silent, $noreboot, $dom, $pw, $nat, $first, $csv) = @ARGV;
my @first = qw(Ana Ben Chloe David Emma Farid Grace Hugo Ines Jonas Kira Liam Mia Noah Olga Pavel Quinn Rosa Sven Tara);
my @last  = qw(Diaz Becker Chen Dubois Evans Fischer Garcia Haddad Ito Jansen Kowalski Lopez Muller Novak Olsen Petrov Quist Rossi Schmidt Tanaka);
my @groups = qw(sales support engineering);
my @loc = ('Berlin', 'London', 'New York');
# vendor, model, MAC prefix (OUI), User-Agent
my @vendors = (
  ['Yealink',     'SIP-T46S', '805ec0', 'Yealink SIP-T46S 66.86.0.15'],
  ['Poly',        'VVX 450',  '64167f', 'PolycomVVX-VVX_450-UA/6.4.3.5018'],
  ['Snom',        'D785',     '000413', 'snomD785/10.1.169.16'],
  ['Grandstream', 'GRP2614',  '000b82', 'Grandstream GRP2614 1.0.5.68'],
  ['Cisco',       'CP-8841',  '0c1167', 'Cisco/CP-8841-3PCC-11.3.7'],
);
sub sqlq { my $s = shift; $s =~ s/'/''/g; "'$s'" }
# rows per table, written as multi-row INSERTs (fast in both databases)
my (%rows, @tables);
sub row { my ($t, $v) = @_; push @tables, $t unless $rows{$t}; push @{$rows{$t}}, $v; }
for my $i (0 .. $users - 1) {
  my $u = $first + $i;
  my $fn = $first[$i % 20];
  my $ln = $last[int($i / 20) % 20];
  my $email = lc("$fn.$ln") . ($i >= 400 ? ".$u" : '') . "\@$dom";
  my $role = $i == 0 ? 'Admin' : ($i % 10 == 5 ? 'Operator' : 'User');
  my $status = $i % 11 == 10 ? 'PasswordRequired' : ($i % 7 == 6 ? 'SetupRequired' : 'Active');
  my $grp = $groups[$i % 3];
  my $has_number = ($i % 5 != 4);
  my %a = (
    first_name => $fn, last_name => $ln, email => $email, role => $role,
    call_group => 1 + $i % 2, pickup_group => 1 + int($i / 2) % 2, locked => '0', status => $status,
    caller_id_policy => ($i % 9 == 8 ? 'Anonymous' : 'Default'),
    voice_route_policy => ($grp eq 'sales' ? 'International' : 'Domestic'),
    enterprise_voice => ($has_number ? 'true' : 'false'),
  );
  if ($has_number) { $a{primary_number_location} = $loc[$i % 3]; }
  if ($i % 4 == 3) {
    $a{private_number} = sprintf('+1555020%04d', $u);
    $a{private_number_location} = $loc[($i + 1) % 3];
  }
  row('subscriber (username, domain, password, ha1, ha1b)', sprintf("(%s, %s, '', %s, %s)",
    sqlq($u), sqlq($dom), sqlq(md5_hex("$u:$dom:$pw")), sqlq(md5_hex("$u\@$dom:$dom:$pw"))));
  for my $k (sort keys %a) {
    row('usr_preferences (username, domain, attribute, type, value)', sprintf("(%s, %s, %s, 2, %s)",
      sqlq($u), sqlq($dom), sqlq("pbx.$k"), sqlq($a{$k})));
  }
  row('grp (username, domain, grp)', sprintf("(%s, %s, %s)", sqlq($u), sqlq($dom), sqlq($grp)));
  # some engineers are in sales too (overlapping selections)
  row('grp (username, domain, grp)', sprintf("(%s, %s, 'sales')", sqlq($u), sqlq($dom))) if $i % 6 == 5;
  row('dbaliases (alias_username, alias_domain, username, domain)', sprintf("(%s, %s, %s, %s)",
    sqlq(sprintf('+1555010%04d', $u)), sqlq($dom), sqlq($u), sqlq($dom))) if $has_number;
}
# the policy catalogue: what a CSV may name (Reception and Internal are in it but unused)
for my $p (['callerId', 'Default'], ['callerId', 'Anonymous'], ['callerId', 'Reception'],
           ['voiceRoute', 'Domestic'], ['voiceRoute', 'International'], ['voiceRoute', 'Internal']) {
  row('pbx_policy (kind, name, domain)', sprintf("(%s, %s, %s)", sqlq($p->[0]), sqlq($p->[1]), sqlq($dom)));
}
open(my $c, '>', $csv) or die "$csv: $!";
print $c "extension,vendor,model,mac,behaviour,nat,user_agent\n";
my $total = $phones + $silent + $noreboot;
for my $j (0 .. $total - 1) {
  my $u = $first + $j;
  my $v = $vendors[$j % @vendors];
  my $beh = $j < $phones ? 'reboot' : ($j < $phones + $silent ? 'silent' : 'noreboot');
  # --silent-spread: the silent phones evenly among the rebooting ones, not after them.
  if ($ENV{LAB_SILENT_SPREAD} && $silent > 0 && $j < $phones + $silent) {
    my $step = int(($phones + $silent) / $silent);
    $beh = ($j % $step == $step - 1 && int($j / $step) < $silent) ? 'silent' : 'reboot';
  }
  my $mac = sprintf('%s%06x', $v->[2], $j + 1);
  my $isnat = ($nat && $v->[0] eq 'Grandstream') ? 1 : 0;
  row('pbx_phone (mac, vendor, model, owner_username, domain, label)', sprintf("(%s, %s, %s, %s, %s, %s)",
    sqlq($mac), sqlq($v->[0]), sqlq($v->[1]), sqlq($u), sqlq($dom), sqlq("Desk $u")));
  print $c join(',', $u, $v->[0], $v->[1], $mac, $beh, $isnat, $v->[3]), "\n";
}
close $c;
print "BEGIN;\n";
for my $t (@tables) {
  my $r = $rows{$t};
  for (my $k = 0; $k < @$r; $k += 500) {
    my $e = $k + 499 < $#$r ? $k + 499 : $#$r;
    print "INSERT INTO $t VALUES\n", join(",\n", @$r[$k .. $e]), ";\n";
  }
}
print "COMMIT;\n";
PERL
}

setup_sqlite() {
	local db=$DIR/kamailio.db s
	rm -f "$db" "$db-wal" "$db-shm"
	{
		for s in "${KAM_SCHEMAS[@]}"; do cat "/usr/share/kamailio/db_sqlite/$s-create.sql"; done
		cat "$LAB_HOME/../../src/pbx/kamailio/migrations/sqlite.sql"
	} | sqlite3 -bail "$db"
	# WAL: readers (the operator) do not block Kamailio's writers. The mode is
	# stored in the file, so every later connection uses it.
	sqlite3 "$db" 'PRAGMA journal_mode=WAL;' >/dev/null
	sqlite3 -bail "$db" <"$DIR/seed.sql"
	sqlite3 "$db" 'ANALYZE;' >/dev/null
	DB_URL="sqlite://$db"
}

setup_postgres() {
	local bindir data superpw s
	bindir=$(pg_bindir)
	pick_port PG_PORT
	data=$DIR/pgdata
	rm -rf "$data"
	mkdir -p "$data"
	if [ "$(id -u)" -eq 0 ]; then
		chown postgres: "$data"
		chmod 700 "$data"
		if ! runuser -u postgres -- test -w "$data"; then
			# DIR is not reachable by the postgres user (e.g. a 0700 temp
			# dir): keep the cluster in its own temp dir, removed by down.
			rm -rf "$data"
			data=$(mktemp -d "${TMPDIR:-/tmp}/pbx-lab-pg.XXXXXX")
			chown postgres: "$data"
			ln -sfn "$data" "$DIR/pgdata"
			touch "$DIR/run/pg.external"
		fi
	fi
	echo "$data" >"$DIR/run/pg.datadir"
	superpw=$(randhex 12)
	PG_PASSWORD=$(randhex 12)
	local pwfile
	pwfile=$(mktemp "${TMPDIR:-/tmp}/pbx-lab-pgpw.XXXXXX")
	echo "$pwfile" >"$DIR/run/pg.pwfile" # removed by down if we die before rm
	echo "$superpw" >"$pwfile"
	[ "$(id -u)" -eq 0 ] && chown postgres: "$pwfile"
	as_pg "$bindir/initdb" -D "$data" -U postgres --pwfile="$pwfile" --auth=scram-sha-256 --no-sync \
		-E UTF8 --locale=C.UTF-8 >"$DIR/logs/initdb.log" 2>&1 ||
		{ rm -f "$pwfile"; die "initdb failed, see $DIR/logs/initdb.log"; }
	rm -f "$pwfile" "$DIR/run/pg.pwfile"
	cat >>"$data/postgresql.conf" <<EOF

# pbx-operator lab
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = ''
max_connections = 200
# a throw-away lab: durability is not needed, speed is
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
	printf 'host all all 127.0.0.1/32 scram-sha-256\n' >"$data/pg_hba.conf"
	# the server log stays in the data directory: only postgres can write there
	as_pg "$bindir/pg_ctl" -D "$data" -l "$data/postgres.log" -w -t 60 start 9>&- >/dev/null ||
		die "postgres did not start, see $data/postgres.log"
	ln -sfn "$data/postgres.log" "$DIR/logs/postgres.log"
	local psql=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT")
	PGPASSWORD=$superpw "${psql[@]}" -U postgres -d postgres >/dev/null <<EOF
CREATE ROLE kamailio LOGIN PASSWORD '$PG_PASSWORD';
CREATE DATABASE kamailio OWNER kamailio;
EOF
	{
		for s in "${KAM_SCHEMAS[@]}"; do cat "/usr/share/kamailio/postgres/$s-create.sql"; done
		cat "$LAB_HOME/../../src/pbx/kamailio/migrations/postgres.sql"
		cat "$DIR/seed.sql"
		# A long-lived PBX database has planner statistics; a freshly seeded one must get them,
		# or the first bulk statements are planned as if the tables were empty.
		echo "ANALYZE;"
	} | PGPASSWORD=$PG_PASSWORD "${psql[@]}" -U kamailio -d kamailio >/dev/null
	DB_URL="postgres://kamailio:$PG_PASSWORD@127.0.0.1:$PG_PORT/kamailio"
	PG_ADMIN_URL="postgres://postgres:$superpw@127.0.0.1:$PG_PORT/postgres"
}

# mariadbd as a plain process of this lab (not the system service): own datadir, socket and
# port on 127.0.0.1. Its settings are in DIR/run/mysql.* so db-start can start it again.
start_mysqld() {
	local sock i pid
	sock=$(cat "$DIR/run/mysql.socket")
	setsid mariadbd --no-defaults --user="$(id -un)" --datadir="$(cat "$DIR/run/mysql.datadir")" \
		--socket="$sock" --port="$(cat "$DIR/run/mysql.port")" --bind-address=127.0.0.1 \
		--pid-file="$DIR/run/mysqld.pid" --log-error="$DIR/logs/mysql.log" \
		"${MYSQLD_OPTS[@]}" </dev/null >>"$DIR/logs/mysql.log" 2>&1 9>&- &
	pid=$!
	echo "$pid" >"$DIR/run/mysql.pid"
	for ((i = 0; i < 300; i++)); do
		alive "$pid" || { tail -20 "$DIR/logs/mysql.log" >&2; die "mariadbd exited, see $DIR/logs/mysql.log"; }
		mariadb-admin --no-defaults --socket="$sock" -u root ping >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	die "mariadbd did not answer, see $DIR/logs/mysql.log"
}

# The schema a MariaDB lab starts with: Kamailio's tables and the operator's own.
mysql_schema() {
	local s
	for s in "${KAM_SCHEMAS[@]}"; do cat "/usr/share/kamailio/mysql/$s-create.sql"; done
	cat "$LAB_HOME/../../src/pbx/kamailio/migrations/mysql.sql"
}

# A MariaDB data directory holding database `kamailio` with that schema and nothing else, made
# once per machine (per MariaDB version, schema and settings) under a lock and copied into each
# lab: mariadb-install-db and the DDL take seconds, a copy some 0.1 s. Prints its path.
mysql_template() {
	local key cache dir tmp sock pid i
	key=$({ mariadbd --version; mysql_schema; printf '%s\n' "${MYSQLD_OPTS[@]}"; } | md5sum | cut -c1-16)
	cache=${XDG_CACHE_HOME:-$HOME/.cache}/pbx-operator/lab
	dir=$cache/mariadb-$key
	[ -d "$dir" ] && { echo "$dir"; return 0; }
	mkdir -p "$cache"
	exec 8>"$cache/.mariadb.lock"
	flock 8
	if [ ! -d "$dir" ]; then
		tmp=$(mktemp -d "$cache/.mariadb-XXXXXX")
		sock=$(mktemp -u "${TMPDIR:-/tmp}/pbx-lab-my.XXXXXX.sock")
		mariadb-install-db --no-defaults --user="$(id -un)" --datadir="$tmp/data" --skip-test-db \
			--auth-root-authentication-method=normal "${MYSQLD_OPTS[@]}" >"$tmp/install.log" 2>&1 ||
			{ cat "$tmp/install.log" >&2; rm -rf "$tmp"; die "mariadb-install-db failed"; }
		mariadbd --no-defaults --user="$(id -un)" --datadir="$tmp/data" --socket="$sock" \
			--skip-networking --log-error="$tmp/mysql.log" "${MYSQLD_OPTS[@]}" </dev/null >/dev/null 2>&1 8>&- 9>&- &
		pid=$!
		for ((i = 0; i < 300; i++)); do
			mariadb-admin --no-defaults --socket="$sock" -u root ping >/dev/null 2>&1 && break
			alive "$pid" || break
			sleep 0.1
		done
		{ echo "CREATE DATABASE kamailio; USE kamailio;"; mysql_schema; } |
			mariadb --no-defaults --socket="$sock" -u root ||
			{ kill "$pid"; cat "$tmp/mysql.log" >&2; rm -rf "$tmp"; die "could not build the MariaDB template"; }
		mariadb-admin --no-defaults --socket="$sock" -u root shutdown
		for ((i = 0; i < 300; i++)); do alive "$pid" || break; sleep 0.1; done
		mv "$tmp/data" "$dir"
		rm -rf "$tmp"
	fi
	flock -u 8
	exec 8>&-
	echo "$dir"
}

setup_mysql() {
	local data=$DIR/mysql sock=$DIR/run/mysqld.sock rootpw
	pick_port MYSQL_PORT
	# a Unix socket path has at most 107 bytes
	[ ${#sock} -le 100 ] || sock=$(mktemp -u "${TMPDIR:-/tmp}/pbx-lab-my.XXXXXX.sock")
	rm -rf "$data"
	cp -a "$MYSQL_TEMPLATE" "$data"
	echo "$data" >"$DIR/run/mysql.datadir"
	echo "$sock" >"$DIR/run/mysql.socket"
	echo "$MYSQL_PORT" >"$DIR/run/mysql.port"
	start_mysqld
	MYSQL_PASSWORD=$(randhex 12)
	rootpw=$(randhex 12)
	# root@localhost (the socket, no password) sets up; tests get password logins over TCP.
	{
		cat <<SQL
CREATE USER 'kamailio'@'%' IDENTIFIED BY '$MYSQL_PASSWORD';
GRANT ALL ON kamailio.* TO 'kamailio'@'%';
CREATE OR REPLACE USER 'root'@'127.0.0.1' IDENTIFIED BY '$rootpw';
GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
USE kamailio;
SQL
		cat "$DIR/seed.sql"
	} | mariadb --no-defaults --socket="$sock" -u root
	DB_URL="mysql://kamailio:$MYSQL_PASSWORD@127.0.0.1:$MYSQL_PORT/kamailio"
	DB_ADMIN_URL="mysql://root:$rootpw@127.0.0.1:$MYSQL_PORT/mysql"
}

start_kamailio() {
	local -a defs=(-A "DBURL=\"$DB_URL\"" -A "SIP_ADDR=127.0.0.1" -A "SIP_PORT=$SIP_PORT"
		-A "RPC_ADDR=127.0.0.1" -A "RPC_PORT=$RPC_PORT" -A "FR_TIMER=$FR_TIMER")
	# SQLite in Kamailio 5.6 has no busy timeout: two Kamailio processes
	# writing `location` at once fail with "database is locked" (REGISTER
	# answered 500). One SIP worker serialises the writes.
	[ "$DB" = sqlite ] && defs+=(-A WITH_SQLITE -A UDP_CHILDREN=1)
	[ "$DB" = mysql ] && defs+=(-A WITH_MYSQL)
	# -DD: the main process stays in the foreground (its pid is ours);
	# setsid: its own process group, so down can stop every worker.
	setsid kamailio -f "$LAB_HOME/kamailio.cfg" "${defs[@]}" -Y "$DIR/run" \
		-P "$DIR/run/kamailio.main.pid" -m 128 -M 32 -DD -E \
		</dev/null >"$DIR/logs/kamailio.log" 2>&1 9>&- &
	echo $! >"$DIR/run/kamailio.pid"
}

wait_kamailio() {
	local pid i
	pid=$(cat "$DIR/run/kamailio.pid")
	for ((i = 0; i < 100; i++)); do
		alive "$pid" || { tail -20 "$DIR/logs/kamailio.log" >&2; die "kamailio exited, see $DIR/logs/kamailio.log"; }
		if rpc_call "$RPC_URL" core.version 2>/dev/null | grep -q '"result"'; then return 0; fi
		sleep 0.1
	done
	die "kamailio JSON-RPC did not answer on $RPC_URL"
}

# One SIPp per (vendor, behaviour) group: register.xml for the phones of the
# group (-inf), notify_<behaviour>.xml for every NOTIFY (out-of-call).
start_sipp_groups() {
	local groups g vendor beh
	groups=$(tail -n +2 "$DIR/phones.csv" | awk -F, '{print $2"-"$5}' | sort -u)
	for g in $groups; do
		vendor=${g%-*}
		beh=${g##*-}
		{
			echo SEQUENTIAL
			tail -n +2 "$DIR/phones.csv" | awk -F, -v v="$vendor" -v b="$beh" '$2==v && $5==b {print $1}'
		} >"$DIR/sipp/$g.csv"
		start_sipp_group "$g" "$g"
	done
}

# start_sipp_group GROUP NAME: the SIPp of GROUP's phones ($DIR/sipp/GROUP.csv) on fresh ports,
# logging to $DIR/sipp/NAME.{log,err,out}; sets SIPP_PORT to its SIP port. Under the ports lock.
start_sipp_group() {
	local g=$1 name=$2 vendor beh n port cp mp ua nat chost out pid
	vendor=${g%-*}
	beh=${g##*-}
	n=$(($(wc -l <"$DIR/sipp/$g.csv") - 1))
	# awk reads the file itself: behind `tail |`, its early exit could kill tail with
	# SIGPIPE, which pipefail turns into a failed `up` (seen with 200 phones).
	ua=$(awk -F, -v v="$vendor" 'NR > 1 && $2 == v {print $7; exit}' "$DIR/phones.csv")
	nat=$(awk -F, -v v="$vendor" 'NR > 1 && $2 == v {print $6; exit}' "$DIR/phones.csv")
	pick_port port
	pick_port cp
	pick_port mp 4
	# A NATed phone advertises a private address it cannot be reached
	# at; only the source address Kamailio saw (Received) reaches it.
	if [ "$nat" = 1 ]; then chost=192.168.77.10:5060; else chost=127.0.0.1:$port; fi
	# -bg: sipp forks, prints the pid of the running copy and returns.
	(cd "$DIR/sipp" && setsid sipp -sf "$LAB_HOME/sipp/register.xml" \
		-oocsf "$LAB_HOME/sipp/notify_$beh.xml" -inf "$DIR/sipp/$g.csv" \
		-i 127.0.0.1 -p "$port" -cp "$cp" -mp "$mp" -m "$n" -l "$n" -r "$RATE" -d "$BOOT_MS" \
		-key domain "$DOMAIN" -key chost "$chost" -key ua "$ua" -key pw "$PHONE_PASSWORD" \
		-key expires 3600 -trace_logs -log_file "$DIR/sipp/$name.log" \
		-trace_err -error_file "$DIR/sipp/$name.err" -bg "127.0.0.1:$SIP_PORT" \
		9>&- </dev/null >"$DIR/sipp/$name.out" 2>&1) || true
	out=$(cat "$DIR/sipp/$name.out")
	pid=$(sed -n 's/.*PID=\[\([0-9]*\)\].*/\1/p' <<<"$out")
	[ -n "$pid" ] || die "sipp for $g did not start: $out"
	echo "$pid" >"$DIR/run/sipp-$g.pid"
	echo "$g $port $pid $n" >>"$DIR/run/sipp.groups"
	SIPP_PORT=$port
}

wait_registered() {
	local want=$1 got=0 i f limit
	limit=$((600 + want * 2)) # tenths of a second
	for ((i = 0; i < limit; i++)); do
		got=$(registered_count "$RPC_URL")
		[ "$got" -ge "$want" ] && return 0
		for f in "$DIR"/run/sipp-*.pid; do
			alive "$(cat "$f")" || die "$(basename "$f" .pid) exited; see $DIR/sipp/*.err"
		done
		sleep 0.1
	done
	die "only $got of $want phones registered; see $DIR/sipp/*.err and $DIR/logs/kamailio.log"
}

cmd_up() {
	local users="" phones=0 silent=0 noreboot=0 t0 total
	DB="" DOMAIN=pbx.test BOOT_MS=1500 FR_TIMER=5000 RATE=50 NAT=1
	while [ $# -gt 0 ]; do
		case "$1" in
		--dir) DIR=$2; shift 2 ;;
		--db) DB=$2; shift 2 ;;
		--users) users=$2; shift 2 ;;
		--phones) phones=$2; shift 2 ;;
		--silent) silent=$2; shift 2 ;;
		--no-reboot) noreboot=$2; shift 2 ;;
		--domain) DOMAIN=$2; shift 2 ;;
		--boot-ms) BOOT_MS=$2; shift 2 ;;
		--fr-timer) FR_TIMER=$2; shift 2 ;;
		--rate) RATE=$2; shift 2 ;;
		--no-nat) NAT=0; shift ;;
		--silent-spread) export LAB_SILENT_SPREAD=1; shift ;;
		*) die "up: unknown option $1" ;;
		esac
	done
	[ -n "${DIR:-}" ] || die "up: --dir is required"
	case "$DB" in sqlite | postgres | mysql) ;; *) die "up: --db sqlite|postgres|mysql is required" ;; esac
	for v in "$phones" "$silent" "$noreboot" "$BOOT_MS" "$FR_TIMER" "$RATE" ${users:+"$users"}; do
		[[ "$v" =~ ^[0-9]+$ ]] || die "up: not a number: $v"
	done
	[[ "$DOMAIN" =~ ^[A-Za-z0-9.-]+$ ]] || die "up: bad domain $DOMAIN"
	total=$((phones + silent + noreboot))
	users=${users:-$total}
	[ "$users" -ge "$total" ] || die "up: --users ($users) must be at least the number of phones ($total)"
	check_dir_name "$DIR"
	DIR=$(abs_dir "$DIR")
	check_dir_name "$DIR"
	for c in kamailio sipp sqlite3 curl jq perl ss setsid flock; do
		command -v "$c" >/dev/null || die "$c not found: run lab.sh install"
	done
	if [ -f "$DIR/run/kamailio.pid" ] && ours "$(cat "$DIR/run/kamailio.pid")" kamailio; then
		die "a lab is already up in $DIR (lab.sh down --dir $DIR)"
	fi
	do_down >/dev/null # leftovers of an earlier, failed run

	t0=$(now)
	rm -rf "$DIR/run" "$DIR/sipp" "$DIR/logs" "$DIR/lab.env"
	mkdir -p "$DIR/run" "$DIR/sipp" "$DIR/logs"
	# From here on, a failure stops whatever was started.
	trap 'rc=$?; if [ $rc -ne 0 ]; then log "up failed, cleaning up"; do_down >/dev/null; fi' EXIT
	trap 'exit 130' INT TERM

	PHONE_PASSWORD=$(randhex 8)
	gen_seed "$users" "$phones" "$silent" "$noreboot" "$DOMAIN" "$PHONE_PASSWORD" "$NAT" >"$DIR/seed.sql"

	if [ "$DB" = mysql ]; then
		command -v mariadbd >/dev/null && command -v mariadb-install-db >/dev/null ||
			die "MariaDB server not found (lab.sh install)"
		MYSQL_TEMPLATE=$(mysql_template) || die "could not prepare the MariaDB template"
	fi

	# Ports are chosen and bound under one machine-wide lock, so labs
	# starting at the same moment do not pick the same ones.
	exec 9>/tmp/pbx-lab-ports.lock
	flock 9
	PG_PORT="" PG_PASSWORD="" PG_ADMIN_URL="" MYSQL_PORT="" DB_ADMIN_URL=""
	case "$DB" in
	postgres) setup_postgres; DB_ADMIN_URL=$PG_ADMIN_URL ;;
	mysql) setup_mysql ;;
	*) setup_sqlite ;;
	esac
	pick_port SIP_PORT
	pick_port RPC_PORT
	RPC_URL="http://127.0.0.1:$RPC_PORT/RPC"
	start_kamailio
	wait_kamailio
	[ "$total" -gt 0 ] && start_sipp_groups
	flock -u 9
	exec 9>&-

	wait_registered "$total"

	list() { tail -n +2 "$DIR/phones.csv" | awk -F, -v b="$1" '($5==b || b=="") {print $1}' | paste -sd, -; }
	local t1 secs
	t1=$(now)
	secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')
	cat >"$DIR/lab.env" <<EOF
LAB_DIR=$DIR
LAB_DB=$DB
LAB_DB_URL=$DB_URL
LAB_PG_PORT=$PG_PORT
LAB_PG_ADMIN_URL=$PG_ADMIN_URL
LAB_MYSQL_PORT=$MYSQL_PORT
LAB_DB_ADMIN_URL=$DB_ADMIN_URL
LAB_RPC_URL=$RPC_URL
LAB_RPC_PORT=$RPC_PORT
LAB_DOMAIN=$DOMAIN
LAB_SIP_ADDR=127.0.0.1
LAB_SIP_PORT=$SIP_PORT
LAB_SIP_SOCKET=udp:127.0.0.1:$SIP_PORT
LAB_FR_TIMER_MS=$FR_TIMER
LAB_BOOT_MS=$BOOT_MS
LAB_PHONE_PASSWORD=$PHONE_PASSWORD
LAB_USERS=$users
LAB_FIRST_EXTENSION=$FIRST_EXT
LAB_LAST_EXTENSION=$((FIRST_EXT + users - 1))
LAB_PHONES_ALL=$(list "")
LAB_PHONES_REBOOT=$(list reboot)
LAB_PHONES_SILENT=$(list silent)
LAB_PHONES_NO_REBOOT=$(list noreboot)
LAB_PHONES_NAT=$(tail -n +2 "$DIR/phones.csv" | awk -F, '$6==1 {print $1}' | paste -sd, -)
LAB_PHONES_CSV=$DIR/phones.csv
LAB_KAMAILIO_LOG=$DIR/logs/kamailio.log
LAB_UP_SECONDS=$secs
EOF
	trap - EXIT
	log "up: $DB, $users users, $total phones registered ($phones reboot, $silent silent, $noreboot no-reboot) in ${secs}s"
	log "up: env in $DIR/lab.env (RPC $RPC_URL, SIP udp:127.0.0.1:$SIP_PORT)"
}

# ---------------------------------------------------------- notify-counts --

# Distinct NOTIFY transactions (Call-IDs) each phone saw; UDP retransmissions
# of one NOTIFY count once.
cmd_notify_counts() {
	[ -f "$DIR/phones.csv" ] || die "$DIR/phones.csv not found"
	{
		tail -n +2 "$DIR/phones.csv" | awk -F, '{print "P", $1}'
		cat "$DIR"/sipp/*.log 2>/dev/null | awk '$2=="NOTIFY" {print "N", $3, $4}'
	} | awk '$1=="P" {order[++n]=$2; c[$2]=0; next}
		$1=="N" && !seen[$2" "$3]++ {c[$2]++}
		END {for (i=1;i<=n;i++) print order[i], c[order[i]]}'
}

# When each NOTIFY reached its phone, by the phones' wall clock (SIPp's [timestamp], the last
# field of a NOTIFY log line): one line per NOTIFY transaction, earliest first.
cmd_notify_times() {
	cat "$DIR"/sipp/*.log 2>/dev/null | awk '$2=="NOTIFY" && !seen[$3" "$4]++ {print $NF, $3, $4}' | sort -n
}

# ----------------------------------------------------------------- notify --

# The call the operator makes: look the phone up, send to its Received
# address (NAT) from the socket it registered on, wait for the final reply.
cmd_notify() {
	local ext="" event="check-sync;reboot=true" c addr recv sock hop hdrs
	while [ $# -gt 0 ]; do
		case "$1" in
		--ext) ext=$2; shift 2 ;;
		--event) event=$2; shift 2 ;;
		*) die "notify: unknown option $1" ;;
		esac
	done
	[ -n "$ext" ] || die "notify: --ext is required"
	load_env
	c=$(rpc_call "$LAB_RPC_URL" ul.lookup location "$ext@$LAB_DOMAIN")
	addr=$(jq -r '.result.Contacts[0].Contact.Address // empty' <<<"$c")
	[ -n "$addr" ] || die "notify: $ext@$LAB_DOMAIN is not registered: $c"
	recv=$(jq -r '.result.Contacts[0].Contact.Received' <<<"$c")
	sock=$(jq -r '.result.Contacts[0].Contact.Socket' <<<"$c")
	hop=.
	[ "$recv" != "[not set]" ] && [ -n "$recv" ] && hop=$recv
	hdrs="From: <sip:provisioning@$LAB_DOMAIN>"$'\r\n'"To: <sip:$ext@$LAB_DOMAIN>"$'\r\n'
	hdrs+="Event: $event"$'\r\n'"Subscription-State: terminated"$'\r\n'"Contact: <sip:provisioning@!!>"$'\r\n'
	rpc_call "$LAB_RPC_URL" tm.t_uac_wait NOTIFY "$addr" "$hop" "$sock" "$hdrs"
	echo
}

# ------------------------------------------------------------- phone-move --

# A phone that moves: the SIPp of EXT's group (its vendor and behaviour) is stopped and started
# again on new ports with the same credentials, logging to DIR/sipp/<group>.moved<N>.log; waits
# until EXT's binding shows the new port and prints it. A NATed phone keeps its Contact (the
# binding is updated: new Received and Call-ID); another phone's Contact names its port, so it
# gets a second binding beside the stale one (unless --drop-old: ul.rm first, as a phone that
# unregisters before it moves).
cmd_phone_move() {
	local ext="" drop=0 g k pid i c e
	while [ $# -gt 0 ]; do
		case "$1" in
		--ext) ext=$2; shift 2 ;;
		--drop-old) drop=1; shift ;;
		*) die "phone-move: unknown option $1" ;;
		esac
	done
	[ -n "$ext" ] || die "phone-move: --ext is required"
	load_env
	g=$(awk -F, -v e="$ext" 'NR > 1 && $1 == e {print $2"-"$5}' "$DIR/phones.csv")
	[ -n "$g" ] || die "phone-move: $ext is not a lab phone"
	pid=$(cat "$DIR/run/sipp-$g.pid" 2>/dev/null || true)
	if ours "$pid" sipp; then stop_pid sipp "$pid"; fi
	if [ $drop -eq 1 ]; then
		for e in $(tail -n +2 "$DIR/sipp/$g.csv"); do
			rpc_call "$LAB_RPC_URL" ul.rm location "$e@$LAB_DOMAIN" >/dev/null
		done
	fi
	DOMAIN=$LAB_DOMAIN BOOT_MS=$LAB_BOOT_MS PHONE_PASSWORD=$LAB_PHONE_PASSWORD
	SIP_PORT=$LAB_SIP_PORT RATE=50
	k=$(find "$DIR/sipp" -name "$g.moved*.log" | wc -l)
	exec 9>/tmp/pbx-lab-ports.lock
	flock 9
	PICKED=" $(awk '{print $2}' "$DIR/run/sipp.groups" | tr '\n' ' ')"
	start_sipp_group "$g" "$g.moved$((k + 1))"
	flock -u 9
	for ((i = 0; i < 100; i++)); do
		c=$(rpc_call "$LAB_RPC_URL" ul.lookup location "$ext@$LAB_DOMAIN" 2>/dev/null || true)
		if jq -e --arg p ":$SIPP_PORT" \
			'[.result.Contacts[]?.Contact | (.Received // ""), (.Address // "") | select(endswith($p))] | length > 0' \
			<<<"$c" >/dev/null 2>&1; then
			echo "$SIPP_PORT"
			return 0
		fi
		sleep 0.1
	done
	die "phone-move: $ext did not register from port $SIPP_PORT; see $DIR/sipp/$g.moved$((k + 1)).err"
}

cmd_rpc() {
	[ $# -ge 1 ] || die "rpc: METHOD required"
	load_env
	rpc_call "$LAB_RPC_URL" "$@"
	echo
}

# ----------------------------------------------------------- sip-register --

cmd_sip_register() {
	local ext="" expires=0 pw="" port cp mp csv out code rc=0
	while [ $# -gt 0 ]; do
		case "$1" in
		--ext) ext=$2; shift 2 ;;
		--expires) expires=$2; shift 2 ;;
		--password) pw=$2; shift 2 ;;
		*) die "sip-register: unknown option $1" ;;
		esac
	done
	[ -n "$ext" ] || die "sip-register: --ext is required"
	load_env
	pw=${pw:-$LAB_PHONE_PASSWORD}
	mkdir -p "$DIR/probe"
	csv=$DIR/probe/$ext.csv
	printf 'SEQUENTIAL\n%s;%s\n' "$ext" "$pw" >"$csv"
	exec 9>/tmp/pbx-lab-ports.lock
	flock 9
	pick_port port
	pick_port cp
	pick_port mp 4
	rm -f "$DIR/probe/$ext.log"
	sipp -sf "$LAB_HOME/sipp/register_once.xml" -inf "$csv" -i 127.0.0.1 -p "$port" -cp "$cp" -mp "$mp" \
		-m 1 -timeout 15s -timeout_error -key domain "$LAB_DOMAIN" -key chost "127.0.0.1:$port" \
		-key ua "pbx-lab-probe" -key expires "$expires" -trace_logs -log_file "$DIR/probe/$ext.log" \
		-trace_err -error_file "$DIR/probe/$ext.err" -nostdin "127.0.0.1:$LAB_SIP_PORT" \
		9>&- >/dev/null 2>&1 </dev/null || rc=$?
	flock -u 9
	code=$(awk '$2=="RESULT" {print $4}' "$DIR/probe/$ext.log" 2>/dev/null | tail -1)
	if [ -n "$code" ]; then echo "$code"; else
		echo "failed (sipp rc $rc, see $DIR/probe/$ext.err)"
		return 1
	fi
}

# -------------------------------------------------------- db-stop/start --

# Outage drills: stop and start the lab's PostgreSQL or MariaDB, keeping its data.
cmd_db() { # cmd_db stop|start
	if [ -f "$DIR/run/mysql.datadir" ]; then
		local pid
		pid=$(cat "$DIR/run/mysql.pid" 2>/dev/null || true)
		case "$1" in
		stop) if ours "$pid" mariadbd; then stop_pid mariadbd "$pid"; fi ;;
		start) ours "$pid" mariadbd || start_mysqld ;;
		esac
		log "db-$1: done"
		return 0
	fi
	[ -f "$DIR/run/pg.datadir" ] || die "db-$1: this lab has no database server of its own"
	local data
	data=$(cat "$DIR/run/pg.datadir")
	case "$1" in
	stop) as_pg "$(pg_bindir)/pg_ctl" -D "$data" -m fast -w -t 30 stop >/dev/null ;;
	start) as_pg "$(pg_bindir)/pg_ctl" -D "$data" -l "$data/postgres.log" -w -t 60 start 9>&- >/dev/null ;;
	esac
	log "db-$1: done"
}

# ------------------------------------------------------------------- main --

main() {
	local cmd=${1:-}
	[ -n "$cmd" ] || { usage; exit 2; }
	shift
	case "$cmd" in
	install) cmd_install ;;
	up) cmd_up "$@" ;;
	-h | --help | help) usage ;;
	down | notify-counts | notify-times | notify | rpc | sip-register | phone-move | db-stop | db-start)
		DIR=""
		local rest=()
		while [ $# -gt 0 ]; do
			if [ "$1" = --dir ]; then DIR=$2; shift 2; else rest+=("$1"); shift; fi
		done
		[ -n "$DIR" ] || die "$cmd: --dir is required"
		[ -d "$DIR" ] || { [ "$cmd" = down ] && { log "down: $DIR does not exist"; return 0; }; die "no such directory: $DIR"; }
		DIR=$(cd "$DIR" && pwd)
		case "$cmd" in
		down) cmd_down ;;
		notify-counts) cmd_notify_counts ;;
		notify-times) cmd_notify_times ;;
		notify) cmd_notify "${rest[@]}" ;;
		rpc) cmd_rpc "${rest[@]}" ;;
		sip-register) cmd_sip_register "${rest[@]}" ;;
		phone-move) cmd_phone_move "${rest[@]}" ;;
		db-stop) cmd_db stop ;;
		db-start) cmd_db start ;;
		esac
		;;
	*) usage; exit 2 ;;
	esac
}

main "$@"

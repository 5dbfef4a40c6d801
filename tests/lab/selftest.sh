#!/usr/bin/env bash
# Checks a whole lab end to end with plain curl: up, registrations with vendor
# User-Agents, NOTIFY -> 200 -> new Call-ID, NAT phone via Received, silent
# phone -> 408, no-reboot phone keeps its binding, notify-counts, locked user
# -> 403, ul.rm, down leaves no process. Prints what it saw; exits 1 on the
# first mismatch (after taking the lab down).
#
#   tests/lab/selftest.sh sqlite|postgres|mysql [DIR]
set -euo pipefail

LAB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lab.sh
DB=${1:?usage: selftest.sh sqlite|postgres|mysql [DIR]}
D=${2:-/tmp/pbx-lab-selftest-$DB}

fail() { echo "FAIL: $*" >&2; "$LAB" down --dir "$D" >/dev/null 2>&1 || true; exit 1; }
ok() { echo "ok: $*"; }

"$LAB" up --dir "$D" --db "$DB" --users 10 --phones 5 --silent 1 --no-reboot 1
# shellcheck disable=SC1091
. "$D/lab.env"
rpc() { curl -sS -d "$1" "$LAB_RPC_URL"; }
lookup() { rpc '{"jsonrpc":"2.0","method":"ul.lookup","params":["location","'"$1@$LAB_DOMAIN"'"],"id":1}'; }
field() { lookup "$1" | jq -r ".result.Contacts[0].Contact[\"$2\"]"; }
notify() { # notify EXT -> result code (NAT-aware next hop and socket)
	local a r s hop
	a=$(field "$1" Address) r=$(field "$1" Received) s=$(field "$1" Socket)
	hop=.
	[ "$r" != "[not set]" ] && hop=$r
	rpc "$(jq -cn --arg a "$a" --arg h "$hop" --arg s "$s" \
		--arg hd "From: <sip:provisioning@$LAB_DOMAIN>"$'\r\n'"To: <sip:$1@$LAB_DOMAIN>"$'\r\n'"Event: check-sync;reboot=true"$'\r\n'"Subscription-State: terminated"$'\r\n'"Contact: <sip:provisioning@!!>"$'\r\n' \
		'{jsonrpc:"2.0",id:1,method:"tm.t_uac_wait",params:["NOTIFY",$a,$h,$s,$hd]}')" | jq -r '.result[0]'
}
sql() {
	case "$LAB_DB" in
	sqlite) sqlite3 "${LAB_DB_URL#sqlite://}" "$1" ;;
	mysql) # mysql://kamailio:PASS@127.0.0.1:PORT/kamailio
		local pw=${LAB_DB_URL#mysql://kamailio:}
		MYSQL_PWD=${pw%%@*} mariadb --no-defaults -N -B -h 127.0.0.1 -P "$LAB_MYSQL_PORT" -u kamailio kamailio -e "$1" ;;
	*) psql -X -Atq "$LAB_DB_URL" -c "$1" ;;
	esac
}

rpc '{"jsonrpc":"2.0","method":"core.version","id":1}' | grep -q '"kamailio 5' || fail core.version
n=$(rpc '{"jsonrpc":"2.0","method":"ul.dump","id":1}' | jq '[.result.Domains[].Domain.AoRs[].Info.Contacts[]] | length')
[ "$n" = 7 ] || fail "ul.dump has $n contacts, want 7"
uas=$(rpc '{"jsonrpc":"2.0","method":"ul.dump","id":1}' | jq -r '.result.Domains[].Domain.AoRs[].Info.Contacts[].Contact["User-Agent"]' | sort -u | paste -sd'|' -)
for v in Yealink Polycom snom Grandstream Cisco; do [[ "$uas" == *"$v"* ]] || fail "no $v User-Agent in ul.dump: $uas"; done
[ "$(sql 'select count(*) from location')" = 7 ] || fail "location table disagrees with ul.dump"
ok "7 registrations, User-Agents: $uas"

IFS=, read -r P _ <<<"$LAB_PHONES_REBOOT"
before=$(field "$P" Call-ID) lm=$(field "$P" Last-Modified)
t0=$(date +%s%N)
code=$(notify "$P")
[ "$code" = 200 ] || fail "NOTIFY to $P answered $code"
for ((i = 0; i < 50; i++)); do [ "$(field "$P" Call-ID)" != "$before" ] && break; sleep 0.1; done
ms=$((($(date +%s%N) - t0) / 1000000))
[ "$(field "$P" Call-ID)" != "$before" ] || fail "$P did not re-register"
[ "$(field "$P" Last-Modified)" != "$lm" ] || fail "$P Last-Modified unchanged"
ok "reboot phone $P: 200, re-registered within $ms ms of the NOTIFY (boot $LAB_BOOT_MS ms; Call-ID $before -> $(field "$P" Call-ID))"

if [ -n "$LAB_PHONES_NAT" ]; then
	N=${LAB_PHONES_NAT%%,*}
	before=$(field "$N" Call-ID)
	code=$(notify "$N")
	[ "$code" = 200 ] || fail "NOTIFY to NAT phone $N via Received answered $code"
	sleep 2
	[ "$(field "$N" Call-ID)" != "$before" ] || fail "NAT phone $N did not re-register"
	ok "NAT phone $N (next hop $(field "$N" Received)): 200, re-registered"
fi

t0=$(date +%s%N)
code=$(notify "$LAB_PHONES_SILENT")
ms=$((($(date +%s%N) - t0) / 1000000))
[ "$code" = 408 ] || fail "silent phone answered $code"
ok "silent phone $LAB_PHONES_SILENT: 408 after $ms ms (fr_timer $LAB_FR_TIMER_MS)"

before=$(field "$LAB_PHONES_NO_REBOOT" Call-ID)
code=$(notify "$LAB_PHONES_NO_REBOOT")
[ "$code" = 200 ] || fail "no-reboot phone answered $code"
sleep 3
[ "$(field "$LAB_PHONES_NO_REBOOT" Call-ID)" = "$before" ] || fail "no-reboot phone re-registered"
ok "no-reboot phone $LAB_PHONES_NO_REBOOT: 200, binding unchanged after 3 s"

counts=$("$LAB" notify-counts --dir "$D" | paste -sd' ' -)
for e in "$P" "$LAB_PHONES_SILENT" "$LAB_PHONES_NO_REBOOT"; do
	[[ " $counts " == *" $e 1 "* ]] || fail "notify-counts: want $e 1 in: $counts"
done
ok "notify-counts: $counts"

L=$(cut -d, -f3 <<<"$LAB_PHONES_REBOOT")
[ "$("$LAB" sip-register --dir "$D" --ext "$L")" = 200 ] || fail "$L cannot register before the lock"
sql "update usr_preferences set value='1' where username='$L' and domain='$LAB_DOMAIN' and attribute='pbx.locked'"
code=$("$LAB" sip-register --dir "$D" --ext "$L")
[ "$code" = 403 ] || fail "locked $L got $code"
ok "locked user $L: REGISTER answered 403"

rpc '{"jsonrpc":"2.0","method":"ul.rm","params":["location","'"$LAB_PHONES_NO_REBOOT@$LAB_DOMAIN"'"],"id":1}' >/dev/null
lookup "$LAB_PHONES_NO_REBOOT" | grep -q 'AOR not found' || fail "ul.rm left a binding"
[ "$(sql "select count(*) from location where username='$LAB_PHONES_NO_REBOOT'")" = 0 ] || fail "ul.rm left a location row"
ok "ul.rm removed $LAB_PHONES_NO_REBOOT from memory and SQL"

"$LAB" down --dir "$D"
"$LAB" down --dir "$D"
left=$(ps -eo stat=,comm=,args= | awk -v d="$D" '$1 !~ /Z/ && $2 ~ /^(kamailio|sipp|postgres|mariadbd)$/ && index($0, d)' | wc -l)
[ "$left" = 0 ] || fail "$left processes of $D left after down"
ok "down: no process left (up took ${LAB_UP_SECONDS}s)"

#!/usr/bin/env bash
# End-to-end tests of the compose demo against real Docker DNS: build and start the stack
# (compose/demo up), then check, failing loudly on the first broken guarantee:
#   1. the sluicegate container runs as a non-root user on a read-only root filesystem;
#   2. scaling 3 → 5 → 2 is followed within refresh (2 s) + health interval (1 s) + 2 s;
#   3. a killed backend costs 0 new connections (40 new connections/s);
#   4. a paused backend (it stays in Docker's DNS) is marked down by the health checks, gets no new
#      traffic, and comes back when unpaused;
#   5. a backend whose /health fails stops receiving traffic within fall × interval + 1 s;
#   6. the drain demo: every download completes with the right checksum, new connections are
#      refused, sluicegate exits 0;
#   7. container health: sluicegate's own healthcheck (`sluicegate healthcheck`) reports healthy, the
#      backends' too, every service restarts unless stopped;
#   8. monitoring: Prometheus scrapes sluicegate (its targets API says `up`) and its recording rules
#      produce the connection rate;
#   9. backend names: Docker's DNS names each backend in reverse, and /backends and the routing log
#      show the container's name.
# Skips (exit 0, saying so loudly) only when no Docker engine answers. Tears the stack down at the end.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ADMIN=http://127.0.0.1:9901
PROMETHEUS=http://127.0.0.1:9090
need_docker_or_skip "the compose end-to-end tests"

step() { printf '\n=== e2e: %s (at %ds)\n' "$*" $((SECONDS - started)); }
compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose -p sluicegate-demo -f "$root/compose/compose.yaml" "$@"
  else
    docker-compose -p sluicegate-demo -f "$root/compose/compose.yaml" "$@"
  fi
}
backends_json() { curl -sf "$ADMIN/backends"; }
# Prints "healthy_active total" as sluicegate sees it.
counts() {
  backends_json | python3 -c '
import json, sys
b = [x for x in json.load(sys.stdin) if x["state"] != "removed"]
print(sum(1 for x in b if x["health"] == "healthy" and x["state"] == "active"), len(b))'
}
health_of() { # address → health
  backends_json | python3 -c '
import json, sys
print(next((b["health"] for b in json.load(sys.stdin) if b["address"] == sys.argv[1]), "absent"))' "$1"
}
# Waits up to $1 seconds for `$2...` to succeed; prints the time it took.
within() {
  local limit=$1
  shift
  local t0
  t0=$(date +%s.%N)
  while ! "$@" >/dev/null 2>&1; do
    if python3 -c "import sys,time; sys.exit(0 if time.time() - $t0 < $limit else 1)"; then
      sleep 0.2
    else
      return 1
    fi
  done
  python3 -c "import time; print(f'{time.time() - $t0:.1f} s')"
}
healthy_is() { [ "$(counts | cut -d' ' -f1)" -eq "$1" ] && [ "$(counts | cut -d' ' -f2)" -eq "$1" ]; }
health_is() { [ "$(health_of "$1")" = "$2" ]; }
ip_of() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1"; }
host_of() { docker inspect -f '{{.Config.Hostname}}' "$1"; }

cleanup() { "$demo" down >/dev/null 2>&1 || true; }
trap cleanup EXIT

step "compose/demo up"
"$demo" up

step "1. non-root, read-only root filesystem"
sg=$(compose ps -q sluicegate)
[ "$(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$sg")" = "true" ] || fail "root filesystem is writable"
pid=$(docker inspect -f '{{.State.Pid}}' "$sg")
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[ "$uid" != "0" ] || fail "sluicegate runs as root"
echo "sluicegate runs as uid $uid, read-only root filesystem"

step "2. scaling 3 → 5 → 2 is followed within 5 s"
compose up -d --no-recreate --scale backend=5 >/dev/null 2>&1
t=$(within 5 healthy_is 5) || fail "5 replicas not followed within 5 s ($(counts))"
echo "5 replicas followed in $t"
compose up -d --no-recreate --scale backend=2 >/dev/null 2>&1
t=$(within 5 healthy_is 2) || fail "2 replicas not followed within 5 s ($(counts))"
echo "2 replicas followed in $t"
compose up -d --no-recreate --scale backend=3 >/dev/null 2>&1
within 10 healthy_is 3 >/dev/null || fail "back to 3 replicas"

step "3. a killed backend costs no new connection"
"$demo" failover || fail "failover lost connections"
within 10 healthy_is 3 >/dev/null || fail "back to 3 replicas after the failover ($(counts))"

step "4. a paused backend is marked down by health checks, stays in DNS, comes back"
victim=$(compose ps -q backend | sed -n 1p)
addr="$(ip_of "$victim"):5000"
docker pause "$victim" >/dev/null
t=$(within 5 health_is "$addr" unhealthy) || { docker unpause "$victim"; fail "paused $addr not marked down"; }
echo "paused $addr marked unhealthy in $t; still listed: $(health_of "$addr")"
out=$(python3 "$root/compose/democlient.py" spread 30) || { docker unpause "$victim"; fail "requests failed while $addr was paused: $out"; }
echo "$out"
echo "$out" | grep -q "\"$(host_of "$victim")\"" && { docker unpause "$victim"; fail "the paused backend got traffic"; }
docker unpause "$victim" >/dev/null
t=$(within 5 health_is "$addr" healthy) || fail "unpaused $addr did not come back"
echo "unpaused $addr healthy again in $t"

step "5. a backend whose /health fails stops receiving traffic"
victim=$(compose ps -q backend | tail -1)
addr="$(ip_of "$victim"):5000"
docker exec "$victim" python3 -c "import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:5000/health/fail', method='POST'))"
t=$(within 3 health_is "$addr" unhealthy) || fail "/health 503 not noticed within fall × interval + 1 s"
echo "$addr unhealthy in $t"
out=$(python3 "$root/compose/democlient.py" spread 30) || fail "requests failed: $out"
echo "$out"
echo "$out" | grep -q "\"$(host_of "$victim")\"" && fail "the unhealthy backend got traffic"
docker exec "$victim" python3 -c "import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:5000/health/ok', method='POST'))"
t=$(within 4 health_is "$addr" healthy) || fail "/health 200 again not noticed within rise × interval + 1 s"
echo "$addr healthy again in $t"

step "6. drain: downloads complete, new connections refused, exit 0"
"$demo" drain || fail "drain guarantees broken"

step "7. container health: healthchecks and restart policies"
health() { docker inspect -f '{{.State.Health.Status}}' "$1"; }
sg=$(compose ps -q sluicegate)
t=$(within 40 sh -c "[ \"\$(docker inspect -f '{{.State.Health.Status}}' $sg)\" = healthy ]") \
  || fail "sluicegate's healthcheck does not report healthy: $(health "$sg")"
echo "sluicegate healthy (its own healthcheck) after $t more"
for c in $(compose ps -q backend); do
  within 30 sh -c "[ \"\$(docker inspect -f '{{.State.Health.Status}}' $c)\" = healthy ]" >/dev/null \
    || fail "backend $c is $(health "$c")"
done
for c in $(compose ps -q); do
  p=$(docker inspect -f '{{.HostConfig.RestartPolicy.Name}}' "$c")
  [ "$p" = unless-stopped ] || fail "$(docker inspect -f '{{.Name}}' "$c") restart policy is '$p'"
done
echo "every backend healthy; restart: unless-stopped everywhere"

step "8. monitoring: Prometheus scrapes sluicegate"
prom_target_up() {
  curl -sf "$PROMETHEUS/api/v1/targets" | python3 -c '
import json, sys
t = json.load(sys.stdin)["data"]["activeTargets"]
sys.exit(0 if any(x["labels"]["job"] == "sluicegate" and x["health"] == "up" for x in t) else 1)'
}
t=$(within 60 prom_target_up) || fail "Prometheus does not scrape sluicegate: $(curl -s "$PROMETHEUS/api/v1/targets")"
echo "Prometheus target sluicegate is up (after $t)"
python3 "$root/compose/democlient.py" spread 30 >/dev/null
rule_has_data() {
  curl -sf "$PROMETHEUS/api/v1/query?query=service:sluicegate_connections_accepted:rate1m" | python3 -c '
import json, sys
r = json.load(sys.stdin)["data"]["result"]
sys.exit(0 if r and float(r[0]["value"][1]) > 0 else 1)'
}
t=$(within 60 rule_has_data) || fail "the recording rule service:sluicegate_connections_accepted:rate1m has no data"
echo "recording rules evaluate (connection rate after $t)"

step "9. backends named by their containers"
names_ok() {
  local want
  want=$(for c in $(compose ps -q backend); do docker inspect -f '{{.Name}}' "$c" | tr -d /; done | sort | tr '\n' ' ')
  [ "$(backends_json | python3 -c 'import json, sys; print(" ".join(sorted(b["name"] or "" for b in json.load(sys.stdin) if b["state"] != "removed")) + " ")')" = "$want" ]
}
t=$(within 10 names_ok) || fail "/backends does not name the containers: $(backends_json)"
echo "/backends names every backend by its container (after $t)"
python3 "$root/compose/democlient.py" spread 6 >/dev/null
named_routes=$(docker logs "$(compose ps -q sluicegate)" 2>/dev/null | python3 -c '
import json, sys
n = 0
for line in sys.stdin:
    try:
        l = json.loads(line)
    except ValueError:
        continue
    if l.get("target") == "sluicegate::route" and l.get("backend_name"):
        n += 1
print(n)')
[ "$named_routes" -ge 6 ] || fail "routing lines without backend_name ($named_routes named)"
echo "routing lines name the backend's container ($named_routes lines)"

step "all compose end-to-end checks passed in $((SECONDS - started)) s"

#!/usr/bin/env bash
# End-to-end tests of the compose demo against real Docker DNS: build and start the stack
# (compose/demo up), then check, failing loudly on the first broken guarantee:
#   1. the sluicegate container runs as a non-root user on a read-only root filesystem, and every
#      container of the demo with no-new-privileges, no capability, and memory, CPU and pids limits;
#   2. scaling 3 → 5 → 2 is followed within refresh (2 s) + health interval (1 s) + 2 s;
#   3. a killed backend costs 0 new connections (40 new connections/s);
#   4. a paused backend (it stays in Docker's DNS) is marked down by the health checks, gets no new
#      traffic, and comes back when unpaused;
#   5. a backend whose /health fails stops receiving traffic within fall × interval + 1 s;
#   6. the drain demo: every download completes with the right checksum, new connections are
#      refused, sluicegate exits 0;
#   7. container health: sluicegate's own healthcheck (`sluicegate healthcheck`) reports healthy, the
#      backends' too, every service restarts unless stopped;
#   8. monitoring: `compose/demo up` checked that Prometheus scrapes sluicegate, and the same check
#      still says so, its recording rules produce the connection rate, and the check fails, saying
#      why, while sluicegate is paused (and passes again after);
#   9. backend names: Docker's DNS names each backend in reverse, and /backends and the routing log
#      show the container's name;
#  10. TLS: web.demo.test and api.demo.test on one port, each answered with its own certificate
#      (verified by curl against the demo CA), a name neither lists refused, and the routing log
#      saying which name routed each connection and why;
#  11. Redis: sluicegate's `role:master` check sends clients to the primary only; after the replica is
#      promoted by hand, writes follow it, and come back when the roles are put back (compose/demo
#      redis);
#  12. DNS over UDP: dig inside the network through sluicegate's port 53 is answered by both Knot
#      servers over several queries (compose/demo dns); a paused server is marked down by the
#      `kind: dns` probe and every query goes to the other, and it is marked up again when unpaused.
# Skips (exit 0, saying so loudly) only when no Docker engine answers. Tears the stack down at the end.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "$0")/lib.sh"
need_docker_or_skip "the compose end-to-end tests"

step() { printf '\n=== e2e: %s (at %ds)\n' "$*" $((SECONDS - started)); }
backends_json() { curl -sf "$ADMIN/backends"; }
# Prints "healthy_active total" as sluicegate sees it.
counts() { client counts; }
health_of() { client health-of "$1"; } # address → health
# Milliseconds since the epoch (bash 5's clock, whatever the locale's decimal mark).
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
# Waits up to $1 seconds for `$2...` to succeed; prints the time it took.
within() {
  local limit_ms=$(($1 * 1000)) t0
  shift
  t0=$(now_ms)
  while ! "$@" >/dev/null 2>&1; do
    [ $(($(now_ms) - t0)) -lt "$limit_ms" ] || return 1
    sleep 0.2
  done
  local took=$(($(now_ms) - t0))
  printf '%d.%d s\n' $((took / 1000)) $((took % 1000 / 100))
}
healthy_is() { [ "$(counts | cut -d' ' -f1)" -eq "$1" ] && [ "$(counts | cut -d' ' -f2)" -eq "$1" ]; }
health_is() { [ "$(health_of "$1")" = "$2" ]; }
ip_of() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1"; }
host_of() { docker inspect -f '{{.Config.Hostname}}' "$1"; }

up_log=$(mktemp)
cleanup() { rm -f "$up_log"; "$demo" down >/dev/null 2>&1 || true; }
trap cleanup EXIT

step "compose/demo up"
"$demo" up | tee "$up_log"
grep -q '^Prometheus scrapes sluicegate (target up after' "$up_log" \
  || fail "compose/demo up did not check that Prometheus scrapes sluicegate"
# auto: epoll under Docker's default seccomp profile (it blocks io_uring), ring where it is allowed.
grep -qxE 'web: (epoll|ring)' "$up_log" \
  || fail "compose/demo up did not say which relay engine the web service runs"

step "1. non-root, read-only root filesystem, every container hardened"
sg=$(compose ps -q sluicegate)
[ "$(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$sg")" = "true" ] || fail "root filesystem is writable"
pid=$(docker inspect -f '{{.State.Pid}}' "$sg")
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[ "$uid" != "0" ] || fail "sluicegate runs as root"
echo "sluicegate runs as uid $uid, read-only root filesystem"
for c in $(compose ps -q); do check_hardened "$c"; done

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
out=$(client spread 30) || { docker unpause "$victim"; fail "requests failed while $addr was paused: $out"; }
echo "$out"
echo "$out" | grep -q "\"$(host_of "$victim")\"" && { docker unpause "$victim"; fail "the paused backend got traffic"; }
docker unpause "$victim" >/dev/null
t=$(within 5 health_is "$addr" healthy) || fail "unpaused $addr did not come back"
echo "unpaused $addr healthy again in $t"

step "5. a backend whose /health fails stops receiving traffic"
victim=$(compose ps -q backend | tail -1)
addr="$(ip_of "$victim"):5000"
in_backend "$victim" backend-health fail
t=$(within 3 health_is "$addr" unhealthy) || fail "/health 503 not noticed within fall × interval + 1 s"
echo "$addr unhealthy in $t"
out=$(client spread 30) || fail "requests failed: $out"
echo "$out"
echo "$out" | grep -q "\"$(host_of "$victim")\"" && fail "the unhealthy backend got traffic"
in_backend "$victim" backend-health ok
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
prom_target_up() { client prometheus-up; }
prom_target_down() { ! client prometheus-up; }
t=$(within 60 prom_target_up) || fail "Prometheus does not scrape sluicegate: $(curl -s "$PROMETHEUS/api/v1/targets")"
echo "Prometheus target sluicegate is up (after $t)"
client spread 30 >/dev/null
rule_has_data() { client prometheus-has-data service:sluicegate_connections_accepted:rate1m; }
t=$(within 60 rule_has_data) || fail "the recording rule service:sluicegate_connections_accepted:rate1m has no data"
echo "recording rules evaluate (connection rate after $t)"
# The check fails when Prometheus cannot scrape: sluicegate paused, the next scrape times out (5 s).
sg=$(compose ps -q sluicegate)
docker pause "$sg" >/dev/null
t=$(within 30 prom_target_down) || { docker unpause "$sg"; fail "the check still says up with sluicegate paused"; }
why=$(client prometheus-up 2>&1) && { docker unpause "$sg"; fail "the check passed with sluicegate paused"; }
docker unpause "$sg" >/dev/null
echo "with sluicegate paused the check fails after $t: $why"
t=$(within 30 prom_target_up) || fail "Prometheus does not scrape sluicegate again after the pause"
echo "and passes again $t after the unpause"

step "9. backends named by their containers"
names_ok() {
  local want
  want=$(for c in $(compose ps -q backend); do docker inspect -f '{{.Name}}' "$c" | tr -d /; done | sort | tr '\n' ' ')
  [ "$(client backend-names)" = "$want" ]
}
t=$(within 10 names_ok) || fail "/backends does not name the containers: $(backends_json)"
echo "/backends names every backend by its container (after $t)"
client spread 6 >/dev/null
named_routes=$(docker logs "$(compose ps -q sluicegate)" 2>/dev/null | client named-routes)
[ "$named_routes" -ge 6 ] || fail "routing lines without backend_name ($named_routes named)"
echo "routing lines name the backend's container ($named_routes lines)"

step "10. TLS: two names on one port, each its own certificate"
ca="$root/compose/tls/ca.pem"
tls_get() { curl -sf --max-time 5 --cacert "$ca" --resolve "$1:8443:127.0.0.1" "https://$1:8443/"; }
for name in web.demo.test api.demo.test; do
  out=$(tls_get "$name") || fail "https://$name:8443/ did not answer with a certificate for $name"
  subject=$(openssl s_client -connect 127.0.0.1:8443 -servername "$name" </dev/null 2>/dev/null \
    | openssl x509 -noout -subject)
  [[ "$subject" == *"CN = $name"* ]] || fail "$name was presented the certificate of: $subject"
  echo "$name ($subject): $out"
done
if tls_get other.demo.test >/dev/null; then fail "a name no service lists was answered"; fi
echo "other.demo.test: refused (no route, no default)"
sg=$(compose ps -q sluicegate)
routed=$(docker logs "$sg" 2>/dev/null | grep '"msg":"route"' | grep '"sni":"web.demo.test"' \
  | grep -c '"route":"exact"' || true)
[ "$routed" -ge 1 ] || fail "no routing line names the route of web.demo.test"
echo "routing lines name the SNI and the route ($routed for web.demo.test)"

step "11. Redis: traffic follows the primary"
"$demo" redis || fail "Redis traffic did not follow the primary"

step "12. DNS over UDP: both servers answer dig through sluicegate; a paused one is marked down"
"$demo" dns 8 || fail "dig through sluicegate did not reach both DNS servers"
# Paused, not stopped: a stopped container leaves Docker's DNS, and discovery would remove it first.
dns_b=$(compose ps -q dns-b)
addr="$(ip_of "$dns_b"):53"
dig_who() { docker exec "$(compose ps -q dns-a)" dig @sluicegate who.demo.test TXT +short +tries=1 +time=2 | tr -d '"'; }
docker pause "$dns_b" >/dev/null
t=$(SG_SERVICE=dns within 5 health_is "$addr" unhealthy) \
  || { docker unpause "$dns_b"; fail "paused dns-b ($addr) not marked down"; }
echo "paused dns-b marked unhealthy in $t"
for _ in 1 2 3 4; do
  got=$(dig_who) || true
  [ "$got" = dns-a ] || { docker unpause "$dns_b"; fail "with dns-b paused a query got '$got', not dns-a"; }
done
echo "with dns-b paused every query is answered by dns-a"
docker unpause "$dns_b" >/dev/null
t=$(SG_SERVICE=dns within 5 health_is "$addr" healthy) || fail "unpaused dns-b ($addr) not marked up"
echo "unpaused dns-b healthy again in $t"

step "all compose end-to-end checks passed in $((SECONDS - started)) s"

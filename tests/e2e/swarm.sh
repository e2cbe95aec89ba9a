#!/usr/bin/env bash
# End-to-end test of several sluicegate replicas on Docker Swarm (compose/demo swarm): the stack
# deploys (2 balancers, 3 backends, an overlay network; a single-node swarm is made if there is none),
# the replicas route every client alike with no shared state, a killed replica is replaced and still
# agrees, a rolling update under load fails no connection, and every task runs with no capability and
# with memory, CPU and pids limits. Then the teardown leaves the machine as it found it. Skips (exit 0, saying so loudly) only when no Docker engine answers or Swarm cannot start.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "$0")/lib.sh"
need_docker_or_skip "the swarm end-to-end test"
before=$(docker info --format '{{.Swarm.LocalNodeState}}')
if [ "$before" != "active" ]; then
  if ! docker swarm init --advertise-addr 127.0.0.1 >/dev/null 2>&1; then
    printf '\n*** SKIPPED: Swarm cannot start here (docker swarm init failed); the swarm test did NOT run ***\n\n'
    exit 0
  fi
  docker swarm leave --force >/dev/null
fi
trap '"$demo" swarm-down >/dev/null 2>&1 || true' EXIT

printf '\n=== e2e: compose/demo swarm\n'
"$demo" swarm || fail "the swarm demo broke a guarantee"

printf '\n=== e2e: every task hardened as far as Swarm goes (no capability, limits)\n'
tasks=$(docker ps -q --filter label=com.docker.stack.namespace=sluicegate)
[ -n "$tasks" ] || fail "no task of the stack is running"
for c in $tasks; do check_hardened "$c" swarm; done

printf '\n=== e2e: teardown leaves the machine as it found it\n'
"$demo" swarm-down
after=$(docker info --format '{{.Swarm.LocalNodeState}}')
[ "$after" = "$before" ] || fail "swarm state was $before, is $after"
[ -z "$(docker service ls -q 2>/dev/null)" ] || [ "$before" = "active" ] || fail "services left behind"
echo "swarm state $after, as before"

printf '\n=== e2e: swarm checks passed in %d s\n' $((SECONDS - started))

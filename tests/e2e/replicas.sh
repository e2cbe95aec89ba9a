#!/usr/bin/env bash
# End-to-end test of sluicegate running its own backends in Docker (compose/demo replicas): it starts
# 3 replicas, /add starts 2 more (one named), /rm drains and removes one, a refused /add changes
# nothing, a `docker kill`ed replica is replaced, a bounded load of new connections makes the
# autoscaler scale up with no failed request, and without load it scales back to the minimum. The
# demo fails loudly at the first broken guarantee; this script then checks that sluicegate's container
# and every replica it started run with no-new-privileges, no capability and limits, and that the
# teardown left no container behind. Skips (exit 0, saying so loudly) only when no Docker engine
# answers.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "$0")/lib.sh"
need_docker_or_skip "the replicas end-to-end test"
trap '"$demo" replicas-down >/dev/null 2>&1 || true' EXIT

printf '\n=== e2e: compose/demo replicas\n'
"$demo" replicas || fail "the replicas demo broke a guarantee"

printf '\n=== e2e: sluicegate and its replicas hardened\n'
sg=$(docker ps -q --filter "label=com.docker.compose.project=$REPLICAS_PROJECT" --filter label=com.docker.compose.service=sluicegate)
[ -n "$sg" ] || fail "the sluicegate container is not running"
check_hardened "$sg"
# The replicas sluicegate runs, not those it is removing (renamed *.removing-ID: they stop at any moment,
# and a stopped one has no process to check).
replicas=$(docker ps --filter label=io.sluicegate.balancer=demo --format '{{.ID}} {{.Names}}' |
  awk '$2 !~ /\.removing-/ { print $1 }')
[ -n "$replicas" ] || fail "no replica is running"
for c in $replicas; do check_hardened "$c"; done

printf '\n=== e2e: teardown leaves nothing behind\n'
"$demo" replicas-down
left=$(docker ps -aq --filter label=io.sluicegate.balancer=demo)
[ -z "$left" ] || fail "replica containers left behind: $left"
echo "no replica container left"

printf '\n=== e2e: replicas checks passed in %d s\n' $((SECONDS - started))

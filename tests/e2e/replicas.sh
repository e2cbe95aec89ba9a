#!/usr/bin/env bash
# End-to-end test of sluicegate running its own backends in Docker (compose/demo replicas): it starts
# 3 replicas, /add starts 2 more (one named), /rm drains and removes one, a refused /add changes
# nothing, a `docker kill`ed replica is replaced, a bounded load of new connections makes the
# autoscaler scale up with no failed request, and without load it scales back to the minimum. The
# demo fails loudly at the first broken guarantee; this script then checks that the teardown left no
# container behind. Skips (exit 0, saying so loudly) only when no Docker engine answers.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_docker_or_skip "the replicas end-to-end test"
trap '"$demo" replicas-down >/dev/null 2>&1 || true' EXIT

printf '\n=== e2e: compose/demo replicas\n'
"$demo" replicas || fail "the replicas demo broke a guarantee"

printf '\n=== e2e: teardown leaves nothing behind\n'
"$demo" replicas-down
left=$(docker ps -aq --filter label=io.sluicegate.balancer=demo)
[ -z "$left" ] || fail "replica containers left behind: $left"
echo "no replica container left"

printf '\n=== e2e: replicas checks passed in %d s\n' $((SECONDS - started))

# Sourced by the end-to-end scripts: where things are, the compose wrapper and demo client shared with
# compose/demo, and the two ways a script ends early.
# shellcheck shell=bash
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck disable=SC2034 # used by the scripts that source this file
demo="$root/compose/demo"
# shellcheck disable=SC2034
started=$SECONDS
# compose, compose_replicas, client, in_backend, ADMIN, PROMETHEUS.
# shellcheck source=compose/lib.sh
. "$root/compose/lib.sh"

fail() { printf '\n\033[31mE2E FAILED: %s\033[0m\n' "$*" >&2; exit 1; }

# Exits 0, saying loudly that WHAT did not run, when no Docker engine answers.
need_docker_or_skip() {
  if ! docker info >/dev/null 2>&1; then
    printf '\n*** SKIPPED: no Docker engine answers; %s did NOT run ***\n\n' "$1"
    exit 0
  fi
}

# Fails unless container $1 runs with no-new-privileges (not checked with $2 = swarm: Swarm services
# cannot set it), every capability dropped (none added back), and memory, CPU and process limits;
# prints what it found.
check_hardened() {
  local c=$1 mode=${2:-} name got
  name=$(docker inspect -f '{{.Name}}' "$c" | tr -d /)
  got=$(docker inspect -f '{{json .HostConfig.SecurityOpt}} {{json .HostConfig.CapDrop}} {{json .HostConfig.CapAdd}} {{.HostConfig.Memory}} {{.HostConfig.NanoCpus}} {{.HostConfig.PidsLimit}} {{.State.Pid}}' "$c")
  client hardened "$name" "$got" "$mode" || fail "$name is not hardened: $got"
}

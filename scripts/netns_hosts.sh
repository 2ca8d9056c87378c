#!/usr/bin/env bash
# Two "hosts" on this machine for multi-host MPI tests: network namespaces kiln_a (10.231.0.1) and kiln_b
# (10.231.0.2) joined by a veth pair, and an rsh agent for mpirun that starts a command "on a host" by
# entering that host's namespace (mpirun's ssh launcher with ip netns exec in place of ssh).
#   scripts/netns_hosts.sh up      create them (root; idempotent)
#   scripts/netns_hosts.sh down    remove them
#   scripts/netns_hosts.sh agent HOST CMD...   (what mpirun runs: --mca plm_rsh_agent "scripts/netns_hosts.sh agent")
# Then: ip netns exec kiln_a mpirun --host 10.231.0.1,10.231.0.2 --mca plm_rsh_agent "$PWD/scripts/netns_hosts.sh agent" ...
set -euo pipefail
case "${1:-}" in
  up)
    ip netns list | grep -qw kiln_a && exit 0
    ip netns add kiln_a
    ip netns add kiln_b
    ip link add kiln_va type veth peer name kiln_vb
    ip link set kiln_va netns kiln_a
    ip link set kiln_vb netns kiln_b
    ip -n kiln_a addr add 10.231.0.1/24 dev kiln_va
    ip -n kiln_b addr add 10.231.0.2/24 dev kiln_vb
    for ns in kiln_a kiln_b; do
      ip -n $ns link set lo up
    done
    ip -n kiln_a link set kiln_va up
    ip -n kiln_b link set kiln_vb up
    ;;
  down)
    ip netns del kiln_a 2>/dev/null || true
    ip netns del kiln_b 2>/dev/null || true
    ;;
  agent)
    # mpirun calls: agent [options] HOST COMMAND... (ssh's interface); ssh options are skipped.
    shift
    while [[ "${1:-}" == -* ]]; do shift; done
    host=$1
    shift
    case "$host" in
      10.231.0.1) ns=kiln_a ;;
      10.231.0.2) ns=kiln_b ;;
      *) echo "netns_hosts.sh: unknown host $host" >&2; exit 1 ;;
    esac
    exec ip netns exec "$ns" /bin/sh -c "$*"
    ;;
  *)
    echo "usage: $0 up|down|agent HOST CMD..." >&2
    exit 2
    ;;
esac

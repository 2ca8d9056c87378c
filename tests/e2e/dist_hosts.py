"""Across hosts: 2 ranks in two network namespaces (scripts/netns_hosts.sh: a veth pair, OpenMPI over TCP
between them, mpirun's launcher entering the other namespace in place of ssh) against the same 2 ranks on
one host and against one process: the same losses. So the launch path that spans machines (remote daemons,
TCP transport, no shared memory) is run, not assumed. Needs root (ip netns); exits 77 (skipped) without.

usage: dist_hosts.py KILN_BINARY MPIRUN WORK_DIR
"""
import json
import os
import shutil
import struct
import subprocess
import sys

kiln, mpirun, work = sys.argv[1], sys.argv[2], sys.argv[3]
script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "netns_hosts.sh")
script = os.path.realpath(script)
if os.geteuid() != 0 or not shutil.which("ip"):
    print("SKIP: needs root and ip(8) for network namespaces")
    sys.exit(77)
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
cfg = os.path.join(work, "config.json")
json.dump({"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 97, "n_positions": 32}, open(cfg, "w"))
n = 5000
shard = os.path.join(work, "data.bin")
with open(shard, "wb") as f:
    f.write(struct.pack("<256i", 20240520, 1, n, *([0] * 253)))
    f.write(struct.pack(f"<{n}H", *[(i * i + 3 * i) % 97 for i in range(n)]))
env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")

created = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.find("kiln_a") < 0
r = subprocess.run([script, "up"], capture_output=True, text=True)
if r.returncode != 0:
    print(f"SKIP: cannot create network namespaces: {r.stderr.strip()}")
    sys.exit(77)


def train(name, launcher):
    out = os.path.join(work, name)
    cmd = launcher + [kiln, "train", "--model", cfg, "--data", shard, "--batch", "4", "--seq", "16", "--steps", "6",
                      "--grad-accum", "2", "--zero-stage", "1", "--threads", "1", "--no-progress", "--metrics",
                      out + ".jsonl"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{name}: exit {r.returncode}\n{r.stderr[-2000:]}"
    return [json.loads(l)["loss"] for l in open(out + ".jsonl")], r.stderr


try:
    one, _ = train("one", [])
    local, _ = train("local", [mpirun, "-q", "--oversubscribe", "-np", "2"])
    # The ranks' own view: each reports the address it has (one per namespace).
    where = subprocess.run(
        ["ip", "netns", "exec", "kiln_a", mpirun, "-q", "--host", "10.231.0.1,10.231.0.2", "--mca", "plm_rsh_agent",
         script + " agent", "--mca", "plm_rsh_no_tree_spawn", "1", "--mca", "btl", "tcp,self", "--mca",
         "btl_tcp_if_include", "10.231.0.0/24", "--mca", "oob_tcp_if_include", "10.231.0.0/24", "-np", "2", "sh", "-c",
         "ip -o -4 addr show | grep -o '10\\.231\\.0\\.[0-9]*'"], env=env, capture_output=True, text=True, timeout=60)
    hosts = sorted(where.stdout.split())
    remote, remote_log = train("hosts", ["ip", "netns", "exec", "kiln_a", mpirun, "-q", "--host", "10.231.0.1,10.231.0.2",
                                "--mca", "plm_rsh_agent", script + " agent", "--mca", "plm_rsh_no_tree_spawn", "1",
                                "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "10.231.0.0/24",
                                "--mca", "oob_tcp_if_include", "10.231.0.0/24", "-np", "2"])
finally:
    if created:
        subprocess.run([script, "down"])

d_local = max(abs(a - b) for a, b in zip(local, remote))
d_one = max(abs(a - b) for a, b in zip(one, remote))
# One rank a host leaves a core for the communication thread: the reduction overlaps the backward there.
overlap = "overlapped with the backward" in remote_log
ok = hosts == ["10.231.0.1", "10.231.0.2"] and len(remote) == 6 and d_local <= 1e-6 and d_one <= 1e-6 and overlap
print(f"ranks on {hosts}; losses across hosts vs one host: max diff {d_local:.2e}; vs one process {d_one:.2e}; "
      f"reduction overlapped: {overlap}")
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)

"""A multi-node Ray cluster on one machine, for trying the cluster path, tests and benchmarks.

Every node is one `ray start --block` process with its own temp dir, ports, CPU count and
`inference_core` resources, exactly as `deploy/ray-cluster.yaml` starts nodes on separate hosts.
Stopping the cluster ends exactly its own processes, the descendants of its `ray start`
commands, and never another Ray cluster on the same machine (which `ray stop` would).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.runtime import INFERENCE_RESOURCE

# A node that stops answering is declared dead after about 3 s instead of Ray's default 30 s:
# on one machine a node only leaves because we stopped it.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                   "RAY_health_check_timeout_ms": "1000"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_start_command(num_cpus: int, inference_cores: int, head_port: Optional[int] = None,
                      address: Optional[str] = None, temp_dir: Optional[str] = None) -> list[str]:
    """`ray start` for one node that offers NUM_CPUS CPUs to reads/preprocessing and
    INFERENCE_CORES cores to inference actors."""
    command = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats",
               f"--num-cpus={num_cpus}", f"--resources={json.dumps({INFERENCE_RESOURCE: inference_cores})}",
               # the fixed defaults of these ports would collide between nodes on one machine
               f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]
    if head_port is not None:
        command += ["--head", f"--port={head_port}", "--include-dashboard=false",
                    "--node-ip-address=127.0.0.1"]
    else:
        command += [f"--address={address}", "--node-ip-address=127.0.0.1"]
    if temp_dir:
        command.append(f"--temp-dir={temp_dir}")
    return command


def descendants(pid: int) -> list[int]:
    """PIDs of every process below PID (read from /proc: no psutil in the dependencies)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def process_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class LocalNode:
    process: subprocess.Popen
    temp_dir: str
    log: Path

    def processes(self) -> dict[int, str]:
        """PID -> command line of every Ray process of this node (raylet, workers, actors...)."""
        return {pid: process_title(pid) for pid in descendants(self.process.pid)}

    def pids_titled(self, text: str) -> list[int]:
        return [pid for pid, title in self.processes().items() if text in title]

    def kill_raylet(self) -> None:
        """The node leaves the cluster abruptly: its raylet is SIGKILLed (its workers follow)."""
        for pid, title in self.processes().items():
            if title.split(" ", 1)[0].endswith("/raylet"):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Ray's processes of this node get SIGTERM, as from `ray stop`, then whatever is left (and
        `ray start --block`, which outlives a SIGTERM) gets SIGKILL."""
        signal_all(descendants(self.process.pid), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while descendants(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        signal_all([self.process.pid] + descendants(self.process.pid), signal.SIGKILL)
        self.process.wait()


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


@dataclass
class LocalCluster:
    """Start with `head(...)`, add `worker(...)`s, then `wait_for_nodes(n)`; `stop()` ends it all."""

    root: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    nodes: list[LocalNode] = field(default_factory=list)
    port: Optional[int] = None
    # Ray 2.60 authenticates with a token; this cluster's own (not ~/.ray/auth_token, which
    # every Ray on the machine shares) goes to its nodes and to the drivers given `env`.
    token: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment for a process that joins this cluster (RAY_ADDRESS left to the caller)."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return env

    def _start(self, command: list[str], temp_dir: str, extra_env: dict) -> LocalNode:
        env = {**self.env, **extra_env}
        log = Path(self.root) / f"node{len(self.nodes)}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        node = LocalNode(process, temp_dir, log)
        self.nodes.append(node)
        return node

    def head(self, num_cpus: int, inference_cores: int) -> LocalNode:
        self.port = free_port()
        temp_dir = os.path.join(self.root, "n0")
        return self._start(ray_start_command(num_cpus, inference_cores, head_port=self.port, temp_dir=temp_dir),
                           temp_dir, FAST_NODE_DEATH)

    def worker(self, num_cpus: int, inference_cores: int) -> LocalNode:
        temp_dir = os.path.join(self.root, f"n{len(self.nodes)}")
        return self._start(ray_start_command(num_cpus, inference_cores, address=self.address, temp_dir=temp_dir),
                           temp_dir, {})

    def alive_nodes(self) -> int:
        """Alive nodes as the cluster's GCS sees them (asked from a subprocess: this process may
        already be a driver of another Ray)."""
        probe = (f"import ray; ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False); "
                 "print('alive nodes:', sum(n['Alive'] for n in ray.nodes()))")
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                                env=self.env)
        # Ray prints its own warnings (lagging heartbeats on a busy machine...) on the same stdout
        counts = re.findall(r"^alive nodes: (\d+)$", result.stdout, re.M)
        return int(counts[-1]) if result.returncode == 0 and counts else 0

    def wait_for_nodes(self, count: int, timeout: float = 90, *, expect_exits: bool = False) -> None:
        """Wait until the cluster's GCS sees COUNT nodes alive. A node whose `ray start` exits has
        failed to start, and says why at once, unless EXPECT_EXITS: waiting for Ray to notice nodes
        that were stopped on purpose."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [node for node in self.nodes if node.process.poll() is None]
            if not expect_exits:
                for node in self.nodes:
                    if node not in running:
                        raise RuntimeError(f"a Ray node exited while starting: {node.log.read_text()[-2000:]}")
            # a driver that joins before the head's GCS is up waits a long time: ask only once every
            # node has said it started
            started = all("Ray runtime started" in node.log.read_text() for node in running)
            if started and self.alive_nodes() == count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"the local Ray cluster did not reach {count} nodes alive in {timeout:.0f} s")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)

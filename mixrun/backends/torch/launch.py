"""The controller: start one process per planned device (or print ``torchrun`` commands per host), hand each its
job, and watch them. Any rank's error, death or a lost connection stops every rank; the user sees the failing
rank's message.

On one host the controller spawns ``python -m mixrun.backends.torch.worker`` processes in their own session (a
Ctrl-C at the terminal reaches only the controller, which then stops them). On several hosts, each host runs the
``torchrun`` command :func:`torchrun_commands` prints; the workers connect back to the controller, which assigns
global ranks from the plan's layout and serves the process-group rendezvous address.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from mixrun.backends.torch.control import Channel
from mixrun.errors import RuntimeFailure

STOP_GRACE_S = 3.0


@dataclass
class Slot:
    """A planned rank: its device id, the host it runs on, its index there and the torch device string."""

    rank: int
    device_id: str
    host: str
    local_rank: int
    torch_device: str
    channel: Channel | None = None
    pid: int | None = None
    done: bool = False


@dataclass
class Event:
    rank: int
    msg: dict[str, Any] | None  # None: the connection closed


@dataclass
class Cluster:
    """The running ranks of one job, seen from the controller."""

    slots: list[Slot]
    job: dict[str, Any]
    init: str
    server: socket.socket
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    events: queue.Queue[Event] = field(default_factory=queue.Queue)
    tele: dict[int, dict[str, Any]] = field(default_factory=dict)
    progress: dict[int, float] = field(default_factory=dict)
    failed: str | None = None
    tmpdir: str | None = None
    store: Any = None  # the TCPStore several hosts meet at
    driver: int = field(init=False)  # the rank that samples and takes commands

    def __post_init__(self) -> None:
        from mixrun.backends.torch.parallel import Layout

        self.driver = Layout.from_json(self.job["layout"]).driver

    @property
    def address(self) -> str:
        host, port = self.server.getsockname()[:2]
        return f"{host}:{port}"

    # ---- connections ----

    def accept_all(self, timeout_s: float, notify: Any = None) -> None:
        """Accept a hello from every slot, then send each its rank and job."""
        deadline = time.monotonic() + timeout_s
        self.server.settimeout(0.2)
        waiting = {(s.host, s.local_rank): s for s in self.slots}
        while waiting:
            self._check_procs()
            if time.monotonic() > deadline:
                raise self.fail(f"{len(waiting)} of {len(self.slots)} ranks never connected")
            try:
                sock, _addr = self.server.accept()
            except TimeoutError:
                continue
            ch = Channel(sock)
            try:  # anything that is not a worker's hello within a few seconds is dropped
                sock.settimeout(10.0)
                hello = (ch.recv() or {}).get("hello") or {}
                key = (str(hello.get("host", "")), int(hello.get("local_rank", -1)))
                sock.settimeout(None)
            except (OSError, ValueError, TypeError, AttributeError):
                ch.close()
                continue
            slot = waiting.pop(key, None)
            if slot is None:
                ch.close()
                continue
            slot.channel, slot.pid = ch, int(hello.get("pid", 0)) or None
            ch.send({"rank": slot.rank, "world": len(self.slots), "init": self.init, "job": self.job})
            threading.Thread(target=self._read, args=(slot,), daemon=True, name=f"mixrun-rank{slot.rank}").start()

    def _read(self, slot: Slot) -> None:
        assert slot.channel is not None
        while True:
            try:
                msg = slot.channel.recv()
            except (OSError, ValueError):
                msg = None
            self.events.put(Event(slot.rank, msg))
            if msg is None:
                return

    def next_event(self, timeout_s: float = 0.2) -> Event | None:
        """The next message for the caller; telemetry and progress are absorbed, failures raise."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_procs()
            try:
                ev = self.events.get(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    return None
                continue
            slot = self.slots[ev.rank]
            if ev.msg is None:
                if not slot.done:
                    raise self.fail(f"rank {ev.rank} ({slot.device_id}) died" + self._exit_note(ev.rank))
                continue
            if "error" in ev.msg:
                raise self.fail(f"rank {ev.rank} ({slot.device_id}): {ev.msg['error']}")
            if "tele" in ev.msg:
                self.tele[ev.rank] = ev.msg["tele"]
                continue
            if "progress" in ev.msg:
                self.progress[ev.rank] = float(ev.msg["progress"])
                continue
            if "bye" in ev.msg:
                slot.done = True
                continue
            return ev

    def send_driver(self, msg: dict[str, Any]) -> None:
        ch = self.slots[self.driver].channel
        assert ch is not None
        try:
            ch.send(msg)
        except OSError:
            raise self.fail(f"rank {self.driver} ({self.slots[self.driver].device_id}) died") from None

    # ---- failure and shutdown ----

    def _exit_note(self, rank: int) -> str:
        proc = self.procs.get(rank)
        if proc is None:
            return ""
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
        code = proc.poll()
        if code is None:
            return ""
        return f" (killed by signal {-code})" if code < 0 else f" (exit code {code})"

    def _check_procs(self) -> None:
        for rank, proc in self.procs.items():
            if rank < 0:  # a torchrun launcher: its workers' connections tell how they are
                continue
            code = proc.poll()
            if code is not None and not self.slots[rank].done and code != 0:
                # let its error message (sent just before exiting) win over the bare exit
                with contextlib.suppress(queue.Empty):
                    while True:
                        ev = self.events.get_nowait()
                        if ev.msg and "error" in ev.msg:
                            raise self.fail(f"rank {ev.rank} ({self.slots[ev.rank].device_id}): {ev.msg['error']}")
                        if ev.msg and "tele" in ev.msg:
                            self.tele[ev.rank] = ev.msg["tele"]
                raise self.fail(f"rank {rank} ({self.slots[rank].device_id}) died" + self._exit_note(rank))

    def fail(self, why: str) -> RuntimeFailure:
        if self.failed is None:
            self.failed = why
            self.stop(graceful=False)
        return RuntimeFailure(f"torch backend: {self.failed}")

    def stop(self, graceful: bool = True) -> None:
        """Stop every rank: a shutdown through the driver when graceful, else abort; then SIGTERM and SIGKILL for
        local processes that are still there."""
        if graceful and self.failed is None:
            with contextlib.suppress(OSError, AssertionError, RuntimeFailure):
                self.send_driver({"op": "shutdown"})
            deadline = time.monotonic() + STOP_GRACE_S
            while time.monotonic() < deadline and any(p.poll() is None for p in self.procs.values()):
                time.sleep(0.05)
        for s in self.slots:
            if s.channel is not None:
                with contextlib.suppress(OSError):
                    s.channel.send({"op": "abort"})
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        for s in self.slots:
            if s.channel is not None:
                s.channel.close()
        with contextlib.suppress(OSError):
            self.server.close()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(job: dict[str, Any]) -> dict[str, str]:
    """Rank processes' environment. With several ranks, OpenMP threads sleep rather than spin when idle
    (``OMP_WAIT_POLICY=PASSIVE``): they share the cores under ``--simulate``, and spinning threads made decode 3x
    slower on a busy 2-core machine (133 vs 48 ms per token). A lone rank keeps OpenMP's default: waking sleeping
    threads adds about 10 us to each of a decode step's few hundred small operations."""
    env = dict(os.environ, OMP_NUM_THREADS=str(job.get("threads") or 1))
    if len(job.get("devices") or ()) > 1:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _spawn(module_args: list[str], job: dict[str, Any], debug: bool) -> subprocess.Popen:
    """``python -m MODULE ARGS`` in its own session (a terminal's Ctrl-C reaches only the controller)."""
    return subprocess.Popen([sys.executable, "-m", *module_args], env=worker_env(job), start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=None if debug else subprocess.DEVNULL)


def _accepted(cluster: Cluster, timeout_s: float) -> Cluster:
    try:
        cluster.accept_all(timeout_s)
    except BaseException:
        cluster.stop(graceful=False)
        raise
    return cluster


def start_local(slots: list[Slot], job: dict[str, Any], *, timeout_s: float = 120.0, debug: bool = False) -> Cluster:
    """Spawn one worker process per slot on this machine and hand out the job."""
    server = socket.create_server(("127.0.0.1", 0))
    tmpdir = tempfile.mkdtemp(prefix="mixrun-")
    cluster = Cluster(slots=slots, job=job, init=f"file://{os.path.join(tmpdir, 'rendezvous')}", server=server,
                      tmpdir=tmpdir)
    for s in slots:
        cluster.procs[s.rank] = _spawn(["mixrun.backends.torch.worker", "--control", cluster.address,
                                        "--host-id", s.host, "--local-rank", str(s.local_rank)], job, debug)
    return _accepted(cluster, timeout_s)


def start_hosts(slots: list[Slot], job: dict[str, Any], *, advertise: str, run_here: list[str],
                announce: Any, timeout_s: float = 600.0, debug: bool = False) -> Cluster:
    """Several hosts: each runs ``torchrun`` (see :func:`torchrun_commands`); its workers connect back to this
    controller, which assigns global ranks from the layout and holds the process-group store, so no rank has to be
    reachable before they meet. The commands for hosts in ``run_here`` are started on this machine (all of them on
    loopback with ``--simulate``); the others are given to ``announce`` for the user to run."""
    from torch.distributed import TCPStore

    bind = "127.0.0.1" if advertise in ("127.0.0.1", "localhost") else "0.0.0.0"
    server = socket.create_server((bind, 0))
    store = TCPStore(bind, 0, is_master=True, wait_for_workers=False)
    cluster = Cluster(slots=slots, job=job, init=f"store://{advertise}:{store.port}", server=server, store=store)
    control = f"{advertise}:{server.getsockname()[1]}"
    commands = torchrun_commands(slots, control, f"{advertise}:{_free_port()}")
    for k, (host, cmd) in enumerate(commands.items()):
        if host in run_here:
            cluster.procs[-1 - k] = _spawn(["torch.distributed.run", *cmd.split()[1:]], job, debug)
        else:
            announce(f"run on host {host}: {cmd}")
    return _accepted(cluster, timeout_s)


def torchrun_commands(slots: list[Slot], control: str, rdzv: str) -> dict[str, str]:
    """The command to run on each host: ``torchrun`` starts that host's ranks, which connect to the controller."""
    hosts: dict[str, int] = {}
    for s in slots:
        hosts[s.host] = hosts.get(s.host, 0) + 1
    out = {}
    for host, n in hosts.items():
        out[host] = (f"torchrun --nnodes={len(hosts)} --nproc-per-node={n} --rdzv-backend=c10d "
                     f"--rdzv-endpoint={rdzv} --rdzv-id=mixrun -m mixrun.backends.torch.worker "
                     f"--control {control} --host-id {host}")
    return out


__all__ = ["Cluster", "Slot", "start_hosts", "start_local", "torchrun_commands"]

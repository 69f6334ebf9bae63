"""The controller: start one process per planned device (or print ``torchrun`` commands per host), hand each its
job, and watch them. Any rank's error, death, lost connection or silence (a hung rank: see ``HUNG_S``) stops every
rank; the user sees the failing rank's message.

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
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from mixrun.backends.torch.control import Channel
from mixrun.errors import MixrunError, RuntimeFailure
from mixrun.rig.probe import cuda_order_env

STOP_GRACE_S = 3.0

# Hung ranks. Each rank sends a heartbeat every HEARTBEAT_S from a thread of its own (control.RankLink); one silent
# for HUNG_S is declared hung and every rank is stopped. A stopped (SIGSTOP) or frozen process sends none. A healthy
# rank's heartbeats pause only while its main thread holds the interpreter lock in one long C call: collectives,
# sends and receives, torch operations and numpy copies of the weights all release it, so neither a long prefill,
# a long load of the weights nor a peer's slow step silences a rank. Once ranks are ready the longest holders we
# know of are a Triton kernel compiling at its first use (LLVM passes, 1-3 s each) and a 64 MiB logits reply
# leaving under the channel's lock (~5 s at 100 Mbit/s): HUNG_S is twice that (ten missed beats), and short enough
# that someone waiting for a token sees an error rather than a frozen answer. Until a rank is ready the bound is
# HUNG_LOADING_S: importing torch maps its shared libraries (GBs, cold from a slow disk) and CUDA context creation
# takes seconds per GPU, both holding the lock. MIXRUN_HANG_S=RUNNING[,LOADING] overrides both (tests use
# seconds); the beat is then a tenth of RUNNING. A rank whose main thread hangs while its heartbeat thread runs (a
# GPU that never finishes a kernel) is left to the process group's collective timeout (the job's ``timeout_s``).
HEARTBEAT_S = 1.0
HUNG_S = 10.0
HUNG_LOADING_S = 60.0
HANG_ENV = "MIXRUN_HANG_S"


def hang_bounds() -> tuple[float, float, float]:
    """(heartbeat interval, silence that marks a ready rank hung, the same before it is ready), in seconds."""
    raw = os.environ.get(HANG_ENV, "").strip()
    if not raw:
        return HEARTBEAT_S, HUNG_S, HUNG_LOADING_S
    try:
        nums = [float(x) for x in raw.split(",")]
    except ValueError:
        nums = []
    if len(nums) not in (1, 2) or min(nums) <= 0:
        raise MixrunError(f"{HANG_ENV}={raw}: expected RUNNING or RUNNING,LOADING seconds (e.g. 10,60)")
    running = nums[0]
    return min(HEARTBEAT_S, running / 10), running, nums[-1] if len(nums) == 2 else max(running, HUNG_LOADING_S)


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
    ready: bool = False  # said ready: loaded, past the first barrier
    seen: float = 0.0  # time.monotonic() of its last message (heartbeats included)


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
    hang: tuple[float, float, float] = field(default_factory=hang_bounds)  # see hang_bounds
    _halt: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        from mixrun.backends.torch.parallel import Layout

        self.driver = Layout.from_json(self.job["layout"]).driver
        threading.Thread(target=self._watch, daemon=True, name="mixrun-watch").start()

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
            slot.channel, slot.pid, slot.seen = ch, int(hello.get("pid", 0)) or None, time.monotonic()
            ch.send({"rank": slot.rank, "world": len(self.slots), "init": self.init, "job": self.job,
                     "heartbeat_s": self.hang[0]})
            threading.Thread(target=self._read, args=(slot,), daemon=True, name=f"mixrun-rank{slot.rank}").start()

    def _read(self, slot: Slot) -> None:
        assert slot.channel is not None
        while True:
            try:
                msg = slot.channel.recv()
            except (OSError, ValueError):
                msg = None
            slot.seen = time.monotonic()
            if msg is not None and "hb" in msg:
                continue  # absorbed here: nobody reads events while a chat waits for its user
            if msg is not None and "ready" in msg:
                slot.ready = True
            self.events.put(Event(slot.rank, msg))
            if msg is None:
                return

    def _watch(self) -> None:
        """Post a ``hung`` event for each connected rank silent past its bound (``next_event`` raises it)."""
        beat, running, loading = self.hang
        last = time.monotonic()
        while not self._halt.wait(beat):
            now = time.monotonic()
            if now - last > 2 * beat + 1.0:
                # this process did not run (stopped with Ctrl-Z, the machine asleep): the ranks' silence is ours;
                # give the readers a full bound to catch up with the heartbeats waiting in the sockets
                for s in self.slots:
                    s.seen = max(s.seen, now)
            last = now
            for s in self.slots:
                silent = now - s.seen
                if s.channel is not None and not s.done and s.seen and silent > (running if s.ready else loading):
                    s.seen = 0.0  # posted once
                    self.events.put(Event(s.rank, {"hung": silent}))

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
            if "hung" in ev.msg:
                if slot.done:
                    continue
                raise self.fail(f"rank {ev.rank} ({slot.device_id}) stopped answering for {ev.msg['hung']:.0f} s: "
                                "stopped every rank")
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
        local processes that are still there (with SIGCONT, so a stopped one takes its SIGTERM now), the ranks our
        own ``torchrun`` launchers started included: a stopped one ignores its launcher's SIGTERM, and would be
        left behind, stopped, when the launcher dies."""
        self._halt.set()
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
        launchers = {p.pid for k, p in self.procs.items() if k < 0 and p.poll() is None}
        spawned = [s.pid for s in self.slots if s.pid and launchers and _parent(s.pid) in launchers]
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                    proc.send_signal(signal.SIGCONT)
        for pid in spawned:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        for pid in spawned:
            while time.monotonic() < deadline and _parent(pid) is not None:
                time.sleep(0.05)
            if _parent(pid) is not None:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        for s in self.slots:
            if s.channel is not None:
                s.channel.close()
        with contextlib.suppress(OSError):
            self.server.close()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def _parent(pid: int) -> int | None:
    """The parent of live process ``pid`` (Linux ``/proc``); None once it has exited (a zombie included) or where
    ``/proc`` cannot say."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    state, ppid = (stat[stat.rfind(")") + 2:].split() + ["", ""])[:2]  # after "pid (name) ": state, ppid
    return int(ppid) if state not in ("Z", "X", "") and ppid.isdigit() else None


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
    cuda_order_env(env)  # cuda:k is the profile's k-th GPU of the host (engine.torch_devices)
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

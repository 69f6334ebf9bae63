"""The control channel between the controller (the ``mixrun`` process) and each rank: JSON lines over TCP.

JSON, never pickle: on several hosts the channel crosses a network. Every rank holds one connection; a connection
that closes without a ``bye`` means the rank died, which is how a SIGKILLed rank is noticed on any host. A rank whose
controller goes away (or says ``abort``) exits at once, so no process outlives a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import threading
import time
from typing import Any

MAX_LINE = 64 << 20  # a logits reply for a few positions is the largest message


class Channel:
    """One JSON-lines connection. ``send`` is thread-safe; ``lines`` yields decoded messages until EOF."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._file = sock.makefile("rb")
        self._lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self.sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        line = self._file.readline(MAX_LINE + 1)
        if not line:
            return None
        if len(line) > MAX_LINE:
            raise ValueError("control message too long")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError("control message is not an object")
        return msg

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


def connect(address: str, timeout_s: float = 60.0) -> Channel:
    """Connect to the controller at ``host:port``, retrying while it starts."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Channel(socket.create_connection((host, int(port)), timeout=None))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class RankLink:
    """A rank's end: commands for the driver arrive in ``commands``; ``abort`` or a lost controller ends the process
    (``os._exit``: a rank stuck in a collective cannot be unwound any other way). From the job on, a thread sends
    ``{"hb": 1}`` every ``heartbeat_s`` seconds (the job message names the interval): the controller declares a rank
    that falls silent hung. A stopped process (SIGSTOP) or one whose main thread holds the interpreter stops its
    heartbeats too; a rank merely waiting in a collective or computing does not (waits and torch operations release
    the interpreter lock)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.commands: queue.Queue[dict[str, Any]] = queue.Queue()
        self.first: dict[str, Any] | None = None
        self._got_first = threading.Event()
        threading.Thread(target=self._read, name="mixrun-control", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.channel.recv()
            except (OSError, ValueError):
                msg = None
            if msg is None or msg.get("op") == "abort":
                os._exit(3)
            if not self._got_first.is_set():
                self.first = msg
                self._got_first.set()
                beat = float(msg.get("heartbeat_s") or 0)
                if beat > 0:
                    threading.Thread(target=self._beat, args=(beat,), name="mixrun-heartbeat", daemon=True).start()
            else:
                self.commands.put(msg)

    def _beat(self, every_s: float) -> None:
        while True:
            time.sleep(every_s)
            self.send({"hb": 1})

    def wait_first(self, timeout_s: float) -> dict[str, Any]:
        if not self._got_first.wait(timeout_s):
            raise TimeoutError("the controller sent no job")
        assert self.first is not None
        return self.first

    def send(self, msg: dict[str, Any]) -> None:
        try:
            self.channel.send(msg)
        except OSError:
            os._exit(3)

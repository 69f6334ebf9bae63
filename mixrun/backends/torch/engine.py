"""The torch backend's Engine: llama.cpp's tokenizer and the shared sandboxed template in this process, the model
in rank processes that run the plan's layout.

A turn sends the driver only the tokens past what the ranks' KV caches already hold (the common prefix with what
was fed before), so follow-up questions prefill only the new turn, as with llama.cpp.
"""

from __future__ import annotations

import base64
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from mixrun.backends.base import EngineInfo, Sampling, Stats
from mixrun.backends.text import Vocab, stream_text, without_chat_handlers
from mixrun.errors import GGUFError, MixrunError, where
from mixrun.rig.sampler import DeviceSampler
from mixrun.telemetry import LinkSample, Snapshot, StageSample, now
from mixrun.vocab import BACKEND_ARCHS, Backend


def torch_devices(layout: Any, profile: Any, simulate: bool) -> list[tuple[str, str, int, str]]:
    """(device id, host, index on that host, torch device) per global rank. GPUs of a host are numbered in the
    profile's order (``cuda:k`` is the host's k-th GPU); with ``simulate`` every rank is a CPU process."""
    out = []
    per_host: dict[str, int] = {}
    for dev_id in layout.devices():
        dev = profile.device(dev_id) if profile is not None else None
        host_obj = profile.host_of(dev) if dev is not None else None
        multi = profile is not None and len(profile.hosts) > 1
        host = host_obj.id if (host_obj is not None and multi) else ""
        local = per_host.get(host, 0)
        per_host[host] = local + 1
        if simulate or dev is None or dev.backend == "cpu":
            out.append((dev_id, host, local, "cpu"))
        else:
            gpus = [d.id for d in profile.host_gpus(dev)]
            out.append((dev_id, host, local, f"cuda:{gpus.index(dev_id)}"))
    return out


class TorchEngine:
    def __init__(self, model: str, n_ctx: int = 4096, n_threads: int | None = None, seed: int | None = None,
                 plan: Any = None, simulate: bool = False, profile: Any = None, layout: Any = None,
                 dtype: str | None = None, debug: bool = False, show_progress: bool = True,
                 advertise_address: str | None = None, weights: str | None = None, cuda_graphs: bool = True,
                 prefill_chunk: int | None = None) -> None:
        from mixrun.backends.llamacpp_cpu import finding

        if finding().missing:  # llama.cpp tokenizes for this backend too: a build for another CPU dies on import
            finding().require_usable()
        import llama_cpp

        self._sampler: DeviceSampler | None = None
        from mixrun.backends.torch.launch import Slot, start_hosts, start_local
        from mixrun.backends.torch.parallel import Layout, Stage
        from mixrun.model.gguf import read_spec

        if not os.path.isfile(model):
            raise GGUFError(where(model, "no such file"))
        spec = read_spec(model)
        if spec.arch not in BACKEND_ARCHS[Backend.TORCH]:
            runs = ", ".join(sorted(BACKEND_ARCHS[Backend.TORCH]))
            raise MixrunError(f"{model}: the torch backend runs {runs} models, not {spec.arch}")
        if layout is None:
            if plan is not None and plan.backend.value == "torch":
                layout = Layout.from_groups(plan.groups, spec.n_head_kv)
            else:
                layout = Layout((Stage(("cpu",), (0, spec.n_layers), (spec.n_head_kv,)),))
        placed = torch_devices(layout, profile, simulate)
        if any(dev.startswith("cuda") for *_x, dev in placed):
            import torch

            if not torch.cuda.is_available():
                gpus = [d for d, *_r, dev in placed if dev.startswith("cuda")]
                raise MixrunError(f"this plan runs on GPUs ({', '.join(gpus)}) and this machine has no CUDA device: "
                                  "--simulate runs it on CPU processes")
        self.layout = layout
        self.slots = [Slot(r, d, h, k, dev) for r, (d, h, k, dev) in enumerate(placed)]
        cores = os.cpu_count() or 1
        threads = n_threads or max(1, cores // len(self.slots))
        job = {"model": os.path.abspath(model), "layout": layout.to_json(), "devices": [s.torch_device for s in self.slots],
               "n_ctx": n_ctx, "threads": threads, "dtype": dtype, "timeout_s": 300,
               "weights": weights, "cuda_graphs": cuda_graphs,
               "prefill_chunk": prefill_chunk}
        from llama_cpp._utils import suppress_stdout_stderr

        # llama.cpp warns about the vocab-only context's size; llama-cpp-python's own template compiler is not used
        try:
            with suppress_stdout_stderr(disable=False), without_chat_handlers(llama_cpp):
                self._vocab_llm = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False, n_ctx=n_ctx)
        except ValueError as e:  # llama-cpp-python raises ValueError("Failed to load model from file: ...")
            raise GGUFError(where(model, f"llama.cpp could not load its vocabulary ({e})")) from None
        self.vocab = Vocab(self._vocab_llm, model)
        self.template = self.vocab.template
        self._eog = self.vocab.eog_ids()
        notes = []
        if simulate:
            notes.append(f"--simulate: {len(self.slots)} CPU processes stand in for "
                         f"{', '.join(layout.devices())}")
        self.info = EngineInfo(backend="torch", model=model, n_ctx=n_ctx, notes=notes, plan=plan)
        hosts = list(dict.fromkeys(s.host for s in self.slots))
        if len(hosts) > 1:
            # --simulate: every host's torchrun on loopback; else this machine is the plan's first host
            advertise = "127.0.0.1" if simulate else (advertise_address or socket.getfqdn())
            self.cluster = start_hosts(self.slots, job, advertise=advertise, debug=debug,
                                       run_here=hosts if simulate else hosts[:1],
                                       announce=lambda m: print(f"mixrun: {m}", file=sys.stderr, flush=True))
            self.info.notes.append(f"ranks on {len(hosts)} hosts, started with torchrun (c10d rendezvous)")
        else:
            self.cluster = start_local(self.slots, job, debug=debug)
        self._lock = threading.Lock()
        self._busy = False
        self._fed: list[int] = []
        self._tokens_total = 0
        self._last = Stats()
        self._wait_ready(show_progress)
        self._note_weight_memory(plan)
        self.info.notes.extend(r["note"] for r in self.ready.values() if r.get("note"))

    # ---- start-up ----

    def _wait_ready(self, show_progress: bool) -> None:
        ready: set[int] = set()
        self.ready: dict[int, dict[str, Any]] = {}
        shown = -1
        tty = sys.stderr.isatty() and show_progress
        try:
            while len(ready) < len(self.slots):
                ev = self.cluster.next_event(0.25)
                if ev is not None and ev.msg and "ready" in ev.msg:
                    ready.add(ev.rank)
                    self.ready[ev.rank] = ev.msg["ready"]
                pct = int(100 * sum(self.cluster.progress.values()) / len(self.slots))
                if tty and pct != shown:
                    sys.stderr.write(f"\r\x1b[2mloading {len(self.slots)} ranks {pct:3d}%\x1b[0m")
                    sys.stderr.flush()
                    shown = pct
        except BaseException:
            self.cluster.stop(graceful=False)
            raise
        finally:
            if tty and shown >= 0:
                sys.stderr.write("\r\x1b[2K")

    def _note_weight_memory(self, plan: Any) -> None:
        """The planner counts torch weights in GGUF quant blocks, which GPU ranks keep; CPU ranks (``--simulate``)
        dequantize to float32. Say so when a device holds more than the plan counted."""
        if plan is None:
            return
        planned = {d.id: d.weights_bytes for d in plan.devices}
        over = [(s.device_id, self.ready[s.rank]["weight_bytes"], planned[s.device_id]) for s in self.slots
                if s.device_id in planned and self.ready.get(s.rank, {}).get("weight_bytes", 0) > 1.1 * planned[s.device_id]]
        if over:
            dev, have, want = max(over, key=lambda o: o[1] / max(o[2], 1))
            self.info.notes.append(f"CPU ranks hold weights dequantized to float32: {dev} holds {have / 2**30:.2f} "
                                   f"GiB where the plan counted {want / 2**30:.2f} GiB in GGUF blocks")

    # ---- the Engine protocol ----

    def count_tokens(self, text: str) -> int:
        return len(self.vocab.tokenize(text))

    def generate(self, prompt: str, sampling: Sampling, stats: Stats) -> Iterator[str]:
        ids = self.vocab.prompt_tokens(prompt)
        stats.prompt_tokens = len(ids)
        room = self.info.n_ctx - len(ids)
        if room <= 0:
            stats.stop_reason = "context full"
            return
        limit = min(sampling.max_tokens, room)
        gen = self.generate_ids(ids, sampling, max_new=limit)
        try:
            yield from stream_text(gen, self.vocab, sampling, stats, limit)
        finally:
            gen.close()  # cancels on the ranks if the answer stopped early
            self._tokens_total += stats.completion_tokens
            self._last = stats

    def generate_ids(self, ids: list[int], sampling: Sampling, max_new: int | None = None) -> Iterator[int]:
        """Token ids as the driver samples them (an end-of-generation token last, if one comes). Closing the
        iterator early cancels the generation on the ranks."""
        p = 0
        while p < min(len(ids), len(self._fed)) and ids[p] == self._fed[p]:
            p += 1
        p = min(p, len(ids) - 1)  # at least one token runs, to give logits
        s = {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
             "min_p": sampling.min_p, "repeat_penalty": sampling.repeat_penalty, "seed": sampling.seed}
        got: list[int] = []
        done = False
        with self._lock:
            self._busy = True
        try:
            self.cluster.send_driver({"op": "generate", "tokens": ids[p:], "pos": p, "sampling": s, "max_new": max_new or sampling.max_tokens,
                                      "stop_ids": self._eog})
            while True:
                # no deadline of its own: next_event raises once a rank errs, dies or stops sending heartbeats
                # (launch.HUNG_S), which a long prefill or a slow step does not do
                ev = self.cluster.next_event(1.0)
                if ev is None:
                    continue
                if "done" in ev.msg:
                    done = True
                    return
                if "token" in ev.msg:
                    got.append(int(ev.msg["token"]))
                    yield got[-1]
        finally:
            if not done and self.cluster is not None and self.cluster.failed is None:
                self._drain(got)
            self._fed = ids + got[:-1]
            with self._lock:
                self._busy = False

    def _drain(self, got: list[int]) -> None:
        """Cancel the generation and take the tokens already in flight (they are in the KV cache)."""
        self.cluster.send_driver({"op": "cancel"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ev = self.cluster.next_event(0.5)
            if ev is None:
                continue
            if "token" in ev.msg:
                got.append(int(ev.msg["token"]))
            elif "done" in ev.msg:
                return
        raise self.cluster.fail("the driver did not stop a generation within 30 s")

    def logits(self, tokens: list[int], pos: int = 0) -> Any:
        """Logits of every position of ``tokens`` fed at ``pos`` (float32, (T, vocab)): for the proofs."""
        import numpy as np

        from mixrun.backends.torch.control import MAX_LINE

        reply = len(tokens) * self.vocab.llm.n_vocab() * 4 * 4 // 3  # base64 of float32
        if reply > MAX_LINE:
            raise MixrunError(f"logits of {len(tokens)} positions ({reply >> 20} MiB) exceed the control channel's "
                              f"{MAX_LINE >> 20} MiB: ask for fewer positions")
        self.cluster.send_driver({"op": "logits", "tokens": tokens, "pos": pos})
        while True:
            ev = self.cluster.next_event(1.0)
            if ev is not None and "logits" in ev.msg:
                arr = np.frombuffer(base64.b64decode(ev.msg["logits"]), dtype=np.float32)
                self._fed = self._fed[:pos] + list(tokens)
                return arr.reshape(ev.msg["shape"])

    def sync_telemetry(self, timeout_s: float = 5.0) -> dict[int, dict[str, Any]]:
        """Wait until every rank has reported after the same number of steps; the per-rank counters."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._busy:
                    self.cluster.next_event(0.05)
            tele = self.cluster.tele
            if len(tele) == len(self.slots) and len({t["steps"] for t in tele.values()}) == 1:
                break
        return dict(self.cluster.tele)

    def telemetry(self) -> Snapshot:
        with self._lock:
            if not self._busy:
                self.cluster.next_event(0.0)
        if self._sampler is None:
            pids = {}
            for s in self.slots:
                proc = self.cluster.procs.get(s.rank)
                if proc is not None and s.torch_device == "cpu":
                    pids.setdefault(s.device_id, []).append(proc.pid)
            cuda = {s.device_id: int(s.torch_device.split(":")[1]) for s in self.slots
                    if s.torch_device.startswith("cuda")}
            self._sampler = DeviceSampler(cuda_index=cuda, pids=pids)
        tele = self.cluster.tele
        stages, links = [], []
        lay = self.layout
        for i, st in enumerate(lay.stages):
            ranks = lay.ranks(i)
            last_s = max((tele.get(r, {}).get("last_step_s", 0.0) for r in ranks), default=0.0)
            total_s = max((tele.get(r, {}).get("compute_s", 0.0) for r in ranks), default=0.0)
            stages.append(StageSample(st.devices, st.layers, last_s, total_s))
            allreduced = sum(tele.get(r, {}).get("layer_allreduce_bytes", 0) for r in ranks) // st.tp
            links += [LinkSample((a, b), "tp", allreduced) for a, b in zip(st.devices, st.devices[1:], strict=False)]
            if len(lay.stages) > 1:  # a stage's first rank hands on (the driver: embeddings to the first stage)
                nxt = lay.stages[(i + 1) % len(lay.stages)]
                sent = tele.get(ranks[0], {}).get("sent_bytes", 0)
                links.append(LinkSample((st.devices[0], nxt.devices[0]), "pipeline", sent))
        plan, last = self.info.plan, self._last
        return Snapshot(t=now(), backend="torch", tokens_total=self._tokens_total,
                        decode_tok_s=last.decode_tok_s or None, prefill_tok_s=last.prefill_tok_s or None,
                        predicted_decode_tok_s=plan.decode_tok_s if plan else None,
                        predicted_prefill_tok_s=plan.prefill_tok_s if plan else None,
                        devices=self._sampler.sample(), links=tuple(links), stages=tuple(stages))

    def close(self) -> None:
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            self.cluster = None
            cluster.stop(graceful=True)
        if self._sampler is not None:
            self._sampler.close()
        llm = getattr(self, "_vocab_llm", None)
        if llm is not None:
            self._vocab_llm = None
            llm.close()


"""One rank of the torch backend: ``python -m mixrun.backends.torch.worker --control HOST:PORT``.

Started by the controller (one process per planned device) or by ``torchrun`` on another host. The rank says hello
on the control channel, gets its global rank, the process-group address and the job (model, layout, devices),
builds and loads only its part of the model, then runs steps the driver (the last stage's first rank) broadcasts.

A step: the last stage embeds the tokens (vocab-parallel) and hands the hidden states to the first stage; each
stage runs its layers (TP inside the stage, all-reduce after row-parallel linears) and hands on; the last stage
computes logits (vocab-parallel, gathered) and the driver samples. The next token goes round again.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

OP_SHUTDOWN, OP_STEP, OP_END = 0, 1, 2
TELEMETRY_EVERY_S = 0.5
PREFILL_CHUNK = 512  # tokens per pipelined prefill chunk (llama.cpp's default ubatch)


def rss_anon_bytes() -> int | None:
    """Anonymous resident memory (Linux ``RssAnon``): the weights and caches this process allocated, without the
    file pages the memory map brought in."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Rank:
    """A rank's model part, groups and counters; ``step`` is the same code on every rank."""

    def __init__(self, rank: int, world: int, job: dict[str, Any], link: Any) -> None:
        import torch
        import torch.distributed as dist

        from mixrun.backends.torch import weights
        from mixrun.backends.torch.linear import fused_kernels
        from mixrun.backends.torch.model import ModelConfig
        from mixrun.backends.torch.parallel import Comm, Layout, vocab_sizes
        from mixrun.model.gguf import TensorFile

        self.torch, self.dist, self.link, self.rank, self.world = torch, dist, link, rank, world
        self.layout = Layout.from_json(job["layout"])
        self.stage_idx, self.member = self.layout.locate(rank)
        self.stage = self.layout.stages[self.stage_idx]
        self.last = len(self.layout.stages) - 1
        dev = job["devices"][rank]
        self.device = torch.device(dev)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # every rank creates every group, in the same order
        self.ctrl = dist.new_group(list(range(world)), backend="gloo") if self.device.type == "cuda" else None
        groups = [dist.new_group(self.layout.ranks(i)) if s.tp > 1 else None
                  for i, s in enumerate(self.layout.stages)]
        self.comm = Comm(groups[self.stage_idx], self.stage.tp)
        self.dtype = getattr(torch, job.get("dtype") or ("float32" if self.device.type == "cpu" else "bfloat16"))
        # GPUs keep quantized matrices in their GGUF blocks (what the planner counts); CPU ranks dequantize them
        # once, as a decode step on the CPU cannot afford to dequantize every matrix again
        self.blocks = (job.get("weights") or ("dense" if self.device.type == "cpu" else "blocks")) == "blocks"

        rss0 = rss_anon_bytes()
        tf = TensorFile(job["model"])
        self.cfg = cfg = ModelConfig.from_gguf(tf.spec, tf.fields)
        self.layout.check(cfg)
        t0, last_sent = time.monotonic(), 0.0

        def progress(done: int, total: int) -> None:
            nonlocal last_sent
            now = time.monotonic()
            if now - last_sent > 0.25 or done == total:
                last_sent = now
                link.send({"progress": done / total if total else 1.0, "rank": rank})

        model, self.weight_bytes = weights.build_part(
            tf, cfg, self.stage, self.member, self.comm, head=self.stage_idx == self.last, max_pos=int(job["n_ctx"]),
            dtype=self.dtype, device=self.device, blocks=self.blocks, progress=progress)
        del tf
        self.model = model
        self.prefill_chunk = max(1, int(job.get("prefill_chunk") or PREFILL_CHUNK))
        self.graphed = None
        self.notes: list[str] = []
        self.fused = self.blocks and fused_kernels(self.device) is not None
        if self.blocks and self.device.type == "cuda" and not self.fused:
            self.notes.append(f"no Triton on rank {rank}: its quantized matrices are expanded by torch operations "
                              f"before every product (slower decode)")
        # a mixture of experts chooses its experts on the host (data-dependent control flow: nothing to capture)
        if self.device.type == "cuda" and self.stage.tp == 1 and job.get("cuda_graphs", True) and not cfg.n_expert:
            from mixrun.backends.torch.graphs import GraphedStep

            try:
                self.graphed = GraphedStep(model, self.dtype, self.device, logits=self.stage_idx == self.last)
            except Exception as e:  # eager steps still work; say why
                self.notes.append(f"CUDA graph capture failed on rank {rank}, decoding eagerly: {e}")
        self.vocab = vocab_sizes(cfg, self.stage) if self.stage_idx == self.last else []
        self.load_s = time.monotonic() - t0
        self.rss_anon_load_bytes = rss_anon_bytes() - rss0 if rss0 is not None else None
        self.sent_bytes = 0
        self.compute_s = 0.0
        self.last_step_s = 0.0
        self.steps = 0
        self._tele_at = 0.0

    # ---- every rank ----

    def header(self, values: list[int] | None = None) -> list[int]:
        if self.world == 1:
            assert values is not None
            return values
        t = self.torch.tensor(values or [0, 0, 0, 0], dtype=self.torch.long)
        self.dist.broadcast(t, src=self.layout.driver, group=self.ctrl)
        return t.tolist()

    def tokens(self, ids: list[int] | None, n: int) -> Any:
        if self.world == 1:
            return self.torch.tensor(ids, dtype=self.torch.long)
        t = self.torch.tensor(ids, dtype=self.torch.long) if ids is not None else self.torch.empty(n, dtype=self.torch.long)
        self.dist.broadcast(t, src=self.layout.driver, group=self.ctrl)
        return t

    def step(self, ids: Any, pos: int, all_logits: bool) -> Any:
        """Run tokens ``ids`` at positions ``[pos, pos + T)``; the last stage returns the gathered logits (every
        row with ``all_logits``, else the last). A long prompt goes through in chunks of ``prefill_chunk`` tokens,
        as llama.cpp's ubatches: attention's scores then take chunk x context floats a head, what the planner's
        compute buffer counts, not prompt x context (32 heads over an 8k prompt would be 8.6 GB). With several
        stages, stage k works on chunk i while stage k+1 works on chunk i-1 (the planner's pipelined prefill); the
        embeddings go to the first stage in one message first, so no two stages ever wait on each other's sends."""
        torch, dist, lay = self.torch, self.dist, self.layout
        n_stages, T = len(lay.stages), ids.numel()
        first, last = self.stage_idx == 0, self.stage_idx == self.last
        size = self.prefill_chunk
        chunks = [(o, min(size, T - o)) for o in range(0, T, size)]
        emb = None
        parts = []
        compute_s = 0.0
        with torch.inference_mode():
            if last:
                emb = self.comm.all_reduce(self.model.embed_tokens(ids.to(self.device)).to(self.dtype), layer=False)
                if n_stages > 1 and self.member == 0:
                    self._send(emb, lay.ranks(0))
            if first and n_stages > 1:
                emb = torch.empty(T, self.cfg.dim, dtype=self.dtype, device=self.device)
                dist.recv(emb, src=lay.driver)
            for i, (off, n) in enumerate(chunks):
                if first or n_stages == 1:
                    h = emb.narrow(0, off, n)
                else:
                    h = torch.empty(n, self.cfg.dim, dtype=self.dtype, device=self.device)
                    dist.recv(h, src=lay.first_rank(self.stage_idx - 1))
                t0 = time.perf_counter()
                graphed = self.graphed is not None and T == 1
                h = self.graphed(h, pos) if graphed else self.model(h, pos + off)  # a last stage's graph: logits
                if not last:
                    self._sync()
                    compute_s += time.perf_counter() - t0
                    if self.member == 0:
                        self._send(h, lay.ranks(self.stage_idx + 1))
                    continue
                if graphed:
                    parts.append(h.clone())
                elif all_logits:
                    parts.append(self.model.logits(h))
                elif i == len(chunks) - 1:
                    parts.append(self.model.logits(h[-1:]))
                self._sync()
                compute_s += time.perf_counter() - t0
            out = None
            if last:
                out = self.comm.gather_vocab(parts[0] if len(parts) == 1 else torch.cat(parts), self.vocab)
        self.last_step_s = compute_s
        self.compute_s += compute_s
        self.steps += 1
        if time.monotonic() - self._tele_at > TELEMETRY_EVERY_S:
            self.telemetry()
        return out

    def _send(self, h: Any, ranks: list[int]) -> None:
        for r in ranks:
            self.dist.send(h.contiguous(), dst=r)
            self.sent_bytes += h.numel() * h.element_size()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def telemetry(self) -> None:
        self._tele_at = time.monotonic()
        mem = None
        if self.device.type == "cuda":
            mem = int(self.torch.cuda.memory_allocated(self.device))
        self.link.send({"tele": {"rank": self.rank, "steps": self.steps, "compute_s": self.compute_s,
                                 "last_step_s": self.last_step_s, "layer_allreduce_bytes": self.comm.layer_bytes,
                                 "vocab_bytes": self.comm.vocab_bytes, "sent_bytes": self.sent_bytes,
                                 "weight_bytes": self.weight_bytes, "cuda_allocated_bytes": mem}})

    def serve(self) -> None:
        """Follow the driver's headers until shutdown."""
        while True:
            op, n, pos, flags = self.header()
            if op == OP_SHUTDOWN:
                return
            if op == OP_END:
                self.telemetry()
                continue
            self.step(self.tokens(None, n), pos, bool(flags & 1))

    # ---- the driver ----

    def drive(self) -> None:
        torch = self.torch
        while True:
            cmd = self.link.commands.get()
            op = cmd.get("op")
            if op == "shutdown":
                self.header([OP_SHUTDOWN, 0, 0, 0])
                return
            if op == "logits":
                ids, pos = [int(t) for t in cmd["tokens"]], int(cmd["pos"])
                self.header([OP_STEP, len(ids), pos, 1])
                out = self.step(self.tokens(ids, len(ids)), pos, True).float().cpu().numpy()
                self.header([OP_END, 0, 0, 0])
                self.telemetry()
                self.link.send({"logits": base64.b64encode(out.tobytes()).decode(), "shape": list(out.shape)})
            elif op == "generate":
                self.generate(cmd, torch)
            elif op == "cancel":
                continue  # arrived after its generation ended

    def generate(self, cmd: dict[str, Any], torch: Any) -> None:
        from mixrun.backends.torch.sampling import Sampler

        ids, pos = [int(t) for t in cmd["tokens"]], int(cmd["pos"])
        stop_ids = {int(t) for t in cmd.get("stop_ids", [])}
        max_new = int(cmd["max_new"])
        # a new chain per generation, as llama-cpp-python's Llama.generate builds: its repeat-penalty window holds only
        # the tokens sampled here (never the prompt) and its seed starts over
        sampler = Sampler(cmd.get("sampling") or {})
        max_pos = self.model.max_pos
        self.header([OP_STEP, len(ids), pos, 0])
        logits = self.step(self.tokens(ids, len(ids)), pos, False)[-1]
        pos += len(ids)
        reason = "length"
        for i in range(max_new):
            tok = sampler.sample(logits)  # accepted into the penalty window
            self.link.send({"token": tok})
            if tok in stop_ids:
                reason = "eos"
                break
            if i == max_new - 1:
                break
            if pos >= max_pos:
                reason = "context full"
                break
            if self._cancelled():
                reason = "cancelled"
                break
            self.header([OP_STEP, 1, pos, 0])
            logits = self.step(self.tokens([tok], 1), pos, False)[-1]
            pos += 1
        self.header([OP_END, 0, 0, 0])
        self.telemetry()
        self.link.send({"done": reason})

    def _cancelled(self) -> bool:
        import queue

        try:
            cmd = self.link.commands.get_nowait()
        except queue.Empty:
            return False
        if cmd.get("op") == "cancel":
            return True
        self.link.commands.put(cmd)  # not for now: keep it
        return False


def run(args: argparse.Namespace) -> int:
    from mixrun.backends.torch.control import RankLink, connect

    link = RankLink(connect(args.control))
    local_rank = args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
    link.send({"hello": {"host": args.host_id, "local_rank": local_rank, "pid": os.getpid(),
                         "hostname": socket.gethostname()}})
    try:
        first = link.wait_first(600)
        rank, world, job = int(first["rank"]), int(first["world"]), first["job"]
        if job.get("threads"):
            import torch

            torch.set_num_threads(int(job["threads"]))
        import torch.distributed as dist

        backend = "nccl" if job["devices"][rank].startswith("cuda") else "gloo"
        timeout = timedelta(seconds=float(job.get("timeout_s", 300)))
        init = str(first["init"])
        if init.startswith("store://"):  # the controller holds the store (several hosts)
            host, _, port = init.removeprefix("store://").rpartition(":")
            store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=timeout)
        r = Rank(rank, world, job, link)
        dist.barrier(group=r.ctrl)
        link.send({"ready": {"rank": rank, "load_s": r.load_s, "weight_bytes": r.weight_bytes,
                             "rss_anon_load_bytes": r.rss_anon_load_bytes, "cuda_graph": r.graphed is not None,
                             "fused_kernels": r.fused, "note": "; ".join(r.notes),
                             "cpu_matvec": r.model.matvec.to_json() if r.model.matvec is not None else None}})
        if rank == r.layout.driver:
            r.drive()
        else:
            r.serve()
        r.telemetry()
        dist.destroy_process_group()
        link.send({"bye": rank})
        return 0
    except BaseException as e:  # report, then leave at once: peers may be blocked in a collective with us
        from mixrun.errors import MixrunError

        msg = str(e) if isinstance(e, MixrunError) else f"{type(e).__name__}: {e}"
        link.send({"error": msg, "trace": traceback.format_exc()})
        sys.stderr.flush()
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the controller, which stops every rank
    p = argparse.ArgumentParser(prog="mixrun-worker")
    p.add_argument("--control", required=True, help="controller address HOST:PORT")
    p.add_argument("--host-id", default="", help="which host of the profile this is")
    p.add_argument("--local-rank", type=int, default=None, help="index among this host's ranks (torchrun: LOCAL_RANK)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""Planner speed: a full ``plan()`` (every candidate, search and exact DP) on an 8-GPU rig and on 64 GPUs over 8
hosts, for a Llama-3-70B-shaped Q4_K_M spec, against a one-device rig as the reference measured in the same run.

Usage: python benchmarks/planner_speed.py [--repeats N]
Bars (issue 3): <= 50 ms for 8 devices, <= 1 s for 64 devices over 8 hosts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import gguf_factory  # noqa: E402
from mixrun.model.gguf import read_spec  # noqa: E402
from mixrun.planner import PlanRequest, plan  # noqa: E402
from mixrun.rig.profile import FORMAT, Device, Host, Link, RigProfile, load_profile  # noqa: E402


def many_hosts(n_hosts: int = 8, per_host: int = 8) -> RigProfile:
    """n_hosts HGX boxes of per_host H100 SXM on NVSwitch, joined by 100 Gb/s networking."""
    hosts, devices, links = [], [], []
    for h in range(n_hosts):
        hid = f"h{h}"
        hosts.append(Host(id=hid, ram_gib=2048, cpu_cores=112, pcie_gbs=50.0, network_gbps=100.0))
        ids = [f"{hid}.gpu{i}" for i in range(per_host)]
        devices += [Device(id=i, host=hid, backend="cuda", name="NVIDIA H100 80GB HBM3", vram_gib=79.6,
                           mem_bandwidth_gbs=3350.0, fp16_tflops=989.0) for i in ids]
        devices.append(Device(id=f"{hid}.cpu", host=hid, backend="cpu", name="Xeon", vram_gib=2048.0,
                              reserved_gib=16.0, mem_bandwidth_gbs=300.0, fp16_tflops=5.0))
        links += [Link(between=(a, b), kind="nvswitch", bandwidth_gbs=450.0, latency_us=6.0)
                  for k, a in enumerate(ids) for b in ids[k + 1:]]
    return RigProfile(format=FORMAT, name="64x-h100-8-hosts", hosts=tuple(hosts), devices=tuple(devices),
                      links=tuple(links))


def time_plan(profile: RigProfile, spec, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan(profile, spec, PlanRequest(ctx=4096))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = gguf_factory.write_model(Path(tmp) / "l70.gguf", "llama", qtype="Q4_K_M", sparse=True,
                                        **gguf_factory.LLAMA3_70B)
        spec = read_spec(path)
    rigs = [("dual-3090-nvlink-plus-3060 (4 devices, reference)", load_profile("dual-3090-nvlink-plus-3060")),
            ("8x-h100-sxm (9 devices)", load_profile("8x-h100-sxm")),
            ("64 H100 over 8 hosts (72 devices)", many_hosts()),
            ("cpu-only: nothing fits, suggestions re-plan", load_profile("cpu-only"))]
    ref = None
    print(f"{'rig':50} {'median ms':>10} {'x reference':>12}")
    for name, prof in rigs:
        s = time_plan(prof, spec, args.repeats)
        ref = ref or s
        print(f"{name:50} {s * 1e3:10.1f} {s / ref:12.1f}")


if __name__ == "__main__":
    main()

"""Hardware discovery: the CPU host here, and NVML logic against a fake NVML of a 2x3090 NVLink + 3060 rig."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from mixrun.backends.torch.launch import worker_env
from mixrun.cli import main
from mixrun.rig.discover import detect, normalize_bus_id
from mixrun.rig.probe import Nvml, cuda_order_env
from mixrun.rig.profile import load_profile_file
from mixrun.rig.sampler import DeviceSampler
from mixrun.run import free_memory


class FakeNVML:
    """Just enough of pynvml: three GPUs, gpu0 and gpu1 joined by four NVLink links."""

    NVML_CLOCK_MEM, NVML_CLOCK_SM, NVML_FEATURE_ENABLED, NVML_NVLINK_MAX_LINKS = 2, 1, 1, 12
    NVML_NVLINK_DEVICE_TYPE_GPU, NVML_NVLINK_DEVICE_TYPE_SWITCH = 0, 2
    GPUS = [  # name, GiB, NVML bus id, mem clock MHz, bus bits, cores, SM MHz, cc, pcie gen, width, nvlink peer
        ("NVIDIA GeForce RTX 3090", 24, "00000000:01:00.0", 9751, 384, 10496, 1695, (8, 6), 4, 16, "00000000:02:00.0"),
        ("NVIDIA GeForce RTX 3090", 24, "00000000:02:00.0", 9751, 384, 10496, 1695, (8, 6), 4, 16, "00000000:01:00.0"),
        ("NVIDIA GeForce RTX 3060", 12, "00000000:07:00.0", 7501, 192, 3584, 1777, (8, 6), 4, 4, None),
    ]

    def __init__(self) -> None:
        self.shutdown = False

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None:
        self.shutdown = True
    def nvmlDeviceGetCount(self) -> int:
        return len(self.GPUS)
    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i
    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self.GPUS[h][0].encode()
    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(total=self.GPUS[h][1] << 30, used=0, free=self.GPUS[h][1] << 30)
    def nvmlDeviceGetPciInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(busId=self.GPUS[h][2])
    def nvmlDeviceGetMaxClockInfo(self, h: int, kind: int) -> int:
        return self.GPUS[h][3] if kind == self.NVML_CLOCK_MEM else self.GPUS[h][6]
    def nvmlDeviceGetMemoryBusWidth(self, h: int) -> int:
        return self.GPUS[h][4]
    def nvmlDeviceGetNumGpuCores(self, h: int) -> int:
        return self.GPUS[h][5]
    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return self.GPUS[h][7]
    def nvmlDeviceGetMaxPcieLinkGeneration(self, h: int) -> int:
        return self.GPUS[h][8]
    def nvmlDeviceGetCurrPcieLinkWidth(self, h: int) -> int:
        return self.GPUS[h][9]
    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        if self.GPUS[h][10] is None or link >= 4:
            raise RuntimeError("NVMLError_NotSupported")
        return 1
    def nvmlDeviceGetNvLinkVersion(self, h: int, link: int) -> int:
        return 3
    def nvmlDeviceGetNvLinkRemoteDeviceType(self, h: int, link: int) -> int:
        return self.NVML_NVLINK_DEVICE_TYPE_GPU
    def nvmlDeviceGetNvLinkRemotePciInfo_v2(self, h: int, link: int) -> SimpleNamespace:
        return SimpleNamespace(busId=self.GPUS[h][10])
    def nvmlDeviceGetUUID(self, h: int) -> str:
        return ["GPU-3090a1", "GPU-3090b2", "GPU-3060c3"][h]


def test_fake_nvml_rig() -> None:
    nvml = FakeNVML()
    prof, notes = detect(nvml=nvml, measure=False)
    assert nvml.shutdown
    gpus = [d for d in prof.devices if d.backend == "cuda"]
    assert [d.name for d in gpus] == ["NVIDIA GeForce RTX 3090"] * 2 + ["NVIDIA GeForce RTX 3060"]
    assert gpus[0].vram_gib == 24.0 and gpus[0].pci_bus_id == "0000:01:00.0"
    assert gpus[0].mem_bandwidth_gbs == pytest.approx(936.1, abs=0.2)  # the datasheet says 936
    assert gpus[2].mem_bandwidth_gbs == pytest.approx(360.0, abs=0.1)
    assert gpus[0].fp16_tflops == pytest.approx(71.2, abs=0.2)  # 3090: 71 dense FP16 tensor, FP32 accumulate
    nvlinks = [lk for lk in prof.links if lk.kind == "nvlink"]
    assert len(nvlinks) == 1 and set(nvlinks[0].between) == {"gpu0", "gpu1"}
    assert nvlinks[0].bandwidth_gbs == 56.25  # 4 links x 14.0625 GB/s
    assert prof.link("gpu0", "gpu2").kind == "pcie"
    assert prof.hosts[0].pcie_gbs == pytest.approx(1.969 * 4 * 0.8, abs=0.01)  # the slowest GPU's x4 slot
    assert any(d.backend == "cpu" for d in prof.devices)


def test_no_driver_means_cpu_only() -> None:
    class NoDriver:
        def nvmlInit(self) -> None:
            raise RuntimeError("NVML Shared Library Not Found")

    prof, notes = detect(nvml=NoDriver(), measure=False)
    assert [d.backend for d in prof.devices] == ["cpu"]
    assert any("no NVIDIA GPU found" in n for n in notes)


def test_bus_ids_match_across_nvml_and_cuda() -> None:
    assert normalize_bus_id(b"00000000:0A:00.0") == normalize_bus_id("0000:0a:00.0") == "0000:0a:00.0"


def test_cuda_numbering_follows_cuda_visible_devices() -> None:
    """CUDA device k is the k-th GPU CUDA_VISIBLE_DEVICES lists (indices or UUID prefixes), up to the first entry
    that names none; unset, every GPU in bus order."""
    with Nvml(FakeNVML()) as nv:
        assert nv.cuda_to_nvml({}) == [0, 1, 2]
        assert nv.cuda_to_nvml({"CUDA_VISIBLE_DEVICES": "2,0"}) == [2, 0]
        assert nv.cuda_to_nvml({"CUDA_VISIBLE_DEVICES": "1,7,0"}) == [1]  # 7 names no GPU: CUDA stops there
        assert nv.cuda_to_nvml({"CUDA_VISIBLE_DEVICES": "GPU-3060, gpu-3090a"}) == [2, 0]
        assert nv.cuda_to_nvml({"CUDA_VISIBLE_DEVICES": "GPU-3090"}) == []  # ambiguous prefix
        assert nv.cuda_to_nvml({"CUDA_VISIBLE_DEVICES": ""}) == []
        assert nv.bus_id(2) == "0000:07:00.0"


def test_cuda_order_is_the_bus_order_unless_chosen() -> None:
    env: dict[str, str] = {}
    cuda_order_env(env)
    assert env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    mine = {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    cuda_order_env(mine)
    assert mine["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"
    assert worker_env({"devices": ["gpu0", "gpu1"]})["CUDA_DEVICE_ORDER"] in ("PCI_BUS_ID", "FASTEST_FIRST")


def test_preflight_reads_and_checks_the_gpus_cuda_will_use() -> None:
    """With CUDA_VISIBLE_DEVICES=2,0,1, CUDA's GPU 0 is the 3060: a profile detected with all three in bus order
    reads the 3060's free memory for gpu0 and says the plan would land on other cards."""
    prof, _ = detect(nvml=FakeNVML(), measure=False)
    plan = SimpleNamespace(devices=[SimpleNamespace(id=d, total_bytes=1 << 30) for d in ("gpu0", "gpu1")])
    plain = free_memory(prof, plan, FakeNVML(), env={})
    assert plain.free_bytes == {"gpu0": 24 << 30, "gpu1": 24 << 30} and plain.misplaced == ()
    moved = free_memory(prof, plan, FakeNVML(), env={"CUDA_VISIBLE_DEVICES": "2,0,1"})
    assert moved.free_bytes == {"gpu0": 12 << 30, "gpu1": 24 << 30}
    assert moved.misplaced[0] == ("gpu0 is the GPU at 0000:01:00.0 in " + prof.name
                                  + ", but CUDA's GPU 0 here is at 0000:07:00.0")
    short = free_memory(prof, plan, FakeNVML(), env={"CUDA_VISIBLE_DEVICES": "0"})
    assert short.absent == ("gpu1",)


def test_sampler_reads_the_gpu_cuda_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    sampler = DeviceSampler(cuda_index={"gpu0": 0, "gpu9": 3}, _nvml=Nvml(FakeNVML()))
    try:
        by_id = {s.id: s for s in sampler.sample()}
    finally:
        sampler.close()
    assert by_id["gpu0"].memory_total_bytes == 12 << 30  # the 3060, CUDA's only GPU
    assert by_id["gpu9"].memory_total_bytes is None  # no such CUDA device: n/a


def test_detect_here_writes_a_valid_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "here.toml"
    assert main(["profile", "detect", "-o", str(out)]) == 0
    prof = load_profile_file(out)
    cpu = prof.device("cpu")
    assert cpu.source == "measured" and cpu.mem_bandwidth_gbs > 0.5 and cpu.vram_gib > 1
    assert prof.hosts[0].cpu_cores >= 1
    err = capsys.readouterr().err
    assert "no NVIDIA GPU" in err or "GPU" in err  # says why no GPU was found
    assert main(["profile", "show", str(out)]) == 0
    assert "cpu" in capsys.readouterr().out


def test_detect_records_llama_cpp_cpu_probe_for_the_host(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from mixrun.backends import llamacpp_cpu

    out = tmp_path / "here.toml"
    # the real probe on this host: the extra buffer types its llama.cpp build offers, in use
    assert main(["profile", "detect", "--no-measure", "-o", str(out)]) == 0
    here = load_profile_file(out).hosts[0].llamacpp_extra_buffers
    assert here is not None and all(b and b.isidentifier() for b in here)
    # a host where they crash: recorded as off, and said
    crashed = llamacpp_cpu.CpuFinding(extra_buffers=False, outcome="crashed", note="extra buffer types died")
    monkeypatch.setattr(llamacpp_cpu, "finding", lambda: crashed)
    capsys.readouterr()
    assert main(["profile", "detect", "--no-measure", "-o", str(out)]) == 0
    assert load_profile_file(out).hosts[0].llamacpp_extra_buffers == ()
    assert "extra buffer types died" in capsys.readouterr().err
    monkeypatch.setattr(llamacpp_cpu, "finding",
                        lambda: llamacpp_cpu.CpuFinding(extra_buffers=True, buffer_types=("AMX", "CPU_REPACK")))
    assert main(["profile", "detect", "--no-measure", "-o", str(out)]) == 0
    assert load_profile_file(out).hosts[0].llamacpp_extra_buffers == ("AMX", "CPU_REPACK")

"""Rig profiles: every bundled profile validates; each class of bad value fails naming the field; lookup and
atomic save."""

from __future__ import annotations

import copy
import json
import math
import tomllib
from importlib import resources
from pathlib import Path

import pytest
import tomli_w

from mixrun.cli import main
from mixrun.errors import ProfileError
from mixrun.rig.profile import (
    MAX_DEVICES,
    MAX_LINKS,
    RigProfile,
    bundled_profiles,
    dump_profile,
    find_profile,
    load_profile,
    load_profile_file,
    parse_profile,
    save_profile,
    user_profile_dir,
)

REQUIRED = {"dual-3090-nvlink", "dual-3090-nvlink-plus-3060", "3090-plus-4090-pcie", "4090-plus-p40", "2x-4090-pcie",
            "4x-3090-pcie", "2x-a6000-nvlink-plus-a4000", "8x-h100-sxm", "2x-5060ti-pcie",
            "two-hosts-2x3090-10gbe", "cpu-only"}


def _base() -> dict:
    entry = next(e for n, e in bundled_profiles() if n == "dual-3090-nvlink-plus-3060")
    return tomllib.loads(entry.read_text(encoding="utf-8"))


def test_every_bundled_profile_validates() -> None:
    names = {n for n, _ in bundled_profiles()}
    assert names >= REQUIRED
    for name in names:
        prof = load_profile(name)
        assert prof.name == name
        assert any(d.backend == "cpu" for d in prof.devices), name
    h100 = load_profile("8x-h100-sxm")
    assert len([lk for lk in h100.links if lk.kind == "nvswitch"]) == 28
    two = load_profile("two-hosts-2x3090-10gbe")
    b = two.devices[0]
    a = next(d for d in two.devices if d.backend == "cuda" and d.host != b.host)
    assert two.link(a.id, b.id).kind == "ethernet"


def test_bundled_profiles_carry_sources() -> None:
    for name, entry in bundled_profiles():
        text = entry.read_text(encoding="utf-8")
        assert text.count("#") >= 5, f"{name}: datasheet sources belong in comments"


MUTATIONS = [
    # (mutate, expected field path, expected words)
    (lambda d: d["devices"][2].__setitem__("vram_gib", -12.0), "devices[2].vram_gib", "greater than 0"),
    (lambda d: d["devices"][1].__setitem__("vram_gib", math.nan), "devices[1].vram_gib", "finite"),
    (lambda d: d["devices"][1].__setitem__("vram_gib", 2000.0), "devices[1].vram_gib", "no GPU has that much"),
    (lambda d: d["devices"][0].__setitem__("mem_bandwidth_gbs", 1e9), "devices[0].mem_bandwidth_gbs", "less than"),
    (lambda d: d["devices"][0].__setitem__("vram_gib", "24"), "devices[0].vram_gib", "valid number"),
    (lambda d: d["devices"][0].__setitem__("vram_gb", 24.0), "devices[0].vram_gb", "unknown key"),
    (lambda d: d["devices"][0].pop("name"), "devices[0].name", "missing"),
    (lambda d: d["devices"][0].__setitem__("reserved_gib", 30.0), "devices[0].reserved_gib", "leaves nothing"),
    (lambda d: d["devices"][0].__setitem__("backend", "cudaa"), "devices[0].backend", "'cuda'"),
    (lambda d: d["devices"][1].__setitem__("id", "gpu0"), "devices[1].id", "duplicate id 'gpu0'"),
    (lambda d: d["devices"][1].__setitem__("host", "nowhere"), "devices[1].host", "unknown host 'nowhere'"),
    (lambda d: d["links"][0].__setitem__("between", ["gpu0", "gpu9"]), "links[0].between", "unknown device 'gpu9'"),
    (lambda d: d["links"][0].__setitem__("between", ["gpu0", "gpu0"]), "links[0].between", "itself"),
    (lambda d: d["links"].append(dict(d["links"][0])), "links[3].between", "a second link"),
    (lambda d: d["links"][0].__setitem__("kind", "nvlinkk"), "links[0].kind", "'nvlink'"),
    (lambda d: d["links"][0].__setitem__("bandwidth_gbs", math.inf), "links[0].bandwidth_gbs", "finite"),
    (lambda d: d.__setitem__("format", "mixrun-profile/2"), "format", "'mixrun-profile/1'"),
    (lambda d: d.__setitem__("nmae", "x"), "nmae", "unknown key"),
    (lambda d: d.__setitem__("devices", []), "devices", "at least 1"),
    (lambda d: d["hosts"][0].__setitem__("cpu_cores", 0), "hosts[0].cpu_cores", "greater than or equal to 1"),
]


@pytest.mark.parametrize(("mutate", "path", "words"), MUTATIONS)
def test_bad_values_name_the_field(tmp_path: Path, mutate, path: str, words: str) -> None:
    data = copy.deepcopy(_base())
    mutate(data)
    f = tmp_path / "bad.toml"
    try:
        f.write_text(tomli_w.dumps(data))
    except (TypeError, ValueError):  # values TOML cannot write (nan in a strict writer): validate the dict directly
        with pytest.raises(ProfileError) as exc:
            parse_profile(data, str(f))
    else:
        with pytest.raises(ProfileError) as exc:
            load_profile_file(f)
    msg = str(exc.value)
    assert msg.startswith(f"{f}: {path}"), msg
    assert words in msg, msg
    assert "\n" not in msg


def test_not_toml_and_missing(tmp_path: Path) -> None:
    f = tmp_path / "x.toml"
    f.write_text("format = [unclosed")
    with pytest.raises(ProfileError, match=r"x\.toml: not valid TOML"):
        load_profile_file(f)
    with pytest.raises(ProfileError, match=r"nope\.toml: no such file"):
        load_profile_file(tmp_path / "nope.toml")
    with pytest.raises(ProfileError, match="no such profile file or name"):
        load_profile("no-such-rig")


def test_save_is_atomic_and_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prof = load_profile("dual-3090-nvlink-plus-3060")
    out = tmp_path / "p.toml"
    save_profile(prof, out)
    assert load_profile_file(out) == prof
    before = out.read_text()

    import os

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_profile(prof.model_copy(update={"description": "changed"}), out)
    assert out.read_text() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["p.toml"]  # and no temp file is left


def test_user_profile_shadows_bundled() -> None:
    prof = load_profile("cpu-only")
    save_profile(prof.model_copy(update={"description": "my copy"}), user_profile_dir() / "cpu-only.toml")
    origin, kind = find_profile("cpu-only")
    assert kind == "user" and load_profile("cpu-only").description == "my copy"


def test_schema_and_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["profile", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "RigProfile" and "devices" in schema["properties"]
    assert main(["profile", "list"]) == 0
    out = capsys.readouterr().out
    assert "dual-3090-nvlink-plus-3060" in out and "8x-h100-sxm" in out
    assert main(["profile", "show", "dual-3090-nvlink-plus-3060"]) == 0
    out = capsys.readouterr().out
    assert "RTX 3060" in out and "nvlink" in out
    good = tmp_path / "good.toml"
    good.write_text(dump_profile(load_profile("cpu-only")))
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("vram_gib = ", "vram_gib = -"))
    assert main(["profile", "validate", str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert f"{good}: ok" in captured.out
    assert f"{bad}: devices[0].vram_gib" in captured.err


def test_profiles_package_ships_toml_files() -> None:
    files = [e.name for e in resources.files("mixrun.profiles").iterdir()]
    assert "cpu-only.toml" in files


def test_capacity_and_default_links() -> None:
    prof = load_profile("dual-3090-nvlink-plus-3060")
    gpu0 = prof.device("gpu0")
    assert gpu0.capacity_bytes == int(23.5 * (1 << 30))
    assert prof.link("gpu0", "gpu1").kind == "nvlink"
    assert prof.link("gpu1", "gpu0").bandwidth_gbs == 56.25
    assert isinstance(prof, RigProfile)


# ---- hostile files: bounded, one clean error, no hang ------------------------------------------------------------


def test_special_files_are_refused_without_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # opening it to read would block until a writer came
    for f in (fifo, Path("/dev/zero"), Path("/dev/urandom"), tmp_path):
        with pytest.raises(ProfileError, match=r"(not a regular file|is a directory)"):
            load_profile_file(f)
    user = user_profile_dir()
    user.mkdir(parents=True)
    (user / "zero.toml").symlink_to("/dev/zero")
    with pytest.raises(ProfileError, match=r"zero\.toml: not a regular file"):
        load_profile("zero")


def test_nesting_and_long_dotted_keys_are_refused_cheaply(tmp_path: Path) -> None:
    import time

    head = 'format = "mixrun-profile/1"\n[extra]\n'
    cases = {
        "arrays": head + "x = " + "[" * 1000 + "]" * 1000 + "\n",
        "tables": head + "x = " + "{a = " * 1000 + "1" + "}" * 1000 + "\n",
        "dotted": head + ".".join(["a"] * 100_000) + " = 1\n",
        "quoted": head + ".".join(['"a.b"'] * 40) + " = 1\n",
        "headers": "[" + ".".join(["t"] * 50) + "]\n",
        "moderate": head + "x = " + "[" * 40 + "]" * 40 + "\n",
    }
    for name, text in cases.items():
        f = tmp_path / f"{name}.toml"
        f.write_text(text)
        t0 = time.monotonic()
        with pytest.raises(ProfileError, match="nested more than 32 deep"):
            load_profile_file(f)
        assert time.monotonic() - t0 < 2, name
    ok = _base()
    ok["extra"] = {"floats": [1.5] * 10_000, "note": "a.b.c." * 100, "deep": {"a": {"b": {"c": [[1, 2]]}}}}
    f = tmp_path / "ok.toml"
    f.write_text(tomli_w.dumps(ok))
    assert load_profile_file(f).extra["deep"]["a"]["b"]["c"] == [[1, 2]]


def test_huge_names_and_denormals(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"\(5,000 characters\): not a profile name or path"):
        load_profile("x" * 5000)
    with pytest.raises(ProfileError, match="file name too long"):
        load_profile(str(tmp_path / ("y" * 300)) + ".toml")
    data = copy.deepcopy(_base())
    data["devices"][0]["mem_bandwidth_gbs"] = 5e-324
    with pytest.raises(ProfileError, match=r"devices\[0\]\.mem_bandwidth_gbs: 4\.94066e-324 is below 0\.1 GB/s"):
        parse_profile(data, "p.toml")
    for field, value in (("fp16_tflops", 1e-6), ("vram_gib", 1e-9)):
        data = copy.deepcopy(_base())
        data["devices"][1][field] = value
        with pytest.raises(ProfileError, match=rf"devices\[1\]\.{field}: .* is below"):
            parse_profile(data, "p.toml")


def _many_devices(n: int) -> dict:
    devices = [{"id": f"gpu{i}", "backend": "cuda", "name": f"GPU {i % 5}", "vram_gib": 8.0 + 4 * (i % 5),
                "mem_bandwidth_gbs": 300.0 + 50 * (i % 3), "fp16_tflops": 20.0 + i % 7} for i in range(n)]
    links = [{"between": [f"gpu{i}", f"gpu{(i + k) % n}"], "kind": "nvlink", "bandwidth_gbs": 50.0}
             for k in range(1, 9) for i in range(n) if k < n - k or (k == n - k and i < k)]
    return {"format": "mixrun-profile/1", "name": f"big{n}", "devices": devices, "links": links[:MAX_LINKS]}


def test_the_largest_profile_plans_within_seconds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The schema's maximum is what the planner handles: MAX_DEVICES devices and MAX_LINKS links plan in a few
    seconds (about 1.4 s here); one device more is refused by validation."""
    import time

    f = tmp_path / "big.toml"
    f.write_text(tomli_w.dumps(_many_devices(MAX_DEVICES)))
    t0 = time.monotonic()
    rc = main(["plan", "-p", str(f), "--json"])
    elapsed = time.monotonic() - t0
    assert rc in (0, 3) and json.loads(capsys.readouterr().out)["candidates"]
    assert elapsed < 10, elapsed
    f.write_text(tomli_w.dumps(_many_devices(MAX_DEVICES + 1)))
    with pytest.raises(ProfileError, match=f"at most {MAX_DEVICES} items"):
        load_profile_file(f)

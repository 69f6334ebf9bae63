"""RigProfile: what a rig offers. Schema (format ``mixrun-profile/1``), TOML load/save, validation, lookup.

Profiles are shared between users, so they are untrusted input: unknown keys are errors, numbers must be finite and
within physical bounds, ids must be unique and every reference must resolve. Errors name the file, the field path
(``devices[2].vram_gib``) and the problem. Units are in the key names (GiB, GB/s, TFLOP/s, microseconds).
"""

from __future__ import annotations

import errno
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from mixrun import vocab
from mixrun.errors import ProfileError, read_problem, where
from mixrun.fsutil import shown

FORMAT = "mixrun-profile/1"
GIB = 1 << 30
Source = Literal["datasheet", "measured", "user"]
Backend = Literal["cuda", "rocm", "vulkan", "metal", "cpu"]
LinkKind = Literal["nvlink", "nvswitch", "pcie", "ethernet", "infiniband", "thunderbolt"]
Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
BufferType = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,32}$")]  # a ggml buffer type name, e.g. CPU_REPACK
# Physical bounds: anything outside is a typo or an attack, not hardware.
MAX_VRAM_GIB = 1024.0
MAX_RAM_GIB = 64 * 1024.0
MAX_BANDWIDTH_GBS = 100_000.0
MAX_TFLOPS = 100_000.0
# Lower bounds: a denormal like 5e-324 is finite and > 0, yet the planner would predict 0.0 tok/s from it.
MIN_GIB = 1 / 1024  # 1 MiB
MIN_BANDWIDTH_GBS = 0.1
MIN_NETWORK_GBPS = 0.001  # 1 Mbit/s
MIN_TFLOPS = 0.001
MIN_LATENCY_US = 0.001
MIN_TOK_S = 0.001
# What the planner handles within a few seconds: `mixrun plan` on a 256-device profile with 2,048 links takes about
# 1.4 s (512 devices: 4.1 s, 1,024: 15 s; the search grows quadratically in devices).
MAX_DEVICES = 256
MAX_LINKS = MAX_DEVICES * 8
# A host's default GPU<->GPU bandwidth when the profile does not say (PCIe 4.0 x16, one direction, achieved).
DEFAULT_PCIE_GBS = 25.0
DEFAULT_PCIE_LATENCY_US = 10.0
DEFAULT_NETWORK_GBPS = 1.0
DEFAULT_NETWORK_LATENCY_US = 100.0


def _at_least(lo: float, unit: str) -> AfterValidator:
    """A physical lower bound, checked after ``gt=0``: tinier values (denormals such as 5e-324) are no hardware and
    would make the planner predict 0.0 tok/s."""
    def check(value: float) -> float:
        if value < lo:
            raise ValueError(f"{value:g} is below {lo:g} {unit}, the smallest figure real hardware has (a typo?)")
        return value

    return AfterValidator(check)


def _member(enum: type[StrEnum]) -> Callable[[Any], Any]:
    """A TOML string -> the vocabulary's enum member (strict models take only members); others fail validation."""
    def convert(value: Any) -> Any:
        try:
            return enum(value) if isinstance(value, str) else value
        except ValueError:
            raise ValueError(f"{value!r}: must be one of {', '.join(m.value for m in enum)}") from None

    return convert


# bounded positive figures, by unit
GiBs = Annotated[float, Field(gt=0, le=MAX_RAM_GIB), _at_least(MIN_GIB, "GiB")]
GBs = Annotated[float, Field(gt=0, le=MAX_BANDWIDTH_GBS), _at_least(MIN_BANDWIDTH_GBS, "GB/s")]
DecodeTokS = Annotated[float, Field(gt=0, le=1e7), _at_least(MIN_TOK_S, "tok/s")]
PrefillTokS = Annotated[float, Field(gt=0, le=1e9), _at_least(MIN_TOK_S, "tok/s")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Host(_Strict):
    """One machine. Devices on different hosts talk over the network."""

    id: Id
    ram_gib: GiBs | None = None
    cpu_cores: Annotated[int, Field(ge=1, le=4096)] | None = None
    pcie_gbs: GBs = DEFAULT_PCIE_GBS
    network_gbps: Annotated[float, Field(gt=0, le=100_000.0), _at_least(MIN_NETWORK_GBPS, "Gbit/s")] = (
        DEFAULT_NETWORK_GBPS)
    # llama.cpp's CPU "extra" buffer types in use on this host, as its load report names them ("AMX", "CPU_REPACK"):
    # weights repacked into a CPU-specific layout, held beside the mapped file. [] when they are off (they crashed a
    # batched decode here, or the user turned them off); absent when unknown (the planner then counts none).
    llamacpp_extra_buffers: Annotated[tuple[BufferType, ...], Field(strict=False, max_length=16)] | None = None
    source: Source | None = None


class Device(_Strict):
    """One compute device: a GPU, or a CPU host's memory and cores (``backend = "cpu"``)."""

    id: Id
    host: Id | None = None
    backend: Backend
    name: Annotated[str, Field(min_length=1, max_length=200)]
    vram_gib: GiBs
    reserved_gib: Annotated[float, Field(ge=0, le=MAX_RAM_GIB)] = 0.0
    mem_bandwidth_gbs: GBs
    fp16_tflops: Annotated[float, Field(gt=0, le=MAX_TFLOPS), _at_least(MIN_TFLOPS, "TFLOP/s")]
    pci_bus_id: Annotated[str, Field(max_length=64)] | None = None
    source: Source | None = None

    @model_validator(mode="after")
    def _check(self) -> Device:
        if self.backend != "cpu" and self.vram_gib > MAX_VRAM_GIB:
            raise ValueError(f"vram_gib: {self.vram_gib:g} is over {MAX_VRAM_GIB:.0f} GiB; no GPU has that much")
        if self.reserved_gib >= self.vram_gib:
            raise ValueError(f"reserved_gib: {self.reserved_gib:g} leaves nothing of vram_gib {self.vram_gib:g}")
        return self

    @property
    def capacity_bytes(self) -> int:
        """Bytes the planner may fill: memory less what the desktop or driver holds."""
        return int((self.vram_gib - self.reserved_gib) * GIB)


class Link(_Strict):
    """A direct connection between two devices; bandwidth is one direction."""

    between: Annotated[tuple[Id, Id], Field(strict=False)]
    kind: LinkKind
    bandwidth_gbs: GBs
    latency_us: Annotated[float, Field(gt=0, le=1e6), _at_least(MIN_LATENCY_US, "us")] | None = None
    source: Source | None = None


class Result(_Strict):
    """A measured run, so a shared profile carries evidence of what the rig achieved."""

    model: Annotated[str, Field(min_length=1, max_length=500)]
    split: Annotated[vocab.Split, BeforeValidator(_member(vocab.Split))]
    backend: Annotated[vocab.Backend, BeforeValidator(_member(vocab.Backend))] | None = None
    decode_tok_s: DecodeTokS
    prefill_tok_s: PrefillTokS | None = None
    model_bytes: Annotated[int, Field(gt=0)] | None = None
    ctx: Annotated[int, Field(gt=0, le=1 << 31)] | None = None
    date: Annotated[str, Field(max_length=40)] | None = None
    mixrun_version: Annotated[str, Field(max_length=40)] | None = None
    source: Source | None = None
    # written by `mixrun bench --record`: which candidate ran, how it was measured, and the spread of the repeats
    label: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    prompt_tokens: Annotated[int, Field(gt=0, le=1 << 31)] | None = None
    decode_tokens: Annotated[int, Field(gt=0, le=1 << 31)] | None = None
    repeats: Annotated[int, Field(ge=1, le=10_000)] | None = None
    decode_tok_s_min: DecodeTokS | None = None
    decode_tok_s_max: DecodeTokS | None = None
    prefill_tok_s_min: PrefillTokS | None = None
    prefill_tok_s_max: PrefillTokS | None = None
    # what the planner predicted for this run: other models' plans on this rig are scaled by measured / predicted
    predicted_decode_tok_s: DecodeTokS | None = None
    predicted_prefill_tok_s: PrefillTokS | None = None
    # the predicted decode time split into streaming the weights and the fixed per-token costs (layers' launches,
    # collectives, hand-offs), in seconds, and the devices the run used: what fits a rig's correction (Correction)
    predicted_read_s: Annotated[float, Field(ge=0, le=1e6)] | None = None
    predicted_fixed_s: Annotated[float, Field(ge=0, le=1e6)] | None = None
    devices: Annotated[tuple[Id, ...], Field(strict=False, max_length=MAX_DEVICES)] | None = None


Factor = Annotated[float, Field(gt=0, le=1e6)]


class Correction(_Strict):
    """What a rig's recorded runs taught the cost model about one backend on one set of devices: factors on the
    predicted decode time's two parts and on the prefill time, for any model planned there. Written by
    ``mixrun bench --record`` from the profile's results (``from_models`` says which)."""

    backend: Annotated[vocab.Backend, BeforeValidator(_member(vocab.Backend))]
    devices: Annotated[tuple[Id, ...], Field(strict=False, min_length=1, max_length=MAX_DEVICES)]
    read_factor: Factor  # measured / predicted time to stream the weights (the devices' effective bandwidth)
    fixed_factor: Factor  # measured / predicted fixed time per token (per-layer launches, links' latency, host)
    prefill_factor: Factor | None = None  # measured / predicted prefill time (the devices' matmul rate)
    from_models: Annotated[tuple[Annotated[str, Field(max_length=500)], ...], Field(strict=False, max_length=1000)] = ()
    date: Annotated[str, Field(max_length=40)] | None = None
    source: Source = "measured"


class RigProfile(_Strict):
    """A rig: hosts, devices, links between them, and measured results."""

    format: Literal["mixrun-profile/1"]
    name: Id
    description: Annotated[str, Field(max_length=2000)] = ""
    source: Source = "datasheet"
    hosts: Annotated[tuple[Host, ...], Field(strict=False, max_length=MAX_DEVICES)] = ()
    devices: Annotated[tuple[Device, ...], Field(strict=False, min_length=1, max_length=MAX_DEVICES)]
    links: Annotated[tuple[Link, ...], Field(strict=False, max_length=MAX_LINKS)] = ()
    results: Annotated[tuple[Result, ...], Field(strict=False, max_length=10_000)] = ()
    corrections: Annotated[tuple[Correction, ...], Field(strict=False, max_length=1000)] = ()
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_refs(self) -> RigProfile:
        _unique("hosts", [h.id for h in self.hosts])
        _unique("devices", [d.id for d in self.devices])
        host_ids = {h.id for h in self.hosts}
        for i, d in enumerate(self.devices):
            if d.host is not None and d.host not in host_ids:
                known = ", ".join(sorted(host_ids)) or "none: the profile has no [[hosts]]"
                raise ValueError(f"devices[{i}].host: unknown host {d.host!r} (known: {known})")
            if d.host is None and len(self.hosts) > 1:
                raise ValueError(f"devices[{i}].host: required when the profile has several hosts")
        dev_ids = {d.id for d in self.devices}
        pairs: set[frozenset[str]] = set()
        for i, link in enumerate(self.links):
            a, b = link.between
            for end in (a, b):
                if end not in dev_ids:
                    raise ValueError(f"links[{i}].between: unknown device {end!r}")
            if a == b:
                raise ValueError(f"links[{i}].between: a device cannot link to itself ({a!r})")
            pair = frozenset((a, b))
            if pair in pairs:
                raise ValueError(f"links[{i}].between: a second link between {a!r} and {b!r}")
            pairs.add(pair)
        return self

    # ---- pure lookups the planner uses (indexed once: planning asks for links thousands of times) --------------

    _index: dict[str, Any] = PrivateAttr(default_factory=dict)

    def _lookup(self) -> dict[str, Any]:
        if not self._index:
            self._index["devices"] = {d.id: d for d in self.devices}
            self._index["hosts"] = {h.id: h for h in self.hosts}
            self._index["links"] = {frozenset(lk.between): lk for lk in self.links}
            self._index["pairs"] = {}
        return self._index

    def device(self, device_id: str) -> Device:
        return (self._index or self._lookup())["devices"][device_id]

    def without(self, *device_ids: str) -> RigProfile:
        """The same rig with these devices (and their links and recorded results) taken out: what the planner
        compares a plan with, to say what a card adds."""
        gone = set(device_ids)
        out = self.model_copy(update={
            "devices": tuple(d for d in self.devices if d.id not in gone),
            "links": tuple(lk for lk in self.links if not gone & set(lk.between)),
            "results": (), "corrections": ()})
        out._index = {}  # model_copy shares the private lookup tables; this copy indexes its own devices
        return out

    def host_of(self, device: Device) -> Host | None:
        hid = device.host or (self.hosts[0].id if self.hosts else None)
        return self._lookup()["hosts"].get(hid)

    def host_gpus(self, of: Device | None = None) -> tuple[Device, ...]:
        """The GPUs on the host of ``of`` (default: the first device's host, where llama.cpp runs), in profile
        order: the order llama.cpp and torch number that host's GPUs (``cuda:k`` is the k-th)."""
        host = self.host_of(of if of is not None else self.devices[0])
        return tuple(d for d in self.devices if d.backend != "cpu" and self.host_of(d) == host)

    def link(self, a: str, b: str) -> Link:
        """The link between two devices: the profile's own, or the host default (PCIe, or the network)."""
        idx = self._index or self._lookup()
        key = frozenset((a, b))
        found = idx["links"].get(key) or idx["pairs"].get(key)
        if found is None:
            found = idx["pairs"][key] = self._default_link(a, b)
        return found

    def _default_link(self, a: str, b: str) -> Link:
        da, db = self.device(a), self.device(b)
        ha, hb = self.host_of(da), self.host_of(db)
        if (ha.id if ha else None) != (hb.id if hb else None):
            gbps = min(ha.network_gbps if ha else DEFAULT_NETWORK_GBPS, hb.network_gbps if hb else DEFAULT_NETWORK_GBPS)
            return Link(between=(a, b), kind="ethernet", bandwidth_gbs=gbps / 8, latency_us=DEFAULT_NETWORK_LATENCY_US)
        return Link(between=(a, b), kind="pcie", bandwidth_gbs=ha.pcie_gbs if ha else DEFAULT_PCIE_GBS,
                    latency_us=DEFAULT_PCIE_LATENCY_US)


def _unique(what: str, ids: list[str]) -> None:
    seen: set[str] = set()
    for i, x in enumerate(ids):
        if x in seen:
            raise ValueError(f"{what}[{i}].id: duplicate id {x!r}")
        seen.add(x)


# ---- errors -----------------------------------------------------------------------------------------------------


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(("function-", "constrained-")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_messages(err: ValidationError) -> list[str]:
    """``field.path: problem`` for each error, worded for people."""
    msgs = []
    for e in err.errors(include_url=False):
        path = _loc(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (a typo? free-form values go in [extra])"
        elif e["type"] == "missing":
            msg = "required field is missing"
        if not path:
            msgs.append(msg)  # a whole-profile check: its message names the field path itself
        elif _FIELD_PREFIX.match(msg):
            msgs.append(f"{path}.{msg}")  # a per-entry check naming one of the entry's fields
        else:
            msgs.append(f"{path}: {msg}")
    return msgs


_FIELD_PREFIX = re.compile(r"^[a-z_]+: ")


# ---- load / save ------------------------------------------------------------------------------------------------

MAX_PROFILE_BYTES = 4 * 1024 * 1024
# Tables and arrays nest at most this deep ([extra] included): tomllib recurses per level, and a dotted key of N
# parts costs it O(N^2) time and memory, so both are refused before anything deep is built.
MAX_NESTING = 32
MAX_REF_CHARS = 1024

_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _too_deep(text: str) -> bool:
    """Whether a key in TOML ``text`` has more than :data:`MAX_NESTING` dotted parts.

    A linear scan of the lines with that many dots (a key never spans lines): strings count as one key part, a
    comment ends the line, whitespace around a dot is allowed, anything else ends the run. A float or a time has
    one dot, so only keys come near the limit."""
    if text.count(".") < MAX_NESTING:
        return False
    for line in text.splitlines():
        if line.count(".") < MAX_NESTING:
            continue
        dots, part, quote, i, n = 0, False, "", 0, len(line)
        while i < n:
            ch = line[i]
            if quote:
                if ch == "\\" and quote == '"':
                    i += 1
                elif ch == quote:
                    quote, part = "", True
            elif ch in "\"'":
                quote = ch
            elif ch in _KEY_CHARS:
                part = True
            elif ch == "." and part:
                dots, part = dots + 1, False
                if dots >= MAX_NESTING:
                    return True
            elif ch == "#":
                break
            elif ch not in " \t":
                dots, part = 0, False
            i += 1
    return False


def _depth(data: Any) -> int:
    """How deep tables and arrays nest in parsed TOML (iteratively: no recursion to exhaust)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_NESTING:
            break
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, d + 1) for c in children if isinstance(c, dict | list))
    return deepest


def parse_profile(data: dict[str, Any], origin: str) -> RigProfile:
    try:
        return RigProfile.model_validate(data)
    except ValidationError as e:
        msgs = validation_messages(e)
        more = f" (and {len(msgs) - 1} more)" if len(msgs) > 1 else ""
        raise ProfileError(where(origin, msgs[0] + more)) from None


def load_profile_file(path: str | os.PathLike[str]) -> RigProfile:
    from mixrun.fsutil import read_bounded

    p = Path(path)
    try:
        text = read_bounded(p, MAX_PROFILE_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise ProfileError(where(p, "not UTF-8 text")) from None
    except OSError as e:
        if e.errno == errno.EFBIG:
            problem = f"too large for a profile (limit {MAX_PROFILE_BYTES:,} bytes)"
        elif e.errno == errno.EINVAL:
            problem = "not a regular file (a profile must be a .toml file)"
        elif e.errno == errno.ENAMETOOLONG:
            problem = "file name too long"
        else:
            problem = read_problem(e, "a profile")
        raise ProfileError(where(shown(p), problem)) from None
    nested = ProfileError(where(p, f"tables or arrays nested more than {MAX_NESTING} deep"))
    if _too_deep(text):
        raise nested
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(where(p, f"not valid TOML ({e})")) from None
    except RecursionError:
        raise nested from None
    if _depth(data) > MAX_NESTING:
        raise nested
    return parse_profile(data, str(p))



def dump_profile(profile: RigProfile) -> str:
    import tomli_w

    data = profile.model_dump(mode="json", exclude_none=True)
    for key in ("hosts", "links", "results", "corrections"):
        if not data.get(key):
            data.pop(key, None)
    if not data.get("extra"):
        data.pop("extra", None)
    return tomli_w.dumps(data)


def save_profile(profile: RigProfile, path: str | os.PathLike[str], *, parents: bool = True) -> Path:
    """Write ``profile`` atomically (:func:`mixrun.fsutil.atomic_write_text`: a symlink's target is updated, a
    non-regular file refused); ``parents``: create missing folders. OSError when it cannot be written."""
    from mixrun.fsutil import atomic_write_text

    return atomic_write_text(path, dump_profile(profile), parents=parents)


def user_profile_dir() -> Path:
    """Where the user's own profiles live (``$MIXRUN_CONFIG_DIR/profiles`` or the platform's config dir)."""
    base = os.environ.get("MIXRUN_CONFIG_DIR")
    if not base:
        import platformdirs

        base = platformdirs.user_config_dir("mixrun")
    return Path(base) / "profiles"


def bundled_profiles() -> Iterator[tuple[str, Any]]:
    """(name, Traversable) of each profile shipped in ``mixrun.profiles``."""
    for entry in sorted(resources.files("mixrun.profiles").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            yield entry.name.removesuffix(".toml"), entry


def user_profiles() -> Iterator[tuple[str, Path]]:
    d = user_profile_dir()
    if d.is_dir():
        for p in sorted(d.glob("*.toml")):
            yield p.stem, p


def find_profile(ref: str) -> tuple[str, str]:
    """Resolve a path or name to ``(origin, kind)`` where kind is ``file``, ``user`` or ``bundled``.

    A user profile shadows a bundled one of the same name, so a user's copy (with recorded results) wins.
    """
    if len(ref) > MAX_REF_CHARS or "\0" in ref:
        raise ProfileError(where(shown(ref), "not a profile name or path (too long, or a NUL character)"))
    try:
        exists = Path(ref).exists()
    except (OSError, ValueError):
        exists = False
    if os.sep in ref or ref.endswith(".toml") or exists:
        return ref, "file"
    for name, path in user_profiles():
        if name == ref:
            return str(path), "user"
    for name, entry in bundled_profiles():
        if name == ref:
            return str(entry), "bundled"
    names = sorted({n for n, _ in bundled_profiles()} | {n for n, _ in user_profiles()})
    raise ProfileError(where(shown(ref), "no such profile file or name (try `mixrun profile list`; known: "
                                  + ", ".join(names) + ")"))


def load_profile(ref: str) -> RigProfile:
    origin, kind = find_profile(ref)
    if kind == "bundled":
        entry = next(e for n, e in bundled_profiles() if n == ref)
        with resources.as_file(entry) as p:
            prof = load_profile_file(p)
            return prof
    return load_profile_file(origin)

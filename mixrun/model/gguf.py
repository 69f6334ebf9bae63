"""GGUF file(s) -> ModelSpec. The only module that touches ``gguf.GGUFReader``.

Files from other people are untrusted: every read is bounds-checked against the file's size (or, for a remote
file, against the bytes fetched so far), counts are checked against the bytes that could hold them before anything
is built, and every failure becomes a one-line :class:`GGUFError` naming the file and the problem.
Inspecting never reads tensor data: tensors are memory-mapped views that are never touched.
"""

from __future__ import annotations

import math
import os
import re
import stat
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, Keys
from gguf.constants import GGUF_MAGIC

from mixrun.errors import GGUFError, read_problem, where
from mixrun.model.spec import KVLayer, ModelSpec, RopeSpec, TensorSpec, build_spec

SUPPORTED_VERSIONS = (2, 3)
# Smallest on-disk size of one metadata entry (key length u64 + empty key + type u32 + one u8 value) and of one
# tensor-info entry (name length u64 + n_dims u32 + one u64 dim + type u32 + offset u64): used to bound counts.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
_MAX_DIMS = 4  # GGML_MAX_DIMS
_SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# Budgets: what any header may make mixrun build, far above every real model (a 235B-class MoE has ~100k tensors,
# ~60 metadata keys, a 150k-262k-token vocabulary and a header of tens of MiB). Past them a file is refused with one
# line, so parsing costs memory and time proportional to a sane model whatever the counts in a file say.
MAX_TENSORS = 1 << 18  # tensor infos
MAX_KV = 1 << 14  # metadata entries
MAX_ARRAY_ITEMS = 1 << 22  # elements over all metadata arrays (a vocabulary's tokens, scores, types, merges)
MAX_LISTED_ITEMS = 1 << 18  # a scalar array longer than this is kept as its length only, never as a list
MAX_NAME_BYTES = 1024  # a metadata key or tensor name (llama.cpp's GGML_MAX_NAME is 64)
MAX_STRING_BYTES = 1 << 24  # one metadata string (chat templates are tens of KiB)
MAX_STRING_TOTAL_BYTES = 1 << 26  # all metadata keys and strings together
MAX_HEADER_BYTES = 512 * 1024 * 1024  # metadata plus tensor infos


class _Truncated(Exception):
    """A read past the readable end. ``need`` is a byte offset the reader must reach to get further."""

    def __init__(self, offset: int, end: int, need: int) -> None:
        super().__init__(offset, end, need)
        self.offset, self.end, self.need = offset, end, need


class _Info(NamedTuple):
    """One tensor info as the header states it: GGML type, ne0-first dims, and where its data lies (bytes)."""

    name: str
    qtype: GGMLQuantizationType
    dims: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int


class _BoundedReader(GGUFReader):
    """``GGUFReader`` that refuses short reads, enforces the budgets above, and parses large things in one go.

    gguf-py's reader silently returns short arrays when a length runs past the end of the file, walks arrays one
    element at a time (seconds for a 150k-token vocabulary), and builds several numpy views per tensor info. This
    subclass raises :class:`_Truncated` instead, reads an array of scalars as one view and an array of strings as one
    byte region (the field's parts end with ``[item_type, count, values]``; a string array's ``data`` is empty),
    and reads tensor infos with ``struct`` into :class:`_Info` tuples (Python ints: no overflow, no data views).

    ``header_limit`` is the number of valid bytes (a remote file is parsed from a partial download); ``size`` is the
    file's logical size (a remote file's, of which only the first ``header_limit`` bytes are present locally).
    ``more(end)`` makes at least ``[0, end)`` present and returns the new number of valid bytes: the parse then goes
    on from where it stopped, over the grown file, rather than starting again from byte 0.
    """

    def __init__(self, source: Any, size: int, header_limit: int | None = None,
                 more: Callable[[int], int] | None = None) -> None:
        self._size = size
        self._limit = min(size if header_limit is None else header_limit, MAX_HEADER_BYTES)
        self._more = more
        self._source = source
        self._array_items = 0
        self._string_bytes = 0
        super().__init__(source, "r")

    def _reach(self, offset: int, end: int, need: int) -> None:
        """Bytes ``[0, end)`` readable, fetching ``need`` (an estimate, at least ``end``) where a caller can fetch;
        else :class:`_Truncated`. Fields already built keep their views of the old mapping, which stays valid."""
        if self._more is None or end > self._size:
            raise _Truncated(offset, end, need)
        self._limit = min(self._more(need), MAX_HEADER_BYTES)
        if end > self._limit:
            raise _Truncated(offset, end, need)
        self.data = np.memmap(self._source, mode="r")

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        count = int(count)
        end = offset + np.dtype(dtype).itemsize * count
        if end > self._limit:
            self._reach(offset, end, end)
        return super()._get(offset, dtype, count, override_order)

    def _get_str(self, offset: int) -> tuple[np.ndarray, np.ndarray]:
        slen = self._get(offset, np.uint64)
        n = int(slen[0])
        if n > MAX_STRING_BYTES and offset + 8 + n <= self._size:  # one past the file is reported as truncation
            raise ValueError(f"a metadata string of {n:,} bytes at byte {offset:,} (mixrun reads strings of up to "
                             f"{MAX_STRING_BYTES:,})")
        data = self._get(offset + 8, np.uint8, n)
        self._string_bytes += n
        if self._string_bytes > MAX_STRING_TOTAL_BYTES:
            raise ValueError(f"metadata strings total over {MAX_STRING_TOTAL_BYTES:,} bytes")
        return slen, data

    def _build_fields(self, offs: int, count: int) -> int:
        if int(count) > MAX_KV:
            raise ValueError(f"too many metadata entries ({int(count):,}; mixrun reads at most {MAX_KV:,})")
        return super()._build_fields(offs, count)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        n = int(alen[0])
        itype = GGUFValueType(int(raw_itype[0]))
        scalar = self.gguf_scalar_to_np.get(itype)
        self._array_items += n
        fits = orig_offs + 12 + n * (np.dtype(scalar).itemsize if scalar else 8) <= self._size
        if self._array_items > MAX_ARRAY_ITEMS and fits:  # one past the file is reported as truncation
            raise ValueError(f"absurd metadata array length {n:,} at byte {orig_offs:,} (mixrun reads at most "
                             f"{MAX_ARRAY_ITEMS:,} array items in all)")
        offs = orig_offs + 12
        if scalar is not None:
            values = self._get(offs, scalar, n)  # raises with the exact end when short
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [GGUFValueType.ARRAY, itype]
        if itype != GGUFValueType.STRING:
            raise ValueError(f"unsupported array item type {itype.name}")
        end = self._walk_strings(offs, n)
        region = self.data[offs:end]
        return end - orig_offs, [raw_itype, alen, region], [], [GGUFValueType.ARRAY, itype]

    def _walk_strings(self, offs: int, n: int) -> int:
        """End offset of ``n`` length-prefixed strings starting at ``offs``; raises :class:`_Truncated` with an
        estimate of the array's end (from the average length so far) when the readable bytes run out first."""
        if n * 8 > self._size - offs:
            raise ValueError(f"truncated header (a string array of {n:,} items is longer than the file)")
        u64 = struct.Struct(self._order + "Q")
        start = offs
        buf = memoryview(self.data)
        for i in range(n):
            if offs + 8 > self._limit:
                self._reach(offs, offs + 8, _estimate_end(start, offs, i, n))
                buf = memoryview(self.data)
            offs += 8 + u64.unpack_from(buf, offs)[0]
            if offs > self._limit:
                self._reach(offs, offs, max(offs, _estimate_end(start, offs, i + 1, n)))
                buf = memoryview(self.data)
        return offs

    @property
    def _order(self) -> str:
        return "<" if (self.byte_order == "I") == (sys.byteorder == "little") else ">"

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[tuple[str, tuple[int, ...], int, int]]]:
        """(name, ne0-first dims, GGML type, data offset) of each tensor info, read with ``struct``."""
        count = int(count)
        if count > MAX_TENSORS:
            raise ValueError(f"too many tensors ({count:,}; mixrun reads at most {MAX_TENSORS:,})")
        u64, u32 = struct.Struct(self._order + "Q"), struct.Struct(self._order + "I")
        start, infos = offs, []
        buf = memoryview(self.data)

        def reach(end: int, need: int) -> memoryview:
            self._reach(offs, end, need)
            return memoryview(self.data)

        for i in range(count):
            if offs + 8 > self._limit:
                buf = reach(offs + 8, _estimate_end(start, offs, i, count))
            nlen = u64.unpack_from(buf, offs)[0]
            if nlen > MAX_NAME_BYTES:
                raise ValueError(f"a tensor name of {nlen:,} bytes at byte {offs:,} (mixrun reads names of up to "
                                 f"{MAX_NAME_BYTES:,})")
            p = offs + 8 + nlen
            if p + 4 > self._limit:
                buf = reach(p + 4, _estimate_end(start, p + 4, i + 1, count))
            name = bytes(buf[offs + 8:p]).decode("utf-8")
            n_dims = u32.unpack_from(buf, p)[0]
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {n_dims:,} dimensions (GGML allows 1 to 4)")
            end = p + 4 + 8 * n_dims + 12
            if end > self._limit:
                buf = reach(end, _estimate_end(start, end, i + 1, count))
            dims = struct.unpack_from(f"{self._order}{n_dims}Q", buf, p + 4)
            qtype, data_offs = struct.unpack_from(self._order + "IQ", buf, end - 12)
            infos.append((name, dims, qtype, data_offs))
            offs = end
        return offs, infos

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        start_offs = int(start_offs)
        seen: set[str] = set()
        tensors = []
        qtypes = {int(q): q for q in GGMLQuantizationType}
        for name, dims, raw_qtype, data_offs in fields:
            if name in seen:
                raise ValueError(f"duplicate tensor name {name!r}")
            seen.add(name)
            qtype = qtypes.get(raw_qtype)
            if qtype is None:
                raise ValueError(f"unknown tensor quant type {raw_qtype} (tensor {name!r})")
            block, type_size = GGML_QUANT_SIZES[qtype]
            if 0 in dims:
                raise ValueError(f"tensor {name!r} has a dimension of 0 (shape {list(dims)} in GGML order)")
            if dims[0] % block:
                raise ValueError(f"tensor {name!r}: row of {dims[0]:,} is not a multiple of the {qtype.name} "
                                 f"block size {block}")
            n_elements = math.prod(dims)
            tensors.append(_Info(name, qtype, dims, n_elements, n_elements // block * type_size,
                                 start_offs + data_offs))
        self.tensors = tensors  # type: ignore[assignment]


def _estimate_end(start: int, offs: int, done: int, total: int) -> int:
    if done == 0:
        return offs + 64 * 1024
    return start + (offs - start) * total // done + 64 * 1024


@dataclass(frozen=True)
class _Part:
    """One parsed GGUF file: its fields (as plain values) and tensors, before merging split parts."""

    path: str
    size: int
    version: int
    fields: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: list[TensorSpec]
    tensor_ranges: list[tuple[str, int, int]]  # (name, start, end) of each tensor's data in the file
    header_bytes: int


def _check_preamble(path: str, data: bytes, size: int) -> int:
    """Validate magic, version and counts from the first 24 bytes; returns the version."""
    if len(data) < 4:
        raise GGUFError(where(path, f"not a GGUF file (only {len(data)} bytes)"))
    if int.from_bytes(data[:4], "little") != GGUF_MAGIC:
        raise GGUFError(where(path, f"not a GGUF file (bad magic {data[:4]!r})"))
    if len(data) < 24:
        raise GGUFError(where(path, f"truncated header ({len(data)} bytes, a GGUF header needs at least 24)"))
    version = int.from_bytes(data[4:8], "little")
    if version & 0xFFFF == 0:
        version = int.from_bytes(data[4:8], "big")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(where(path, f"unsupported GGUF version {version} (mixrun reads versions 2 and 3)"))
    n_tensors = int.from_bytes(data[8:16], "little")
    n_kv = int.from_bytes(data[16:24], "little")
    body = size - 24
    if n_kv * _MIN_KV_BYTES > body:
        raise GGUFError(where(path, f"absurd metadata count {n_kv:,} (a {size:,}-byte file holds at most "
                                    f"{body // _MIN_KV_BYTES:,})"))
    if n_tensors * _MIN_TENSOR_INFO_BYTES > body:
        raise GGUFError(where(path, f"absurd tensor count {n_tensors:,} (a {size:,}-byte file holds at most "
                                    f"{body // _MIN_TENSOR_INFO_BYTES:,})"))
    if n_kv > MAX_KV:
        raise GGUFError(where(path, f"too many metadata entries ({n_kv:,}; mixrun reads at most {MAX_KV:,})"))
    if n_tensors > MAX_TENSORS:
        raise GGUFError(where(path, f"too many tensors ({n_tensors:,}; mixrun reads at most {MAX_TENSORS:,})"))
    return version


# A metadata array's parts, as _BoundedReader builds them: key length, key bytes, value type, then the item type,
# the item count, and the values (one view of scalars, or one byte region of strings).
_ARRAY_COUNT, _ARRAY_VALUES = 4, 5


def _field_value(field: Any) -> Any:
    t0 = field.types[0]
    if t0 == GGUFValueType.ARRAY:
        values = field.parts[_ARRAY_VALUES]
        if field.types[-1] == GGUFValueType.STRING or len(values) > MAX_LISTED_ITEMS:
            return None  # a byte region, or too long to list: only its length is used
        return values.tolist()
    if t0 == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    return field.parts[-1].tolist()[0]


def parse_part(path: str, *, header_limit: int | None = None, display: str | None = None,
               size: int | None = None, more: Callable[[int], int] | None = None) -> _Part:
    """Parse one GGUF file's header. ``display`` is the name used in errors (a URL for remote files).

    A remote file is parsed from a local file holding its first ``header_limit`` bytes, ``size`` being the remote
    file's size; where the header runs past them, ``more(end)`` fetches (see :class:`_BoundedReader`). Every
    failure is a :class:`GGUFError`.
    """
    name = display or path
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below like any non-regular file
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        st = os.fstat(fd)
    except OSError as e:
        raise GGUFError(where(name, read_problem(e, "a GGUF file"))) from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        what = "is a directory, not a GGUF file" if stat.S_ISDIR(st.st_mode) else \
            "not a regular file (a GGUF model is a file, not a device, FIFO or socket)"
        raise GGUFError(where(name, what))
    with os.fdopen(fd, "rb") as f:
        try:
            pre = f.read(24)
        except OSError as e:
            raise GGUFError(where(name, read_problem(e, "a GGUF file"))) from None
        size = st.st_size if size is None else size
        version = _check_preamble(name, pre, size)
        try:
            reader = _BoundedReader(f, size, header_limit, more)
        except _Truncated as t:
            if t.need > MAX_HEADER_BYTES and t.end <= size:
                raise GGUFError(where(name, f"header larger than {MAX_HEADER_BYTES >> 20} MiB (a read at byte "
                                            f"{t.offset:,} needs {t.end - t.offset:,} bytes)")) from None
            raise GGUFError(where(name, _truncation_message(t, size))) from None
        except KeyError as e:  # gguf-py raises KeyError for a duplicate metadata key
            raise GGUFError(where(name, f"duplicate metadata key ({_printable(str(e.args[0]))})")) from None
        except (ValueError, UnicodeDecodeError, OverflowError, IndexError, TypeError) as e:
            raise GGUFError(where(name, _reader_message(e))) from None

    fields: dict[str, Any] = {}
    array_lengths: dict[str, int] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        fields[key] = _field_value(field)
        if field.types[0] == GGUFValueType.ARRAY:
            array_lengths[key] = int(field.parts[_ARRAY_COUNT][0])
    tensors, ranges = [], []
    qnames = {q: q.name for q in GGMLQuantizationType}
    for t in reader.tensors:
        tensors.append(TensorSpec(name=t.name, qtype=qnames[t.qtype], shape=tuple(reversed(t.dims)),
                                  n_elements=t.n_elements, n_bytes=t.n_bytes))
        ranges.append((t.name, t.data_offset, t.data_offset + t.n_bytes))
    return _Part(path=name, size=size, version=version, fields=fields, array_lengths=array_lengths,
                 tensors=tensors, tensor_ranges=ranges, header_bytes=int(reader.data_offset))


def _printable(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (untrusted names in one-line errors)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _truncation_message(t: _Truncated, size: int) -> str:
    if t.offset >= size or t.end > size:
        return f"truncated header (a read at byte {t.offset:,} needs {t.end - t.offset:,} bytes; the file has {size:,})"
    return f"truncated header at byte {t.offset:,}"


def _reader_message(e: Exception) -> str:
    text = str(e)
    if "GGMLQuantizationType" in text:
        return f"unknown tensor quant type ({text})"
    if "GGUFValueType" in text:
        return f"unknown metadata value type ({text})"
    if isinstance(e, UnicodeDecodeError):
        return "a key or tensor name is not valid UTF-8"
    if "cannot reshape" in text or "total size" in text:
        return "tensor shape does not match its data size"
    return _printable(text) or type(e).__name__


def check_tensor_data(part: _Part) -> None:
    """Every tensor's data must lie inside the file, after the header, without overlapping another."""
    spans = sorted(part.tensor_ranges, key=lambda r: r[1])
    prev_end, prev_name = part.header_bytes, None
    for name, start, end in spans:
        if end > part.size:
            raise GGUFError(where(part.path, f"tensor {name!r} data runs past the end of the file (needs bytes "
                                             f"{start:,}..{end:,}, the file has {part.size:,})"))
        if start < prev_end and end > start:
            other = f"tensor {prev_name!r}" if prev_name else "the header"
            raise GGUFError(where(part.path, f"tensor {name!r} data overlaps {other}"))
        prev_end, prev_name = max(prev_end, end), name


def split_parts(path: str) -> list[str]:
    """All files of a split model given any one of them (``NAME-0000k-of-0000N.gguf``), in order."""
    p = Path(path)
    m = _SPLIT_RE.match(p.name)
    if not m:
        return [path]
    count = int(m["count"])
    if not 1 <= count <= 99999:
        raise GGUFError(where(path, f"bad split count {count} in the file name"))
    return [str(p.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf")) for i in range(1, count + 1)]


def merge_parts(parts: list[_Part]) -> tuple[dict[str, Any], dict[str, int], list[TensorSpec]]:
    """Check ``split.no``/``split.count``/``split.tensors.count`` across parts and merge their tensor tables."""
    first = parts[0]
    if len(parts) == 1 and Keys.Split.LLM_KV_SPLIT_COUNT not in first.fields:
        return first.fields, first.array_lengths, first.tensors
    count = len(parts)
    seen: set[str] = set()
    tensors: list[TensorSpec] = []
    for i, part in enumerate(parts):
        no = part.fields.get(Keys.Split.LLM_KV_SPLIT_NO)
        n = part.fields.get(Keys.Split.LLM_KV_SPLIT_COUNT)
        if n != count:
            raise GGUFError(where(part.path, f"split.count is {n}, expected {count}"))
        if no != i:
            raise GGUFError(where(part.path, f"split.no is {no}, expected {i} (parts out of order or mixed)"))
        for t in part.tensors:
            if t.name in seen:
                raise GGUFError(where(part.path, f"duplicate tensor name {t.name!r} across split parts"))
            seen.add(t.name)
            tensors.append(t)
    expected = first.fields.get(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    if expected is not None and expected != len(tensors):
        raise GGUFError(where(first.path, f"split.tensors.count is {expected:,} but the parts hold {len(tensors):,}"))
    return first.fields, first.array_lengths, tensors


def split_urls(url: str) -> list[str]:
    """All parts of a split model given the URL of any part, like :func:`split_parts` for paths."""
    parts = urlsplit(url)
    return [urlunsplit(parts._replace(path=n)) for n in split_parts(str(PurePosixPath(parts.path)))]


def _read_remote_parts(url: str, deadline_s: float | None = None) -> list[_Part]:
    """Parse the header of each part of a remote model, fetching only as much of each as its header needs: where
    the parse runs past the fetched bytes it asks for more (at least 1.5x what is there, or its estimate of the
    end of a long array) and goes on where it stopped, so the header is parsed once and fetched in O(log) requests.
    ``deadline_s`` bounds the whole read (default: ``MIXRUN_HTTP_DEADLINE_S``, see :mod:`mixrun.model.remote`)."""
    from mixrun.model.remote import FIRST_WINDOW_BYTES, Deadline, RangeReader

    deadline = Deadline.start(url, deadline_s)
    out = []
    with tempfile.TemporaryDirectory(prefix="mixrun-remote-") as tmp:
        for part_url in split_urls(url):
            rr = RangeReader(part_url, tmp, deadline)
            rr.ensure(FIRST_WINDOW_BYTES)

            def more(need: int, rr: RangeReader = rr) -> int:
                # never past the header budget: a header that needs more is refused by the reader in one line
                rr.ensure(min(max(need, rr.fetched + rr.fetched // 2), MAX_HEADER_BYTES))
                return rr.fetched

            part = parse_part(rr.path, header_limit=rr.fetched, display=part_url, size=rr.total, more=more)
            check_tensor_data(part)
            out.append(part)
            _check_total_tensors(out)
    return out


def _check_total_tensors(parts: list[_Part]) -> None:
    """The tensor budget holds for a split model's parts together, checked as each part is read."""
    total = sum(len(p.tensors) for p in parts)
    if total > MAX_TENSORS:
        raise GGUFError(where(parts[-1].path, f"too many tensors over the split parts ({total:,}; mixrun reads at "
                                              f"most {MAX_TENSORS:,})"))


def _read_local_parts(model: str) -> list[_Part]:
    if not os.path.exists(model):
        raise GGUFError(where(model, "no such file"))
    paths = split_parts(model)
    for p in paths:
        if not os.path.exists(p):
            raise GGUFError(where(p, f"missing part of the split model {Path(model).name}"))
    parts: list[_Part] = []
    for p in paths:
        parts.append(parse_part(p))
        check_tensor_data(parts[-1])
        _check_total_tensors(parts)
    return parts


def _spec(parts: list[_Part]) -> tuple[ModelSpec, dict[str, Any]]:
    """The spec of a model's parsed parts, and its merged metadata."""
    fields, array_lengths, tensors = merge_parts(parts)
    spec = build_spec(source=parts[0].path, files=tuple(p.path for p in parts), file_bytes=sum(p.size for p in parts),
                      fields=fields, array_lengths=array_lengths, tensors=tensors)
    return spec, fields


def read_spec(model: str | os.PathLike[str], *, http_deadline_s: float | None = None) -> ModelSpec:
    """Read a local GGUF (single file or any part of a split model), or an ``http(s)://`` URL, into a ModelSpec.
    ``http_deadline_s`` bounds a remote read in all (default: ``MIXRUN_HTTP_DEADLINE_S``, else 120 s)."""
    model = str(model)
    remote = model.startswith(("http://", "https://"))
    return _spec(_read_remote_parts(model, http_deadline_s) if remote else _read_local_parts(model))[0]


class TensorFile:
    """A local GGUF (all split parts) opened for reading tensor data: the spec, the metadata, and each tensor's
    bytes as a read-only memory map. Nothing is read until a tensor's bytes are touched."""

    def __init__(self, model: str | os.PathLike[str]) -> None:
        model = str(model)
        if model.startswith(("http://", "https://")):
            raise GGUFError(where(model, "running a model needs a local file (download it first)"))
        parts = _read_local_parts(model)
        self.spec, self.fields = _spec(parts)
        self._where: dict[str, tuple[int, int, int]] = {}
        for i, part in enumerate(parts):
            for name, start, end in part.tensor_ranges:
                self._where[name] = (i, start, end)
        self._maps = [np.memmap(p.path, dtype=np.uint8, mode="r") for p in parts]
        self._specs = {t.name: t for t in self.spec.tensors}

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def info(self, name: str) -> TensorSpec:
        return self._specs[name]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes on disk (a view of the memory map, nothing copied)."""
        i, start, end = self._where[name]
        return self._maps[i][start:end]


__all__ = ["KVLayer", "ModelSpec", "RopeSpec", "TensorSpec", "read_spec", "parse_part", "split_parts", "TensorFile"]

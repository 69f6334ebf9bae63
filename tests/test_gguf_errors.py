"""Untrusted GGUF input: every malformed file is one clean GGUFError naming the file, never a traceback, and
never allocates anywhere near what a corrupt count or length asks for."""

from __future__ import annotations

import os
import struct
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest

import gguf_factory
from mixrun.cli import main
from mixrun.errors import GGUFError
from mixrun.model import gguf as budget
from mixrun.model.gguf import parse_part, read_spec
from mixrun.vocab import PLANNABLE_ARCHS


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, gguf.GGUFReader]:
    path = gguf_factory.write_model(tmp_path_factory.mktemp("valid") / "v.gguf", n_layers=1, n_vocab=8,
                                    n_embd=32, n_ff=32, extra_kv={"dup.aaa": 1, "dup.bbb": 2})
    return path.read_bytes(), gguf.GGUFReader(str(path))


def _expect_error(path: Path, *needles: str) -> str:
    with pytest.raises(GGUFError) as exc:
        read_spec(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: "), msg
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_truncated_at_every_header_byte(valid: tuple[bytes, gguf.GGUFReader], tmp_path: Path) -> None:
    data, reader = valid
    end = reader.data_offset
    assert end < 4096  # keep the loop small
    path = tmp_path / "cut.gguf"
    problems = set()
    for n in range(end):
        path.write_bytes(data[:n])
        msg = _expect_error(path)
        problems.add(msg.split(": ", 1)[1].split(" (")[0].rstrip("0123456789, "))
    # every prefix fails for one of these reasons, and the reasons say what is wrong; a cut inside the padding
    # after the tensor infos leaves a whole header whose first tensor's data is missing
    assert problems == {"not a GGUF file", "truncated header", "absurd metadata count", "absurd tensor count",
                        "tensor 'token_embd.weight' data runs past the end of the file"}


def test_truncated_tensor_data(valid: tuple[bytes, gguf.GGUFReader], tmp_path: Path) -> None:
    data, reader = valid
    path = tmp_path / "short.gguf"
    for n in (reader.data_offset, reader.data_offset + 100, len(data) - 1):
        path.write_bytes(data[:n])
        _expect_error(path, "data runs past the end of the file")


def _kv_offset(reader: gguf.GGUFReader, key: str) -> int:
    return reader.fields[key].offset


def _mutated(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_bad_magic_and_version(valid: tuple[bytes, gguf.GGUFReader], tmp_path: Path) -> None:
    data, _ = valid
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGML" + data[4:])
    _expect_error(p, "not a GGUF file", "bad magic")
    for version in (1, 7):
        p.write_bytes(_mutated(data, 4, "<I", version))
        _expect_error(p, f"unsupported GGUF version {version}")
    p.write_bytes(b"")
    _expect_error(p, "not a GGUF file")


@pytest.mark.parametrize(("offset", "what"), [(8, "absurd tensor count"), (16, "absurd metadata count")])
def test_absurd_counts_do_not_allocate(valid: tuple[bytes, gguf.GGUFReader], tmp_path: Path, offset: int,
                                       what: str) -> None:
    data, _ = valid
    p = tmp_path / "count.gguf"
    p.write_bytes(_mutated(data, offset, "<Q", 1 << 40))
    tracemalloc.start()
    _expect_error(p, what, "1,099,511,627,776")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < len(data) + (1 << 20)


def test_string_longer_than_file(valid: tuple[bytes, gguf.GGUFReader], tmp_path: Path) -> None:
    data, reader = valid
    p = tmp_path / "str.gguf"
    off = _kv_offset(reader, "general.architecture")
    p.write_bytes(_mutated(data, off, "<Q", 1 << 60))
    tracemalloc.start()
    _expect_error(p, "truncated header")
    assert tracemalloc.get_traced_memory()[1] < len(data) + (1 << 20)
    tracemalloc.stop()


def test_huge_array_length(valid: tuple[bytes, gguf.GGUFReader], tmp_path: Path) -> None:
    data, reader = valid
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        field = reader.fields[key]
        klen = len(key)
        count_at = field.offset + 8 + klen + 4 + 4  # key len, key, value type, item type
        p = tmp_path / "arr.gguf"
        p.write_bytes(_mutated(data, count_at, "<Q", 1 << 50))
        tracemalloc.start()
        msg = _expect_error(p)
        assert tracemalloc.get_traced_memory()[1] < len(data) + (1 << 20)
        tracemalloc.stop()
        assert "longer than the file" in msg or "truncated" in msg


def test_unknown_value_type(valid: tuple[bytes, gguf.GGUFReader], tmp_path: Path) -> None:
    data, reader = valid
    key = "general.name"
    off = _kv_offset(reader, key) + 8 + len(key)
    p = tmp_path / "vt.gguf"
    p.write_bytes(_mutated(data, off, "<I", 99))
    _expect_error(p, "unknown metadata value type")


def test_unknown_quant_type(valid: tuple[bytes, gguf.GGUFReader], tmp_path: Path) -> None:
    data, reader = valid
    t = reader.tensors[0]
    off = t.field.offset + 8 + len(t.name) + 4 + 8 * len(t.shape)
    p = tmp_path / "qt.gguf"
    p.write_bytes(_mutated(data, off, "<I", 250))
    _expect_error(p, "unknown tensor quant type")


def test_duplicate_key_and_tensor_name(valid: tuple[bytes, gguf.GGUFReader], tmp_path: Path) -> None:
    data, _ = valid
    p = tmp_path / "dup.gguf"
    assert data.count(b"dup.bbb") == 1
    p.write_bytes(data.replace(b"dup.bbb", b"dup.aaa"))
    _expect_error(p, "duplicate metadata key")
    assert data.count(b"blk.0.attn_k.weight") == 1
    p.write_bytes(data.replace(b"blk.0.attn_k.weight", b"blk.0.attn_q.weight"))
    _expect_error(p, "duplicate tensor name", "blk.0.attn_q.weight")


def test_vocab_only_file(tmp_path: Path) -> None:
    p = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(2)
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _expect_error(p, "no tensors", "vocab-only")


def test_wrong_typed_metadata(tmp_path: Path) -> None:
    p = gguf_factory.write_model(tmp_path / "typed.gguf", extra_kv={"llama.context_length": "long"})
    _expect_error(p, "llama.context_length is 'long', expected an integer")


def test_missing_split_part(tmp_path: Path) -> None:
    first = gguf_factory.write_model(tmp_path / "s.gguf", split_max_tensors=7)
    last = first.with_name("s-00003-of-00003.gguf")
    last.unlink()
    with pytest.raises(GGUFError, match=r"s-00003-of-00003\.gguf: missing part of the split model"):
        read_spec(first)


def test_mismatched_split_part(tmp_path: Path) -> None:
    a = gguf_factory.write_model(tmp_path / "a" / "m.gguf", split_max_tensors=7)
    b = gguf_factory.write_model(tmp_path / "b" / "m.gguf", split_max_tensors=10)  # 2 parts, not 3
    second = a.with_name("m-00002-of-00003.gguf")
    second.write_bytes(b.with_name("m-00002-of-00002.gguf").read_bytes())
    with pytest.raises(GGUFError, match=r"m-00002-of-00003\.gguf: split\.count is 2, expected 3"):
        read_spec(a)


def test_cli_errors_are_one_line_exit_2(valid: tuple[bytes, gguf.GGUFReader], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    data, _ = valid
    cases = {"missing.gguf": None, "notgguf.gguf": b"hello world, not a model" * 4, "short.gguf": data[:100]}
    for name, content in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        assert main(["inspect", str(p)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mixrun: {p}: ") and err.count("\n") == 1 and "Traceback" not in err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_debug_flag_shows_traceback(tmp_path: Path) -> None:
    with pytest.raises(GGUFError):
        main(["--debug", "inspect", str(tmp_path / "nope.gguf")])


def test_non_multiple_row(valid: tuple[bytes, gguf.GGUFReader], tmp_path: Path) -> None:
    """A Q4_0 row of 48 elements is not a whole number of 32-element blocks."""
    data, reader = valid
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    dims_at = t.field.offset + 8 + len(t.name) + 4
    b = _mutated(data, dims_at, "<Q", 48)
    p = tmp_path / "rows.gguf"
    p.write_bytes(_mutated(b, dims_at + 8, "<I", int(gguf.GGMLQuantizationType.Q4_0)))
    _expect_error(p, "not a multiple")


@pytest.mark.parametrize(("values", "words"), [
    ([2.5, 2.5], "llama.attention.head_count_kv is 2.5, expected an integer"),
    ([-1, 2], "llama.attention.head_count_kv holds -1, expected integers"),
])
def test_per_layer_list_with_bad_items(tmp_path: Path, values: list, words: str) -> None:
    """A per-layer head_count_kv list is untrusted like any scalar: every item is checked."""
    p = tmp_path / "perlayer.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_array("llama.attention.head_count_kv", values)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _expect_error(p, words)


# --- budgets: bounded work for any header -------------------------------------------------------------------------

def _bounded(path: Path, *needles: str, peak_bytes: int = 4 << 20, seconds: float = 2.0) -> str:
    """One clean error within ``seconds`` and a ``peak_bytes`` tracemalloc peak, whatever the header asks for."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        msg = _expect_error(path, *needles)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    assert peak < peak_bytes, f"{msg}: peak {peak:,} bytes"
    assert elapsed < seconds, f"{msg}: {elapsed:.2f} s"
    return msg


_ARCH = ("general.architecture", gguf.GGUFValueType.STRING, gguf_factory.kv_str("llama"))


@pytest.mark.parametrize("layer", ["50000000", "1000000000", "99999999999999999999"])
def test_huge_layer_index_without_block_count(tmp_path: Path, layer: str) -> None:
    """n_layers comes from the largest blk.N only within the layer budget; past it, one line at once."""
    p = gguf_factory.raw_gguf(tmp_path / "layer.gguf", kv=[_ARCH],
                              tensors=[(f"blk.{layer}.attn_norm.weight", (32,), 0, 0)], size=400_000)
    _bounded(p, f"tensor blk.{layer} is past mixrun's limit of 4,096 layers")


def test_layer_index_at_the_budget(tmp_path: Path) -> None:
    p = gguf_factory.raw_gguf(tmp_path / "layer.gguf", kv=[_ARCH], tensors=[("blk.4095.attn_norm.weight", (32,), 0, 0)],
                              size=4096)
    assert read_spec(p).n_layers == 4096


@pytest.mark.parametrize("count", [3_000_000, 30_000_000])
def test_huge_tensor_count_in_sparse_file(tmp_path: Path, count: int) -> None:
    """Millions of zero-filled tensor infos that the file's (sparse) size could hold: refused before any is read."""
    p = gguf_factory.raw_gguf(tmp_path / "many.gguf", kv=[_ARCH], n_tensors=count, size=count * 34)
    _bounded(p, f"too many tensors ({count:,}; mixrun reads at most {budget.MAX_TENSORS:,})")


def test_huge_kv_count_in_sparse_file(tmp_path: Path) -> None:
    p = gguf_factory.raw_gguf(tmp_path / "kv.gguf", n_kv=10_000_000, size=200_000_000)
    _bounded(p, f"too many metadata entries (10,000,000; mixrun reads at most {budget.MAX_KV:,})")


def test_tensor_count_within_budget_is_linear(tmp_path: Path) -> None:
    """Parsing n tensor infos costs time and memory proportional to n (well under 1 KiB of Python objects per
    tensor), so the budget itself bounds a header's cost."""
    costs = []
    for n in (4_000, 16_000):
        tensors = [(f"blk.{i % 100}.t{i}.weight", (32,), 0, 128 * i) for i in range(n)]
        p = gguf_factory.raw_gguf(tmp_path / f"n{n}.gguf", kv=[_ARCH], tensors=tensors)
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size + 128 * n + 64)
        tracemalloc.start()
        start = time.perf_counter()
        spec = read_spec(p)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(spec.tensors) == n
        costs.append((elapsed, peak))
    (t1, m1), (t4, m4) = costs
    assert m4 < 16_000 * 1024, f"{m4:,} bytes for 16,000 tensors"
    assert m4 < 6 * m1 and t4 < 8 * t1 + 0.5, costs


def test_huge_metadata_array_is_not_materialized(tmp_path: Path) -> None:
    """A u8 array of 10^9 items in a 1 GB sparse file: refused by the array budget without touching it."""
    arr = ("tokenizer.ggml.token_type", gguf.GGUFValueType.ARRAY,
           gguf_factory.kv_array(gguf.GGUFValueType.UINT8, 10**9))
    p = gguf_factory.raw_gguf(tmp_path / "arr.gguf", kv=[_ARCH, arr], size=10**9 + 4096)
    _bounded(p, "absurd metadata array length 1,000,000,000", f"at most {budget.MAX_ARRAY_ITEMS:,} array items")


def test_long_array_within_budget_is_kept_as_a_length(tmp_path: Path) -> None:
    n = budget.MAX_LISTED_ITEMS + 1
    arr = ("foo.scores", gguf.GGUFValueType.ARRAY, gguf_factory.kv_array(gguf.GGUFValueType.UINT8, n, bytes(n)))
    p = gguf_factory.raw_gguf(tmp_path / "arr.gguf", kv=[_ARCH, arr], tensors=[("token_embd.weight", (32,), 0, 0)])
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size + 4096)
    tracemalloc.start()
    part = parse_part(str(p))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert part.fields["foo.scores"] is None and part.array_lengths["foo.scores"] == n
    assert peak < 1 << 20


def test_huge_string_in_sparse_file(tmp_path: Path) -> None:
    name = ("general.name", gguf.GGUFValueType.STRING, struct.pack("<Q", 1 << 32))
    p = gguf_factory.raw_gguf(tmp_path / "str.gguf", kv=[_ARCH, name], size=(1 << 32) + 4096)
    _bounded(p, "a metadata string of 4,294,967,296 bytes")


def test_huge_tensor_name(tmp_path: Path) -> None:
    p = gguf_factory.raw_gguf(tmp_path / "name.gguf", kv=[_ARCH], tensors=[("x" * 5000, (32,), 0, 0)])
    _bounded(p, "a tensor name of 5,000 bytes")


def test_strings_past_the_total_string_budget(tmp_path: Path) -> None:
    """Strings each within the per-string budget that add up past the total in a sparse file: refused before they
    are decoded."""
    n, big = 6, budget.MAX_STRING_BYTES - 1
    p = gguf_factory.raw_gguf(tmp_path / "hdr.gguf", kv=[_ARCH], n_kv=1 + n, size=(n + 1) * budget.MAX_STRING_BYTES)
    with open(p, "r+b") as f:
        f.seek(0, os.SEEK_END)
        at = len(gguf_factory.raw_gguf(tmp_path / "pre.gguf", kv=[_ARCH], n_kv=1 + n).read_bytes())
        for i in range(n):  # key k<i>, a string of `big` zero bytes (the hole), then the next key
            f.seek(at)
            f.write(struct.pack("<Q2sIQ", 2, f"k{i}".encode(), gguf.GGUFValueType.STRING, big))
            at += 8 + 2 + 4 + 8 + big
    _bounded(p, f"metadata strings total over {budget.MAX_STRING_TOTAL_BYTES:,} bytes", peak_bytes=8 << 20)


def test_tensor_offset_at_u64_max_is_one_line_without_warnings(tmp_path: Path) -> None:
    p = gguf_factory.raw_gguf(tmp_path / "off.gguf", kv=[_ARCH], tensors=[("token_embd.weight", (32,), 0, 2**64 - 1)],
                              size=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _bounded(p, "tensor 'token_embd.weight' data runs past the end of the file")


@pytest.mark.parametrize(("dims", "words"), [
    ((2**63, 2**63, 2**63, 2**63), "data runs past the end of the file"),
    ((2**64 - 1,), "data runs past the end of the file"),
    ((0,), "has a dimension of 0"),
    ((32, 0), "has a dimension of 0"),
])
def test_absurd_dims_are_one_line_without_warnings(tmp_path: Path, dims: tuple[int, ...], words: str) -> None:
    p = gguf_factory.raw_gguf(tmp_path / "dims.gguf", kv=[_ARCH], tensors=[("token_embd.weight", dims, 0, 0)],
                              size=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _bounded(p, "tensor 'token_embd.weight'", words)


def test_special_files_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), Path("/dev/null")):
        result: list[BaseException | None] = []

        def run(p: Path = path, result: list[BaseException | None] = result) -> None:
            try:
                read_spec(p)
                result.append(None)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                result.append(e)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(5)
        assert result, f"{path}: still blocked after 5 s"
        assert isinstance(result[0], GGUFError) and "not a regular file" in str(result[0]), result[0]


def test_cli_one_line_for_hostile_headers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        gguf_factory.raw_gguf(tmp_path / "l.gguf", kv=[_ARCH], tensors=[("blk.99999999999999999999.x", (32,), 0, 0)],
                              size=4096),
        gguf_factory.raw_gguf(tmp_path / "t.gguf", kv=[_ARCH], n_tensors=3_000_000, size=100_000_000),
        gguf_factory.raw_gguf(tmp_path / "o.gguf", kv=[_ARCH], tensors=[("a", (32,), 0, 2**64 - 1)], size=4096),
        Path("/dev/zero"),
    ]
    for p in cases:
        assert main(["inspect", str(p)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mixrun: {p}: ") and err.count("\n") == 1 and "Traceback" not in err, err


# --- shapes that contradict the metadata --------------------------------------------------------------------------

def _set_u32(path: Path, key: str, value: int) -> None:
    off = gguf.GGUFReader(str(path)).fields[key].offset + 8 + len(key) + 4
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, off, value)
    path.write_bytes(bytes(data))


def test_ffn_width_contradicting_metadata(tmp_path: Path) -> None:
    p = gguf_factory.write_model(tmp_path / "ff.gguf", n_ff=128)
    _set_u32(p, "llama.feed_forward_length", 96)
    _expect_error(p, "tensor 'blk.0.ffn_gate.weight' is 128 x 64, but the metadata say 96 x 64",
                  "llama.feed_forward_length 96")


@pytest.mark.parametrize(("key", "value", "words"), [
    ("llama.attention.key_length", 0, "llama.attention.key_length is 0, outside 1.."),
    ("llama.attention.key_length", 8, "tensor 'blk.0.attn_q.weight' is 128 x 64, but the metadata say 32 x 64"),
    ("llama.attention.head_count_kv", 1, "tensor 'blk.0.attn_k.weight' is 64 x 64, but the metadata say 32 x 64"),
    ("llama.embedding_length", 48, "tensor 'token_embd.weight' is 64 x 64, but the metadata say * x 48"),
])
def test_attention_shapes_contradicting_metadata(tmp_path: Path, key: str, value: int, words: str) -> None:
    p = gguf_factory.write_model(tmp_path / "att.gguf", n_embd=64, n_head=4, n_head_kv=2, head_dim=32)
    _set_u32(p, key, value)
    _expect_error(p, words)


def test_unknown_architecture_shapes_still_inspect(tmp_path: Path) -> None:
    """Contradictions are only checked where mixrun knows the layout; other architectures still inspect."""
    p = gguf_factory.write_model(tmp_path / "foo.gguf", arch="mamba", n_ff=128)
    _set_u32(p, "mamba.feed_forward_length", 96)
    spec = read_spec(p)
    assert not spec.plannable and spec.n_ff == 96


@pytest.mark.parametrize("arch", sorted(PLANNABLE_ARCHS))
def test_consistent_shapes_pass_for_every_plannable_arch(tmp_path: Path, arch: str) -> None:
    spec = read_spec(gguf_factory.write_model(tmp_path / f"{arch}.gguf", arch, head_dim=32, n_ff=96, sparse=True))
    assert spec.plannable, spec.not_plannable

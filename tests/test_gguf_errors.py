"""Untrusted GGUF input: every malformed file is one clean GGUFError naming the file, never a traceback, and
never allocates anywhere near what a corrupt count or length asks for."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest

import gguf_factory
from mixrun.cli import main
from mixrun.errors import GGUFError
from mixrun.model.gguf import read_spec


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

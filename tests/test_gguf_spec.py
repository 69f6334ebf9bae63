"""GGUF -> ModelSpec: the bundled SmolLM2, every planned architecture, and split files."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

import gguf_factory
from mixrun.model.gguf import read_spec, split_parts


def test_smollm2_facts(smollm2: str) -> None:
    spec = read_spec(smollm2)
    assert (spec.arch, spec.n_layers, spec.n_embd, spec.n_head, spec.n_head_kv) == ("llama", 30, 576, 9, 3)
    assert (spec.head_dim, spec.n_ff, spec.n_vocab, spec.n_ctx_train) == (64, 1536, 49152, 8192)
    assert spec.tied_output and "output.weight" not in {t.name for t in spec.tensors}
    mix = spec.quant_mix()
    assert set(mix) == {"Q4_1", "Q8_0", "F32"}
    assert mix["Q8_0"] == (1, 30081024)  # token_embd
    assert spec.total_bytes == sum(t.n_bytes for t in spec.tensors) == 96576768
    assert sum(spec.layer_bytes) + sum(spec.other_bytes.values()) == spec.total_bytes
    assert len(spec.layer_bytes) == 30 and len(set(spec.layer_bytes)) == 1
    # 30 layers x 3 KV heads x 64 x (K + V) x 2 bytes
    assert spec.kv_bytes_per_token("f16") == 30 * 3 * 64 * 2 * 2
    assert spec.kv_bytes_per_token("q8_0") == 30 * 3 * 2 * (64 // 32) * 34
    assert spec.kv_bytes_per_token("q4_0") == 30 * 3 * 2 * (64 // 32) * 18
    assert spec.tokenizer_model == "gpt2" and spec.has_chat_template
    assert spec.plannable and spec.rope.freq_base == 100000.0
    assert spec.n_params == sum(t.n_elements for t in spec.tensors)
    assert 5.0 < spec.bits_per_weight < 6.5
    embd = next(t for t in spec.tensors if t.name == "token_embd.weight")
    assert embd.shape == (49152, 576)  # row-major: (n_vocab, n_embd)


def test_spec_agrees_with_stock_reader(tiny_llama: Path) -> None:
    """The bounded reader's tensor table equals gguf-py's own."""
    spec = read_spec(tiny_llama)
    stock = gguf.GGUFReader(str(tiny_llama))
    assert [(t.name, t.tensor_type.name, tuple(reversed(t.shape.tolist())), int(t.n_bytes)) for t in stock.tensors] \
        == [(t.name, t.qtype, t.shape, t.n_bytes) for t in spec.tensors]


@pytest.mark.parametrize(
    ("arch", "kwargs", "head_dim", "swa_layers"),
    [
        ("llama", {}, 16, 0),
        ("qwen2", {}, 16, 0),
        ("qwen3", {"head_dim": 32}, 32, 0),  # explicit head dim wider than n_embd / n_head
        ("gemma2", {"sliding_window": 16, "n_layers": 4}, 16, 2),  # every other layer
        ("gemma3", {"sliding_window": 16, "n_layers": 12}, 16, 10),  # 5 of every 6
        ("phi3", {}, 16, 0),
    ],
)
def test_architectures(tiny_dir: Path, arch: str, kwargs: dict, head_dim: int, swa_layers: int) -> None:
    path = gguf_factory.write_model(tiny_dir / f"arch-{arch}.gguf", arch, **kwargs)
    spec = read_spec(path)
    assert spec.arch == arch and spec.plannable
    assert spec.head_dim == head_dim
    assert sum(kv.sliding for kv in spec.kv_layers) == swa_layers
    assert spec.kv_bytes_per_token("f16") == spec.n_layers * 2 * head_dim * 2 * 2
    names = {t.name for t in spec.tensors}
    if arch == "qwen2":
        assert "blk.0.attn_q.bias" in names
    if arch == "qwen3":
        assert "blk.0.attn_q_norm.weight" in names
        q = next(t for t in spec.tensors if t.name == "blk.0.attn_q.weight")
        assert q.shape == (4 * 32, 64)
    if arch == "phi3":
        assert "blk.0.attn_qkv.weight" in names


def test_unknown_architecture_inspects_but_is_not_plannable(tiny_dir: Path) -> None:
    path = gguf_factory.write_model(tiny_dir / "mamba.gguf", "mamba")
    spec = read_spec(path)
    assert spec.arch == "mamba" and spec.n_layers == 2
    assert not spec.plannable and "not plannable yet" in spec.not_plannable


def test_untied_output(tiny_dir: Path) -> None:
    spec = read_spec(gguf_factory.write_model(tiny_dir / "untied.gguf", tied=False))
    assert not spec.tied_output and "output.weight" in spec.other_bytes


def test_split_model_inspects_like_single_file(tiny_dir: Path) -> None:
    single = read_spec(gguf_factory.write_model(tiny_dir / "whole.gguf", seed=3))
    first = gguf_factory.write_model(tiny_dir / "parts" / "whole.gguf", seed=3, split_max_tensors=7)
    parts = split_parts(str(first))
    assert len(parts) == 3
    for any_part in parts:  # any part finds the others
        spec = read_spec(any_part)
        assert spec.files == tuple(parts)
        assert spec.tensors == single.tensors
        assert spec.kv_layers == single.kv_layers and spec.total_bytes == single.total_bytes


def test_split_smollm2_copy_matches_single(smollm2: str, tmp_path: Path) -> None:
    """A 3-part copy of the bundled model, written with gguf's own splitter, inspects identically."""
    src = gguf.GGUFReader(smollm2)
    w = gguf.GGUFWriter(str(tmp_path / "smol.gguf"), "llama", split_max_tensors=100)
    for name, field in src.fields.items():
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub)
    for t in src.tensors:
        w.add_tensor(t.name, t.data, raw_shape=None if t.tensor_type.name in ("F32", "F16") else t.data.shape,
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    parts = sorted(tmp_path.glob("smol-*-of-*.gguf"))
    assert len(parts) == 3
    single, split = read_spec(smollm2), read_spec(parts[1])
    assert split.tensors == single.tensors
    for field in ("arch", "n_layers", "n_embd", "n_head", "n_head_kv", "n_vocab", "total_bytes", "tied_output"):
        assert getattr(split, field) == getattr(single, field), field


def test_metadata_arrays_read_back(tmp_path: Path, smollm2: str) -> None:
    """Array values and lengths from the bounded reader equal gguf-py's own, for scalar and string arrays."""
    from mixrun.model.gguf import parse_part

    part = parse_part(smollm2)
    stock = gguf.GGUFReader(smollm2)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert part.array_lengths[key] == len(stock.fields[key].data)
    assert part.array_lengths["tokenizer.ggml.tokens"] == 49152
    assert part.fields["tokenizer.ggml.token_type"] == stock.fields["tokenizer.ggml.token_type"].contents()
    p = gguf_factory.write_model(tmp_path / "kv.gguf", n_layers=3)
    w_spec = read_spec(p)
    assert w_spec.n_vocab == 64
    # per-layer KV heads (as some models store them) become per-layer KV figures
    q = tmp_path / "perlayer.gguf"
    w = gguf.GGUFWriter(str(q), "llama")
    w.add_block_count(3)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_array("llama.attention.head_count_kv", [4, 2, 1])
    w.add_tensor("token_embd.weight", gguf_factory.np.zeros((8, 64), dtype=gguf_factory.np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    spec = read_spec(q)
    assert [kv.n_head_kv for kv in spec.kv_layers] == [4, 2, 1] and spec.n_head_kv == 4
    assert spec.kv_bytes_per_token("f16") == (4 + 2 + 1) * 16 * 2 * 2


@pytest.mark.parametrize("arch", ["llama", "evil\x1b[2J\x1b]0;title\x07"])
def test_inspect_escapes_untrusted_strings(tmp_path: Path, arch: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A file's name, architecture and tensor names reach the terminal inert: no ESC/OSC/BEL, no rich markup."""
    from mixrun.cli import main

    s = gguf.GGUFValueType.STRING
    kv = [("general.architecture", s, gguf_factory.kv_str(arch)),
          ("general.name", s, gguf_factory.kv_str("\x1b]8;;http://x\x07[bold red]pwn[/]\x9b31m\u202eevil")),
          ("tokenizer.ggml.model", s, gguf_factory.kv_str("gpt2\x1b[5m"))]
    p = gguf_factory.raw_gguf(tmp_path / "esc.gguf", kv=kv, tensors=[("token_embd\x1b[31m.weight", (32,), 0, 0)],
                              size=4096)
    assert main(["inspect", "--tensors", str(p)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\x9b\u202e"), repr(out)
    assert "\\x1b]8;;http://x\\x07[bold red]pwn[/]\\x9b31m\\u202eevil" in out
    assert "token_embd\\x1b[31m.weight" in out and "gpt2\\x1b[5m" in out


def test_with_tokenizer_gives_a_random_model_a_real_vocabulary(smollm2: str, tmp_path: Path) -> None:
    """benchmarks/rig_teaches.py benches random models with SmolLM2's tokenizer: llama.cpp then tokenizes text as
    for SmolLM2, and mixrun reads the copy as a model with that vocabulary."""
    import llama_cpp

    n_vocab = len(gguf.GGUFReader(smollm2).fields["tokenizer.ggml.tokens"].data)
    raw = gguf_factory.write_model(tmp_path / "raw.gguf", "llama", n_vocab=n_vocab, tied=False, qtype="Q8_0")
    out = gguf_factory.with_tokenizer(raw, smollm2, tmp_path / "m.gguf")
    spec = read_spec(out)
    assert spec.n_vocab == n_vocab and spec.tokenizer_model == read_spec(smollm2).tokenizer_model
    assert spec.n_layers == 2 and spec.total_bytes == read_spec(raw).total_bytes  # tensors copied as they were
    text = b"Hello world, how are you?"
    ids = [llama_cpp.Llama(p, n_ctx=64, verbose=False).tokenize(text) for p in (smollm2, str(out))]
    assert ids[0] == ids[1] and len(ids[0]) > 3

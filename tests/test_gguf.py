"""model.py's GGUF reader on small files written here: every supported tensor type against its format's
formula, every metadata value type, the alignment, and clear errors for broken files."""
import struct

import numpy as np
import pytest
import torch

from checkpoints import read_gguf

# GGUF metadata value types (spec: ggml docs/gguf.md)
U8, I8, U16, I16, U32, I32, F32V, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32V: "<f", BOOL: "<?", U64: "<Q",
        I64: "<q", F64: "<d"}
F32, F16, Q4_1, Q8_0, Q4_K, BF16 = 0, 1, 3, 8, 12, 30


def gguf_string(s):
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_value(vtype, value):
    if vtype == STRING:
        return gguf_string(value)
    if vtype == ARRAY:
        itype, items = value
        return struct.pack("<IQ", itype, len(items)) + b"".join(gguf_value(itype, v) for v in items)
    return struct.pack(_FMT[vtype], value)


def gguf_file(metadata=(), tensors=(), version=3, alignment=32):
    """Bytes of a GGUF file. metadata: [(key, type, value)]; tensors: [(name, ggml type, dims, raw bytes)]
    with dims innermost first; data laid out in order, each piece padded to the alignment."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, vtype, value in metadata:
        out += gguf_string(key) + struct.pack("<I", vtype) + gguf_value(vtype, value)
    data, offsets = b"", []
    for _, _, _, raw in tensors:
        offsets.append(len(data))
        data += raw + bytes(-len(raw) % alignment)
    for (name, ggml_type, dims, _), offset in zip(tensors, offsets):
        out += gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
    return out + bytes(-len(out) % alignment) + data


def write(tmp_path, raw, name="t.gguf"):
    path = tmp_path / name
    path.write_bytes(raw)
    return str(path)


def test_plain_float_types(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 8)).astype(np.float32)            # torch shape (3, 8): dims [8, 3]
    bf16_bits = (w.view(np.uint32) >> 16).astype(np.uint16)        # bfloat16: the top 16 bits
    path = write(tmp_path, gguf_file(tensors=[
        ("f32", F32, [8, 3], w.tobytes()),
        ("f16", F16, [8, 3], w.astype(np.float16).tobytes()),
        ("bf16", BF16, [8, 3], bf16_bits.tobytes())]))
    _, t = read_gguf(path)
    assert t["f32"].dtype == torch.float32 and t["f32"].shape == (3, 8)
    assert torch.equal(t["f32"], torch.from_numpy(w))
    assert torch.equal(t["f16"], torch.from_numpy(w.astype(np.float16).astype(np.float32)))
    expected_bf16 = (bf16_bits.astype(np.uint32) << 16).view(np.float32)
    assert torch.equal(t["bf16"], torch.from_numpy(expected_bf16))
    assert (t["bf16"] - t["f32"]).abs().max() <= 2 ** -7 * t["f32"].abs().max()   # truncation, 8 mantissa bits


def test_q8_0_blocks(tmp_path):
    rng = np.random.default_rng(1)
    n_blocks = 6                                                    # 2 rows of 96 weights
    d = rng.uniform(0.001, 0.1, n_blocks).astype(np.float16)
    q = rng.integers(-128, 128, (n_blocks, 32)).astype(np.int8)
    raw = b"".join(d[i].tobytes() + q[i].tobytes() for i in range(n_blocks))      # 34 bytes a block
    _, t = read_gguf(write(tmp_path, gguf_file(tensors=[("w", Q8_0, [96, 2], raw)])))
    expected = (d.astype(np.float64)[:, None] * q).reshape(2, 96)                 # w = d * q
    assert t["w"].shape == (2, 96)
    np.testing.assert_allclose(t["w"].numpy(), expected, rtol=1e-6, atol=0)


def test_q4_1_blocks(tmp_path):
    rng = np.random.default_rng(2)
    n_blocks = 4                                                    # 4 rows of 32 weights
    d = rng.uniform(0.001, 0.1, n_blocks).astype(np.float16)
    m = rng.uniform(-0.5, 0.0, n_blocks).astype(np.float16)
    q = rng.integers(0, 16, (n_blocks, 32)).astype(np.uint8)
    packed = (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)        # weight j low nibble, j + 16 high nibble
    raw = b"".join(d[i].tobytes() + m[i].tobytes() + packed[i].tobytes() for i in range(n_blocks))  # 20 bytes
    _, t = read_gguf(write(tmp_path, gguf_file(tensors=[("w", Q4_1, [32, 4], raw)])))
    expected = d.astype(np.float64)[:, None] * q + m.astype(np.float64)[:, None]  # w = d * q + m
    np.testing.assert_allclose(t["w"].numpy(), expected, rtol=1e-6, atol=1e-7)


def test_metadata_value_types_and_alignment(tmp_path):
    meta = [("u8", U8, 200), ("i8", I8, -5), ("u16", U16, 60000), ("i16", I16, -3000), ("u32", U32, 4_000_000_000),
            ("i32", I32, -7), ("f32", F32V, 1e-5), ("yes", BOOL, True), ("name", STRING, "Smöl"),
            ("u64", U64, 2**63), ("i64", I64, -2**40), ("f64", F64, 0.1),
            ("tokens", ARRAY, (STRING, ["a", "Ġb", ""])), ("types", ARRAY, (I32, [1, 3, 6])),
            ("nested", ARRAY, (ARRAY, [(U8, [1, 2]), (U8, [])])), ("general.alignment", U32, 64)]
    w = np.arange(4, dtype=np.float32)
    path = write(tmp_path, gguf_file(meta, [("a", F32, [4], w.tobytes()), ("b", F32, [4], (w + 1).tobytes())],
                                     alignment=64))
    md, t = read_gguf(path)
    assert md["u8"] == 200 and md["i8"] == -5 and md["u16"] == 60000 and md["i16"] == -3000
    assert md["u32"] == 4_000_000_000 and md["i32"] == -7 and md["f32"] == 1e-5 and md["yes"] is True
    assert md["name"] == "Smöl" and md["u64"] == 2**63 and md["i64"] == -2**40 and md["f64"] == 0.1
    assert md["tokens"] == ["a", "Ġb", ""] and md["types"] == [1, 3, 6] and md["nested"] == [[1, 2], []]
    assert torch.equal(t["b"], torch.from_numpy(w + 1))            # found at offset 64, not 16
    assert read_gguf(path, dequantize=False)[1]["b"] == {"type": "F32", "shape": (4,)}


def test_version_2_reads(tmp_path):
    path = write(tmp_path, gguf_file([("k", STRING, "v")], version=2))
    assert read_gguf(path)[0] == {"k": "v"}


def good_file():
    return gguf_file([("general.name", STRING, "tiny"), ("tokens", ARRAY, (STRING, ["x"] * 10))],
                     [("w", F32, [8, 2], np.ones(16, np.float32).tobytes())])


@pytest.mark.parametrize("raw, words", [
    (b"", "not a GGUF file"),
    (b"GGML" + good_file()[4:], "not a GGUF file"),
    (good_file()[:4] + struct.pack("<I", 1) + good_file()[8:], "version 1"),
    (good_file()[: len(good_file()) // 2], "truncated"),
    (good_file()[:-8], "past the end of the file"),
    (good_file()[:16] + struct.pack("<Q", 2**60) + good_file()[24:], "key-value count"),
    (good_file()[:8] + struct.pack("<Q", 2**50) + good_file()[16:], "tensor count"),
])
def test_broken_files_fail_clearly(tmp_path, raw, words):
    path = write(tmp_path, raw)
    with pytest.raises(ValueError, match=words) as e:
        read_gguf(path)
    assert path in str(e.value)                                     # the message names the file


def test_absurd_string_length(tmp_path):
    raw = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**62) + b"key" + bytes(64)
    with pytest.raises(ValueError, match="length of metadata key #0 is 4611686018427387904"):
        read_gguf(write(tmp_path, raw))
    raw = gguf_file([("tokens", ARRAY, (STRING, ["a", "b"]))])
    raw = raw.replace(struct.pack("<IQ", STRING, 2), struct.pack("<IQ", STRING, 2**40))   # the array's count
    with pytest.raises(ValueError, match="length of array metadata 'tokens'"):
        read_gguf(write(tmp_path, raw))


def test_unknown_and_unsupported_types(tmp_path):
    with pytest.raises(ValueError, match="unknown ggml type 99"):
        read_gguf(write(tmp_path, gguf_file(tensors=[("w", 99, [32], bytes(32))])))
    path = write(tmp_path, gguf_file(tensors=[("w", Q4_K, [256], bytes(144))]))
    with pytest.raises(ValueError, match="'w' has ggml type Q4_K, which this reader does not dequantize"):
        read_gguf(path)
    assert read_gguf(path, dequantize=False)[1]["w"]["type"] == "Q4_K"   # the metadata is still readable
    raw = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("k") + struct.pack("<I", 13) + bytes(8)
    with pytest.raises(ValueError, match="unknown GGUF value type 13"):
        read_gguf(write(tmp_path, raw))


def test_bad_tensor_infos(tmp_path):
    with pytest.raises(ValueError, match="multiple of its block of 32"):          # Q8_0 rows of 16 weights
        read_gguf(write(tmp_path, gguf_file(tensors=[("w", Q8_0, [16, 4], bytes(34 * 2))])))
    with pytest.raises(ValueError, match="5 dimensions"):
        read_gguf(write(tmp_path, gguf_file(tensors=[("w", F32, [1, 1, 1, 1, 1], bytes(4))])))
    with pytest.raises(ValueError, match="power of two"):
        read_gguf(write(tmp_path, gguf_file([("general.alignment", U32, 24)])))
    raw = gguf_file(tensors=[("a", F32, [8], bytes(32)), ("b", F32, [8], bytes(32))])
    raw = raw.replace(gguf_string("b") + struct.pack("<I", 1) + struct.pack("<Q", 8) + struct.pack("<IQ", F32, 32),
                      gguf_string("b") + struct.pack("<I", 1) + struct.pack("<Q", 8) + struct.pack("<IQ", F32, 0))
    with pytest.raises(ValueError, match="overlap"):
        read_gguf(write(tmp_path, raw))
    info = gguf_string("a") + struct.pack("<I", 1) + struct.pack("<Q", 8) + struct.pack("<I", F32)
    raw = gguf_file(tensors=[("a", F32, [8], bytes(32))]).replace(info + struct.pack("<Q", 0),
                                                                    info + struct.pack("<Q", 4))
    with pytest.raises(ValueError, match="not a multiple of the alignment"):
        read_gguf(write(tmp_path, raw))

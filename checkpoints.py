"""
checkpoints.py: how the world stores a language model, read into model.py's models. A lesson of its own in
the file formats of Hugging Face and llama.cpp (as llama2.c keeps export.py beside its model):

  1. safetensors      - a JSON header and raw tensor bytes (Hugging Face)
  2. the loading rule - nothing of the file silently dropped, nothing of the model left random
  3. GGUF             - llama.cpp's single file: metadata, tensor infos, block-quantized data (Q4_1, Q8_0, ...)
  4. HF directories   - config.json + model.safetensors or its shards
  5. the tokenizer    - the checkpoint's byte-level BPE as a tiktoken.Encoding
  6. load_pretrained  - (model, tokenizer) from a .gguf file or a directory

    model, enc = load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")   # or a Hugging Face directory
    out = model.generate(torch.tensor([enc.encode("To be")]), 20, seed=0)

Every header, count, length and offset of a file is validated before it is trusted. Imports model.py (the
models it builds) and nothing above it.
"""
import json
import math
import os
import re
import struct
import warnings

import numpy as np
import tiktoken
import torch

from model import GPT, SIZES, Llama, LlamaConfig, from_config, is_config_type


# ==== 1. safetensors ============================================================================
# safetensors: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
# then the raw little-endian tensor bytes; offsets are relative to the end of the header.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
                       "BOOL": torch.bool, "C64": torch.complex64}
if hasattr(torch, "float8_e8m0fnu"):       # torch >= 2.7: the scale type of the MX formats
    _SAFETENSORS_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
# the rest of the format's dtypes, refused by name: sub-byte floats (packed several to a byte)
_SAFETENSORS_UNSUPPORTED = ("F4", "F6_E2M3", "F6_E3M2", "F8_E8M0")


def load_safetensors(path):
    """Read a .safetensors file into {name: tensor}, validating the header before trusting it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise ValueError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, 100 * 2**20):
            raise ValueError(f"{path}: header length {header_len} does not fit in a file of {size} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: header is not valid JSON ({e})") from None
        data = f.read()
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        kind = info.get("dtype") if isinstance(info, dict) else None
        if isinstance(kind, str) and kind not in _SAFETENSORS_DTYPES:
            what = ("a dtype of the safetensors format this reader does not support"
                    if kind in _SAFETENSORS_UNSUPPORTED else "not a dtype of the safetensors format")
            raise ValueError(f"{path}: tensor {name!r} has dtype {kind}, {what} (it reads "
                             f"{', '.join(_SAFETENSORS_DTYPES)}): convert that tensor, e.g. to F16 or BF16")
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not (0 <= start <= end <= len(data)) or end - start != nbytes or min(shape, default=0) < 0:
            raise ValueError(f"{path}: tensor {name!r} offsets {start}..{end} do not match its "
                             f"shape {shape} / dtype {info['dtype']} or the file size")
        buf = bytearray(data[start:end])  # a writable copy, so the tensor owns its memory
        t = torch.frombuffer(buf, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(shape).clone()
    return tensors


# ==== 2. the loading rule ========================================================================
# For every checkpoint: nothing of the file silently dropped, nothing of the model left random

def untied_head(tensors, embed_key):
    """True when `tensors` holds its own output head: an lm_head.weight that differs from the embedding.
    One equal to the embedding is the tied head stored twice; it is removed from `tensors` (it is used)."""
    head = tensors.get("lm_head.weight")
    if head is None:
        return False
    if head.shape == tensors[embed_key].shape and torch.equal(head, tensors[embed_key]):
        del tensors["lm_head.weight"]
        return False
    return True


def empty_model(build):
    """build() run on the meta device, then given uninitialized memory on the CPU: for a loader, which
    overwrites every parameter (load_state checks that), the random initialization is wasted time."""
    with torch.device("meta"):
        model = build()
    first, ties = {}, []                         # to_empty gives each use of a tied weight its own memory:
    for name, p in model.named_parameters(remove_duplicate=False):  # note the ties, and tie again after
        ties += [(name, first[p])] if p in first else []
        first.setdefault(p, name)
    model.to_empty(device="cpu")
    for name, source in ties:
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(source))
    return model


def load_state(model, tensors, source, ignore=()):
    """Copy `tensors` {state_dict key: tensor} into `model` (dtype converted) and return the model.

    Every parameter of the model must be there with its shape, and every tensor must be used or end with
    a suffix in `ignore`; otherwise a ValueError lists the names (source: the file, for the message)."""
    sd = model.state_dict()
    tied = getattr(model.config, "tie_embeddings", True)
    expected = [k for k in sd if not (k == "lm_head.weight" and tied)]    # a tied head is the embedding
    missing = [k for k in expected if k not in tensors]
    unused = [k for k in tensors if k not in expected and not k.endswith(tuple(ignore))]
    if missing or unused:
        def names(keys):
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise ValueError(f"{source} does not match the {type(model).__name__} built from its configuration: "
                         + (f"missing tensors: {names(missing)}; " if missing else "")
                         + (f"tensors the model has no place for: {names(unused)}" if unused else "")
                         + " (a different architecture, or a variant this loader does not know?)")
    for key in expected:
        t = tensors[key]
        if tuple(t.shape) != tuple(sd[key].shape):
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(sd[key].shape)}")
        if sd[key].is_floating_point() and not t.is_floating_point():
            raise ValueError(f"{source}: tensor {key!r} holds {t.dtype} values where the model has a float "
                             f"({sd[key].dtype}) parameter: an integer, bool or complex tensor is not a weight "
                             "(a quantized or corrupt checkpoint?); store it as F32, F16 or BF16")
        with torch.no_grad():
            sd[key].copy_(t)
    return model


def gpt2_from_hf(directory, **overrides):
    """Build model.py's GPT in GPT-2's shape from `directory`/model.safetensors (Hugging Face key names). A stored
    lm_head.weight that differs from wte.weight becomes an untied head; any tensor the model does not
    use is an error that lists it (load_state)."""
    path = os.path.join(directory, "model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: put a GPT-2 model.safetensors in {directory}")
    tensors = load_safetensors(path)
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}  # both layouts occur
    blocks = [int(k.split(".")[1]) for k in tensors if re.match(r"h\.\d+\.", k)]
    if not blocks or "wte.weight" not in tensors or "wpe.weight" not in tensors:
        raise ValueError(f"{path} has no GPT-2 blocks (h.0...) or no wte/wpe embeddings: is it a GPT-2 "
                         "checkpoint in Hugging Face's key names?")
    cfg_path = os.path.join(directory, "config.json")
    if os.path.exists(cfg_path):
        check_promised_head(read_json(cfg_path), cfg_path, tensors, directory)
    n_layer, n_embd = 1 + max(blocks), tensors["wte.weight"].shape[1]
    config = dict(SIZES["gpt2"], n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 64,  # GPT-2: 64 a head
                  vocab_size=tensors["wte.weight"].shape[0], block_size=tensors["wpe.weight"].shape[0],
                  tie_embeddings=not untied_head(tensors, "wte.weight"))
    config.update(overrides)
    model = empty_model(lambda: GPT(config))
    # HF's GPT-2 uses Conv1D modules whose weights are stored (in, out): transpose into nn.Linear
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ours = {(k if k == "lm_head.weight" else "transformer." + k): (t.t() if k.endswith(transposed) else t)
            for k, t in tensors.items()}
    # .attn.bias / .attn.masked_bias: the causal masks HF stores as buffers; scaled_dot_product_attention
    # builds its own
    return load_state(model, ours, path, ignore=(".attn.bias", ".attn.masked_bias"))


# ==== 3. GGUF ===================================================================================
# llama.cpp's single-file format (spec: ggml's docs/gguf.md). Little-endian throughout:
#   magic "GGUF", uint32 version, uint64 tensor count, uint64 key-value count,
#   key-values: string key, uint32 value type, value (an array: uint32 item type, uint64 count, items),
#   tensor infos: string name, uint32 n_dims, uint64 dims[n_dims] (innermost first), uint32 ggml type,
#                 uint64 offset into the data section,
#   padding to the alignment (general.alignment, default 32), then the data section.
# A string is a uint64 byte length and UTF-8 bytes. Every count, length and offset is checked against the
# bytes that are really there before it is trusted.

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)          # version 1 (32-bit counts) predates every file in circulation
GGUF_DEFAULT_ALIGNMENT = 32     # bytes, when the file has no general.alignment
GGUF_MAX_DIMS = 4               # ggml tensors have at most 4 dimensions
GGUF_MAX_NESTING = 4            # arrays of arrays deeper than this are taken as corruption

# metadata value types -> numpy dtype of one item (8: string, 9: array)
_GGUF_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
                 10: "<u8", 11: "<i8", 12: "<f8"}
_GGUF_BOOL, _GGUF_STRING, _GGUF_ARRAY = 7, 8, 9
_STRUCT_FORMATS = {"<u1": "<B", "<i1": "<b", "<u2": "<H", "<i2": "<h", "<u4": "<I", "<i4": "<i", "<f4": "<f",
                   "<u8": "<Q", "<i8": "<q", "<f8": "<d"}   # the same, for one scalar at a time

# ggml tensor types: name, weights per block, bytes per block for the ones this file dequantizes
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2)}
# the others, by name, so that an error can say what the file holds
GGML_OTHER_TYPES = {2: "Q4_0", 6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
                    14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
                    21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
                    29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0"}


class _GGUFReader:
    """A cursor over the bytes of a GGUF file that refuses to read past the end."""

    def __init__(self, path, data):
        self.path, self.data, self.pos = path, data, 0

    def left(self):
        return len(self.data) - self.pos

    def take(self, n, what):
        if n > self.left():
            raise ValueError(f"{self.path}: truncated or corrupt GGUF file: {what} needs {n} bytes at offset "
                             f"{self.pos}, only {self.left()} left")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def scalar(self, dtype, what):
        fmt = _STRUCT_FORMATS[dtype]
        (v,) = struct.unpack(fmt, self.take(struct.calcsize(fmt), what))
        return float(str(np.float32(v))) if dtype == "<f4" else v  # float32: its shortest decimal, 1e-05

    def count(self, what, item_bytes):
        """A uint64 count of items of at least item_bytes bytes each, checked against the bytes left."""
        n = self.scalar("<u8", what)
        if n * item_bytes > self.left():
            raise ValueError(f"{self.path}: corrupt GGUF file: {what} is {n}, but only {self.left()} bytes are "
                             "left (truncated, or not a GGUF file)")
        return n

    def string(self, what):
        raw = self.take(self.count(f"the length of {what}", 1), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: {what} is not valid UTF-8 (corrupt GGUF file)") from None

    def value(self, vtype, what, depth=0):
        if vtype in _GGUF_SCALARS:
            v = self.scalar(_GGUF_SCALARS[vtype], what)
            if vtype == _GGUF_BOOL:
                if v not in (0, 1):
                    raise ValueError(f"{self.path}: {what} is a bool stored as {v} (corrupt GGUF file)")
                v = bool(v)
            return v
        if vtype == _GGUF_STRING:
            return self.string(what)
        if vtype != _GGUF_ARRAY:
            raise ValueError(f"{self.path}: {what} has unknown GGUF value type {vtype} (corrupt file, or a newer "
                             "GGUF version than this reader knows)")
        if depth >= GGUF_MAX_NESTING:
            raise ValueError(f"{self.path}: {what} nests arrays more than {GGUF_MAX_NESTING} deep (corrupt file)")
        itype = self.scalar("<u4", f"the item type of {what}")
        if itype in _GGUF_SCALARS:                                   # numbers: one vectorized read
            dtype = np.dtype(_GGUF_SCALARS[itype])
            n = self.count(f"the length of array {what}", dtype.itemsize)
            items = np.frombuffer(self.take(n * dtype.itemsize, what), dtype=dtype)
            if itype == _GGUF_BOOL:
                if (items > 1).any():
                    raise ValueError(f"{self.path}: array {what} holds bools other than 0/1 (corrupt GGUF file)")
                items = items.astype(bool)
            return items.tolist()
        if itype not in (_GGUF_STRING, _GGUF_ARRAY):
            raise ValueError(f"{self.path}: array {what} has unknown item type {itype} (corrupt GGUF file)")
        n = self.count(f"the length of array {what}", 8 if itype == _GGUF_STRING else 12)
        return [self.value(itype, f"{what}[{i}]", depth + 1) for i in range(n)]


def read_gguf(path, dequantize=True):
    """Read a GGUF file: returns (metadata {key: value}, tensors {name: torch.float32 tensor}).

    Shapes are torch's (outermost first: GGUF lists the innermost dimension first). Tensors of type F32,
    F16, BF16, Q8_0 and Q4_1 are dequantized; any other type is a ValueError naming it. With
    dequantize=False, tensors maps each name to {"type": ggml type name, "shape": shape} and no tensor data
    is decoded (the metadata alone: a tokenizer, a config). A bad magic or version, a truncated file,
    counts or lengths past the end of the file, an unknown type, misaligned or out-of-range offsets: a
    ValueError naming the file and what is wrong."""
    with open(path, "rb") as f:
        data = f.read()
    r = _GGUFReader(path, data)
    magic = r.take(4, "the magic") if len(data) >= 4 else data
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (starts with {bytes(magic)!r}, expected {GGUF_MAGIC!r})")
    version = r.scalar("<u4", "the version")
    if version not in GGUF_VERSIONS and struct.unpack(">I", struct.pack("<I", version))[0] in GGUF_VERSIONS:
        raise ValueError(f"{path}: a big-endian GGUF file (its version bytes read {version} little-endian, "
                         f"{struct.unpack('>I', struct.pack('<I', version))[0]} swapped); this reader reads "
                         "little-endian GGUF files only: use the little-endian file of the model (llama.cpp's "
                         "converter writes one unless given --bigendian)")
    if version not in GGUF_VERSIONS:
        raise ValueError(f"{path}: GGUF version {version}; this reader knows versions {GGUF_VERSIONS}")
    n_tensors = r.scalar("<u8", "the tensor count")
    n_kv = r.count("the metadata key-value count", 8 + 4 + 1)          # a key, a type, at least one byte
    if n_tensors * (8 + 4 + 4 + 8) > r.left():                          # a name, n_dims, a type, an offset
        raise ValueError(f"{path}: corrupt GGUF file: tensor count {n_tensors} does not fit in the "
                         f"{r.left()} bytes left")

    metadata = {}
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}")
        if key in metadata:
            raise ValueError(f"{path}: metadata key {key!r} appears twice (corrupt GGUF file)")
        metadata[key] = r.value(r.scalar("<u4", f"the value type of {key!r}"), f"metadata {key!r}")
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not (isinstance(alignment, int) and not isinstance(alignment, bool) and alignment > 0
            and alignment & (alignment - 1) == 0):
        raise ValueError(f"{path}: general.alignment must be a power of two, got {alignment!r}")

    infos = {}
    for i in range(n_tensors):
        name = r.string(f"the name of tensor #{i}")
        n_dims = r.scalar("<u4", f"the number of dimensions of {name!r}")
        if not 1 <= n_dims <= GGUF_MAX_DIMS:
            raise ValueError(f"{path}: tensor {name!r} has {n_dims} dimensions (1 to {GGUF_MAX_DIMS} allowed)")
        dims = [r.scalar("<u8", f"dimension {d} of {name!r}") for d in range(n_dims)]
        ggml_type = r.scalar("<u4", f"the type of {name!r}")
        offset = r.scalar("<u8", f"the offset of {name!r}")
        if ggml_type not in GGML_TYPES and ggml_type not in GGML_OTHER_TYPES:
            raise ValueError(f"{path}: tensor {name!r} has unknown ggml type {ggml_type} (corrupt file, or a "
                             "type newer than this reader)")
        if name in infos:
            raise ValueError(f"{path}: tensor name {name!r} appears twice (corrupt GGUF file)")
        if min(dims) < 1 or offset % alignment:
            raise ValueError(f"{path}: tensor {name!r} has dimensions {dims} (each must be >= 1) or an offset "
                             f"{offset} not a multiple of the alignment {alignment}")
        infos[name] = (dims, ggml_type, offset)
    data_start = -(-r.pos // alignment) * alignment                    # padding up to the alignment

    tensors, extents = {}, []
    for name, (dims, ggml_type, offset) in infos.items():
        shape = tuple(reversed(dims))                                   # GGUF: innermost first
        if ggml_type not in GGML_TYPES:
            if dequantize:
                raise ValueError(f"{path}: tensor {name!r} has ggml type {GGML_OTHER_TYPES[ggml_type]}, which this "
                                 f"reader does not dequantize (it reads {', '.join(t[0] for t in GGML_TYPES.values())})")
            tensors[name] = {"type": GGML_OTHER_TYPES[ggml_type], "shape": shape}
            continue
        type_name, block, block_bytes = GGML_TYPES[ggml_type]
        if dims[0] % block:
            raise ValueError(f"{path}: tensor {name!r} ({type_name}) has rows of {dims[0]} weights, not a "
                             f"multiple of its block of {block}")
        start, nbytes = data_start + offset, math.prod(dims) // block * block_bytes
        if start + nbytes > len(data):
            raise ValueError(f"{path}: tensor {name!r} ends at byte {start + nbytes}, past the end of the file "
                             f"({len(data)} bytes): truncated or corrupt")
        extents.append((start, start + nbytes, name))
        tensors[name] = (_dequantize(data, start, math.prod(dims), type_name).reshape(shape) if dequantize
                         else {"type": type_name, "shape": shape})
    extents.sort()
    for (_, end, a), (start, _, b) in zip(extents, extents[1:]):
        if start < end:
            raise ValueError(f"{path}: the data of tensors {a!r} and {b!r} overlap (corrupt GGUF file)")
    return metadata, tensors


def _dequantize(data, start, n, type_name):
    """n weights of ggml type `type_name` at byte `start` of `data` -> torch.float32 (n,), vectorized.

    Q8_0: blocks of 32 weights = fp16 scale d, 32 int8 q; w = d * q.
    Q4_1: blocks of 32 weights = fp16 scale d, fp16 minimum m, 16 bytes of 4-bit q (weight j in the low
          nibble of byte j, weight j + 16 in its high nibble); w = d * q + m."""
    if type_name == "F32":
        w = np.frombuffer(data, dtype="<f4", count=n, offset=start).astype(np.float32)
    elif type_name == "F16":
        w = np.frombuffer(data, dtype="<f2", count=n, offset=start).astype(np.float32)
    elif type_name == "BF16":                 # bfloat16 is the top half of a float32's bits
        w = (np.frombuffer(data, dtype="<u2", count=n, offset=start).astype(np.uint32) << 16).view(np.float32)
    elif type_name == "Q8_0":
        b = np.frombuffer(data, dtype=np.dtype([("d", "<f2"), ("q", "i1", (32,))]), count=n // 32, offset=start)
        w = b["d"].astype(np.float32)[:, None] * b["q"].astype(np.float32)               # (blocks, 32)
    elif type_name == "Q4_1":
        b = np.frombuffer(data, dtype=np.dtype([("d", "<f2"), ("m", "<f2"), ("q", "u1", (16,))]),
                          count=n // 32, offset=start)
        q = np.concatenate([b["q"] & 0x0F, b["q"] >> 4], axis=1).astype(np.float32)      # (blocks, 32)
        w = b["d"].astype(np.float32)[:, None] * q + b["m"].astype(np.float32)[:, None]
    else:
        raise ValueError(f"no dequantization for ggml type {type_name}")
    return torch.from_numpy(np.ascontiguousarray(w).reshape(-1))


# -----------------------------------------------------------------------------------------------
# Llama-family checkpoints: a GGUF file (llama.cpp) or a Hugging Face directory

# GGUF tensor names -> Hugging Face's (blk.N. -> model.layers.N.)
GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
GGUF_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj"}


def unpermute_rotary_rows(w, n_head):
    """Undo llama.cpp's converter, which reorders the rows of the q and k projections (out, in) for its
    rotary convention: within each head it interleaves the two halves (row j of the first half becomes
    row 2j, row j of the second half row 2j + 1), since llama.cpp rotates adjacent pairs where Hugging
    Face rotates (i, i + hs/2). Here: back to the half-split order, so rotation pairs match apply_rotary."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _gguf_key(metadata, key, path, want, default=None):
    if key not in metadata:
        if default is None:
            raise ValueError(f"{path}: GGUF metadata has no {key!r}, which the model's shape needs")
        return default
    value = metadata[key]
    if not is_config_type(value, want) or (want is int and value < 1):
        raise ValueError(f"{path}: GGUF metadata {key!r} = {value!r} is not a valid {want.__name__}")
    return value


def check_llama_shapes(source, fields_, tensors, keys, shown=None):
    """Every shape the configuration `fields_` (LlamaConfig fields) implies, checked against `tensors`
    (Hugging Face names) before any tensor is reshaped, so that metadata contradicting the weights is a
    ValueError naming the key (keys: field -> the file's key, e.g. "llama.attention.head_count"), its value,
    the tensor (shown: Hugging Face name -> the file's name) and the file, never a reshape error."""
    shown = shown or {}

    def key(field):
        return f"{keys[field]} = {fields_[field]}"

    def fail(what, name=None):
        where = f" tensor {shown.get(name, name)!r}" if name else ""
        raise ValueError(f"{source}:{where} {what}: the metadata contradicts the tensors (a wrong or hand-edited "
                         "key, or a model this loader does not know); fix the key or use the original file")

    n_embd, n_head, n_kv = fields_["n_embd"], fields_["n_head"], fields_["n_kv_head"]
    for field in ("n_embd", "n_head", "n_kv_head", "intermediate_size", "n_layer", "vocab_size"):
        v = fields_[field]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            fail(f"{key(field)} is not a positive integer")
    if n_embd % n_head or (n_embd // n_head) % 2:
        fail(f"{key('n_head')} does not divide {key('n_embd')} into heads of an even size (rotary pairs)")
    if n_head % n_kv:
        fail(f"{key('n_kv_head')} does not divide {key('n_head')} (grouped-query attention)")
    hd = n_embd // n_head
    emb = tensors["model.embed_tokens.weight"]
    if emb.dim() != 2 or emb.shape[1] != n_embd:
        fail(f"has shape {tuple(emb.shape)}, but {key('n_embd')} makes it ({fields_['vocab_size']}, {n_embd})",
             "model.embed_tokens.weight")
    if emb.shape[0] != fields_["vocab_size"]:
        fail(f"has {emb.shape[0]} rows, but {key('vocab_size')} tokens", "model.embed_tokens.weight")
    blocks = sorted({int(m[1]) for k in tensors if (m := re.match(r"model\.layers\.(\d+)\.", k))})
    if blocks != list(range(fields_["n_layer"])):
        shown_blocks = blocks if len(blocks) <= 8 else blocks[:4] + ["..."] + blocks[-2:]
        fail(f"{key('n_layer')}, but the file holds the tensors of blocks {shown_blocks} ({len(blocks)} blocks)")
    ffn, attn, ff = fields_["intermediate_size"], f"{key('n_head')}, {key('n_embd')}", key("intermediate_size")
    kv = f"{key('n_kv_head')} (heads of {hd} = {keys['n_embd']} / {keys['n_head']})"
    want = {"self_attn.q_proj.weight": ((n_embd, n_embd), attn), "self_attn.k_proj.weight": ((n_kv * hd, n_embd), kv),
            "self_attn.v_proj.weight": ((n_kv * hd, n_embd), kv), "self_attn.o_proj.weight": ((n_embd, n_embd), attn),
            "mlp.gate_proj.weight": ((ffn, n_embd), ff), "mlp.up_proj.weight": ((ffn, n_embd), ff),
            "mlp.down_proj.weight": ((n_embd, ffn), ff), "input_layernorm.weight": ((n_embd,), key("n_embd")),
            "post_attention_layernorm.weight": ((n_embd,), key("n_embd"))}
    for i in blocks:
        for suffix, (shape, why) in want.items():
            name = f"model.layers.{i}.{suffix}"
            if name in tensors and tuple(tensors[name].shape) != shape:
                fail(f"has shape {tuple(tensors[name].shape)}, but {why} make it {shape}", name)
    for name in ("model.norm.weight", "lm_head.weight"):
        shape = (n_embd,) if name == "model.norm.weight" else (fields_["vocab_size"], n_embd)
        if name in tensors and tuple(tensors[name].shape) != shape:
            fail(f"has shape {tuple(tensors[name].shape)}, but {key('n_embd')} and {key('vocab_size')} make it "
                 f"{shape}", name)


GGUF_LLAMA_KEYS = {"n_embd": "llama.embedding_length", "n_head": "llama.attention.head_count",
                   "n_kv_head": "llama.attention.head_count_kv", "intermediate_size": "llama.feed_forward_length",
                   "n_layer": "llama.block_count", "vocab_size": "the length of tokenizer.ggml.tokens"}


def llama_from_gguf(path, contents=None):
    """Build a Llama from a GGUF file (general.architecture "llama"): its shape from the {arch}.* keys,
    the vocabulary size from tokenizer.ggml.tokens, the weights dequantized to float32. Returns the model.
    contents: read_gguf(path)'s (metadata, tensors) when the file was read already."""
    metadata, tensors = read_gguf(path) if contents is None else contents
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; this loader builds 'llama' models")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensors:
        raise ValueError(f"{path}: rotary scaling ({scaling!r} / rope_freqs.weight) is not supported here")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: no token_embd.weight tensor: not a llama.cpp language model")
    n_head = _gguf_key(metadata, f"{arch}.attention.head_count", path, int)
    config = LlamaConfig(
        block_size=_gguf_key(metadata, f"{arch}.context_length", path, int),
        vocab_size=len(metadata.get("tokenizer.ggml.tokens") or ()) or tensors["token_embd.weight"].shape[0],
        n_layer=_gguf_key(metadata, f"{arch}.block_count", path, int),
        n_head=n_head,
        n_kv_head=_gguf_key(metadata, f"{arch}.attention.head_count_kv", path, int, default=n_head),
        n_embd=_gguf_key(metadata, f"{arch}.embedding_length", path, int),
        intermediate_size=_gguf_key(metadata, f"{arch}.feed_forward_length", path, int),
        rope_theta=float(_gguf_key(metadata, f"{arch}.rope.freq_base", path, float, default=10000.0)),
        norm_eps=float(_gguf_key(metadata, f"{arch}.attention.layer_norm_rms_epsilon", path, float)),
        tie_embeddings=True)
    keys = GGUF_LLAMA_KEYS if metadata.get("tokenizer.ggml.tokens") else dict(
        GGUF_LLAMA_KEYS, vocab_size="the rows of token_embd.weight")
    if f"{arch}.vocab_size" in metadata and metadata[f"{arch}.vocab_size"] != config.vocab_size:
        raise ValueError(f"{path}: {arch}.vocab_size = {metadata[f'{arch}.vocab_size']!r}, but tokenizer.ggml.tokens "
                         f"holds {config.vocab_size} tokens: the metadata contradicts itself (a corrupt or hand-edited file)")
    ours, shown = {}, {}
    for name, t in tensors.items():          # Hugging Face's names first, to check every shape before a reshape
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        key = f"model.layers.{m[1]}.{GGUF_BLOCK_NAMES.get(m[2], m[2])}.weight" if m else GGUF_NAMES.get(name, name)
        ours[key], shown[key] = t, name
    check_llama_shapes(path, vars(config), ours, keys, shown)
    head_dim = config.n_embd // config.n_head
    if metadata.get(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path}: rotary dimension {metadata[f'{arch}.rope.dimension_count']} != head size "
                         f"{head_dim} (partial rotary is not supported)")
    for key, name in shown.items():
        if name.endswith(".attn_q.weight"):
            ours[key] = unpermute_rotary_rows(ours[key], config.n_head)
        elif name.endswith(".attn_k.weight"):
            ours[key] = unpermute_rotary_rows(ours[key], config.n_kv_head)
    if "model.embed_tokens.weight" in ours:
        config.tie_embeddings = not untied_head(ours, "model.embed_tokens.weight")
    return load_state(empty_model(lambda: Llama(config)), ours, path)


# ==== 4. Hugging Face directories ================================================================

def read_json(path):
    """The JSON object in `path` (config.json, an index, tokenizer.json), or a ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(obj).__name__}")
    return obj


# config.json keys of Hugging Face's LlamaConfig -> LlamaConfig fields
HF_LLAMA_KEYS = {"max_position_embeddings": "block_size", "vocab_size": "vocab_size",
                 "num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "hidden_size": "n_embd",
                 "intermediate_size": "intermediate_size", "rms_norm_eps": "norm_eps"}


def load_safetensors_dir(directory):
    """{name: tensor} of a Hugging Face directory: model.safetensors, or the shards that
    model.safetensors.index.json's weight_map names (each file read once, each name from its own file)."""
    single, index = os.path.join(directory, "model.safetensors"), os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_safetensors(single)
    if not os.path.exists(index):
        raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: weight_map must map tensor names to shard file names")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard or not shard.endswith(".safetensors"):
            raise ValueError(f"{index}: shard {shard!r} must be a .safetensors file name in {directory}")
        part = load_safetensors(os.path.join(directory, shard))
        stray = sorted(k for k in part if weight_map.get(k) != shard)
        wanted = [k for k, f in weight_map.items() if f == shard and k not in part]
        if stray or wanted:
            raise ValueError(f"{index} and {shard} disagree: in the shard but not indexed there: {stray[:5]}; "
                             f"indexed there but absent: {wanted[:5]}")
        tensors.update(part)
    return tensors


def check_promised_head(cfg, path, tensors, directory):
    """config.json's "tie_word_embeddings": false promises an output head of its own: refuse files without
    one (lm_head.weight), which would otherwise load silently tied to the embedding."""
    if cfg.get("tie_word_embeddings") is False and "lm_head.weight" not in tensors:
        raise ValueError(f"{path} says tie_word_embeddings: false (the model has its own output head), but the "
                         f"safetensors files in {directory} hold no lm_head.weight: the head is missing (an "
                         "incomplete download or a lost shard?); fetch the checkpoint again, or set "
                         "tie_word_embeddings to true if the head really is the embedding")


def llama_from_hf(directory):
    """Build a Llama from a Hugging Face directory (config.json with model_type "llama", and
    model.safetensors or an index of shards). Returns the model."""
    path = os.path.join(directory, "config.json")
    cfg = read_json(path)
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{path}: model_type is {cfg.get('model_type')!r}; this loader builds 'llama' models")
    # rotary settings: top-level rope_theta / rope_scaling, or (transformers >= 5) one rope_parameters dict
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
        raise ValueError(f"{path}: rope_parameters={rope!r}: only plain rotary embeddings (rope_type 'default') "
                         "are supported by model.py's Llama")
    for key, plain in (("rope_scaling", None), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, plain) != plain:   # e.g. Llama 3's "llama3" rotary scaling: not implemented here
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported by model.py's Llama")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {cfg['hidden_act']!r}; the Llama MLP here is SwiGLU (silu)")
    missing = [k for k in HF_LLAMA_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{path} lacks {missing}, which the model's shape needs")
    fields_ = {ours: cfg[hf] for hf, ours in HF_LLAMA_KEYS.items()}
    fields_.update(n_kv_head=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                   rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))  # from_config checks types
    if "head_dim" in cfg and cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise ValueError(f"{path}: head_dim {cfg['head_dim']} x {cfg['num_attention_heads']} heads is not "
                         f"hidden_size {cfg['hidden_size']}: not supported by model.py's Llama")
    tensors = load_safetensors_dir(directory)
    if "model.embed_tokens.weight" not in tensors:
        raise ValueError(f"{directory}: no model.embed_tokens.weight: not a Llama checkpoint in Hugging Face's names")
    hf_keys = {ours: hf for hf, ours in HF_LLAMA_KEYS.items()}
    hf_keys["n_kv_head"] = "num_key_value_heads" if "num_key_value_heads" in cfg else "num_attention_heads"
    check_llama_shapes(path, fields_, tensors, hf_keys)
    # the stored head decides: tie_word_embeddings=True with its own head would otherwise drop a tensor
    fields_["tie_embeddings"] = not untied_head(tensors, "model.embed_tokens.weight")
    check_promised_head(cfg, path, tensors, directory)
    model = empty_model(lambda: from_config(dict(architecture="llama", **fields_)))
    # rotary_emb.inv_freq: a buffer older transformers versions saved; apply_rotary computes its own
    return load_state(model, tensors, directory, ignore=("rotary_emb.inv_freq",))


# ==== 5. the tokenizer ===========================================================================
# Built from the checkpoint: byte-level BPE as a tiktoken.Encoding

# GPT-2's pre-tokenizer regex: contractions, letters, numbers, other symbols, whitespace
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 ("smollm"): digits split off one at a time first, then GPT-2's regex on the pieces. As one regex:
# a digit is its own token, and a whitespace run before a digit ends there (the piece ended), so the
# look-ahead of \s+(?!\S) treats a digit like the end of the text.
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
PRE_TOKENIZERS = {"gpt2": GPT2_PATTERN, "gpt-2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN}  # "gpt-2": llama.cpp's
# tokenizer.ggml.token_type values (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
GGUF_SPECIAL_TYPES = (3, 4)


def gpt2_byte_alphabet():
    """{character: byte}: GPT-2's bytes_to_unicode, which writes each of the 256 bytes as a printable
    character (the printable Latin-1 ones as themselves, the rest from U+0100 on) so that byte-level
    BPE tokens are strings. Tokens in GGUF and tokenizer.json files are written in it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + sum(1 for c in range(b) if c not in printable))
    return {c: b for b, c in chars.items()}


def bpe_tokenizer(name, tokens, merges, special, pre):
    """tiktoken.Encoding whose token ids are the model's.

    tokens: the vocabulary (id -> token in GPT-2's byte alphabet); merges: ["a b", ...] in merge order;
    special: {id} of the control tokens (matched literally, never merged); pre: a PRE_TOKENIZERS name.
    tiktoken merges the adjacent pair whose merged token has the lowest rank, BPE the pair that comes first
    in the merge list: the same when the ids of merged tokens follow the merge order, which is checked."""
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"tokenizer pre-tokenizer {pre!r} is not supported; known: {sorted(PRE_TOKENIZERS)}")
    alphabet, ids = gpt2_byte_alphabet(), {t: i for i, t in enumerate(tokens)}
    ranks, specials = {}, {}
    for i, tok in enumerate(tokens):
        if i in special:
            specials[tok] = i
            continue
        try:
            ranks[bytes(alphabet[c] for c in tok)] = i
        except KeyError:
            raise ValueError(f"{name}: token {i} {tok!r} is not in GPT-2's byte alphabet: not a byte-level "
                             "BPE vocabulary") from None
    last = -1
    for n, merge in enumerate(merges):
        a, sep, b = merge.partition(" ")
        merged = ids.get(a + b)
        if not sep or merged is None or a not in ids or b not in ids:
            raise ValueError(f"{name}: merge #{n} {merge!r} does not join two tokens of the vocabulary")
        if merged <= last:
            raise ValueError(f"{name}: merge #{n} {merge!r} makes token {merged}, before the previous merge's "
                             f"{last}: the ids do not follow the merge order, which tiktoken needs")
        last = merged
    return BPETokenizer(name=name, pat_str=PRE_TOKENIZERS[pre], mergeable_ranks=ranks, special_tokens=specials)


class BPETokenizer(tiktoken.Encoding):
    """A tiktoken.Encoding that says which character its vocabulary cannot spell. A byte-level vocabulary
    may lack a few bytes (SmolLM2's: some control characters, bytes UTF-8 never uses), and tiktoken would
    panic on them (pyo3's PanicException, which is not an Exception); here every public encode path of
    tiktoken.Encoding (encode, encode_ordinary, their _batch forms, encode_to_numpy, encode_with_unstable,
    encode_single_token, and the private single-piece / bytes ones) is a ValueError naming the character."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._spelled = bytes(sorted(t[0] for t in kw["mergeable_ranks"] if len(t) == 1))  # the single bytes

    def _check(self, text):
        if isinstance(text, (bytes, bytearray)):
            return self._check_bytes(bytes(text))
        unknown = text.encode("utf-8", errors="surrogatepass").translate(None, self._spelled)
        if unknown:
            bad = next(c for c in text if c.encode("utf-8", errors="surrogatepass").translate(None, self._spelled))
            raise ValueError(f"tokenizer {self.name}: the vocabulary has no token for the byte(s) of {bad!r} "
                             f"(U+{ord(bad):04X}) at offset {text.index(bad)}: remove or replace it")

    def _check_bytes(self, raw):
        unknown = raw.translate(None, self._spelled)
        if unknown:
            at = next(i for i, b in enumerate(raw) if b in unknown)
            raise ValueError(f"tokenizer {self.name}: the vocabulary has no token for the byte {raw[at]:#04x} at "
                             f"offset {at}: remove or replace it")

    def encode_ordinary(self, text):
        self._check(text)
        return super().encode_ordinary(text)

    def encode(self, text, **kw):
        self._check(text)
        return super().encode(text, **kw)

    def encode_to_numpy(self, text, **kw):
        self._check(text)
        return super().encode_to_numpy(text, **kw)

    def encode_with_unstable(self, text, **kw):
        self._check(text)
        return super().encode_with_unstable(text, **kw)

    def encode_single_token(self, text_or_bytes):
        if text_or_bytes not in self._special_tokens:     # a special token is spelled by its own id
            self._check(text_or_bytes)
        return super().encode_single_token(text_or_bytes)

    def _encode_single_piece(self, text_or_bytes):
        self._check(text_or_bytes)
        return super()._encode_single_piece(text_or_bytes)

    def _encode_only_native_bpe(self, text):
        self._check(text)
        return super()._encode_only_native_bpe(text)

    def _encode_bytes(self, text):
        self._check(text)
        return super()._encode_bytes(text)

    # encode_batch / encode_ordinary_batch call encode / encode_ordinary above, one text at a time


def gguf_tokenizer(path, metadata=None):
    """The tiktoken.Encoding of a GGUF file's tokenizer.ggml.* keys (model "gpt2": byte-level BPE)."""
    metadata = read_gguf(path, dequantize=False)[0] if metadata is None else metadata
    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {metadata.get('tokenizer.ggml.model')!r}; only "
                         "byte-level BPE ('gpt2') is supported")
    tokens, merges = metadata.get("tokenizer.ggml.tokens"), metadata.get("tokenizer.ggml.merges")
    types = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens or []))
    if not isinstance(tokens, list) or not isinstance(merges, list) or len(types) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens / merges / token_type are missing or of unequal length")
    special = {i for i, t in enumerate(types) if t in GGUF_SPECIAL_TYPES}
    enc = bpe_tokenizer(os.path.basename(path), tokens, merges, special, gguf_pre_tokenizer(path, metadata))
    enc.chat, enc.chat_refusal = None, None
    if "tokenizer.chat_template" in metadata:
        try:
            enc.chat = chat_template(metadata["tokenizer.chat_template"], path)
        except ValueError as e:     # chat alone is refused (chat_of says why); the model and its text are fine
            enc.chat_refusal = f"{e} (only chat is refused: the model itself loads)"
    return enc


def gguf_pre_tokenizer(path, metadata):
    """The PRE_TOKENIZERS name of a GGUF's tokenizer.ggml.pre. A file without the key (written by a
    converter older than llama.cpp's May 2024 one) is read with GPT-2's pre-tokenizer, with a loud warning
    naming that assumption (a model trained with another splits text differently, so its ids would differ
    silently); an unknown value is a ValueError naming it and the known ones (never a silent fallback)."""
    pre = metadata.get("tokenizer.ggml.pre")
    if pre is None:
        warnings.warn(f"{path} has no tokenizer.ggml.pre (an old GGUF converter): ASSUMING GPT-2's pre-tokenizer "
                      "('gpt2'). If the model was trained with another (SmolLM2's 'smollm' splits digits one at a "
                      "time, Llama 3's 'llama-bpe' ...), its token ids differ from these: convert the model again "
                      "with a current llama.cpp, or use its Hugging Face directory (tokenizer.json)",
                      UserWarning, stacklevel=3)
        return "gpt2"
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{path}: tokenizer.ggml.pre = {pre!r} is a pre-tokenizer this reader does not know "
                         f"(it knows {', '.join(sorted(PRE_TOKENIZERS))}); reading the text with another would give "
                         "other token ids than the model was trained with: use its Hugging Face directory instead")
    return pre


# A chat model reads its conversation in one template, stored with the tokenizer (tokenizer.chat_template:
# a Jinja program that the format's readers evaluate). This project reads one form of it, ChatML (SmolLM2,
# Qwen): every message is <|im_start|>{role}\n{content}<|im_end|>\n, and the answer starts after
# <|im_start|>assistant\n. Its program is recognised by that line (message['role'], message["role"] or
# Qwen2.5's message.role), and its default system message (the one it puts first when the conversation has
# none) is read from it; any other template is refused by name, never run: the file's text is data, not code.
# The template concerns chat only: a tokenizer whose template is refused still encodes and decodes text
# (its model loads and writes), and keeps the reason in enc.chat_refusal for chat to say (chat_of).
NEWLINE = r"(?:\n|\\n)"      # in the template's string literals: a newline, or its escape


def _field(name):
    """A Jinja reference to message[name]: message['role'], message["role"] or message.role."""
    return rf"""message(?:\['{name}'\]|\["{name}"\]|\.{name}\b)"""


CHATML_MESSAGE = re.compile(r"'<\|im_start\|>'\s*\+\s*" + _field("role") + r"\s*\+\s*'" + NEWLINE + r"'\s*\+\s*"
                            + _field("content") + r"\s*\+\s*'<\|im_end\|>'\s*\+\s*'" + NEWLINE + "'")
CHATML_SYSTEM = re.compile(r"'<\|im_start\|>system" + NEWLINE + r"((?:[^'\\]|\\.)*?)<\|im_end\|>" + NEWLINE + "'",
                           re.S)             # within one string literal: Qwen2.5's also writes messages[0]'s there
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")   # the template's own control tokens: the only special ids of a prompt


def chat_template(template, source):
    """{"form": "chatml", "system": default system message or None, "end": "<|im_end|>"} of a chat
    template (tokenizer.chat_template) of the ChatML form; ValueError naming `source` for any other form."""
    if not isinstance(template, str) or not CHATML_MESSAGE.search(template):
        shown = repr(template[:60]) + ("..." if len(template) > 60 else "") if isinstance(template, str) else \
            type(template).__name__
        raise ValueError(f"{source}: its tokenizer.chat_template is not ChatML (<|im_start|>role ... <|im_end|>), "
                         f"the one chat form this reader supports (it begins {shown}); prompt the model with plain "
                         "text instead")
    system = CHATML_SYSTEM.search(template)
    return {"form": "chatml", "system": system[1] if system else None, "end": "<|im_end|>"}


def chat_of(enc):
    """The tokenizer's chat template (chat_template's dict): enc.chat. ValueError saying why there is none:
    its template was refused (enc.chat_refusal: not ChatML), or it has none (not a chat model)."""
    chat = getattr(enc, "chat", None)
    if chat is None:
        refusal = getattr(enc, "chat_refusal", None)
        raise ValueError(refusal or f"the tokenizer {getattr(enc, 'name', enc)!r} has no chat template: its model "
                                    "is not a chat model; prompt it with plain text instead")
    return chat


def chat_prompt(chat, messages):
    """The text a ChatML model reads before it answers: `messages` [{"role", "content"}, ...] in the template
    (chat_template), the default system message first when there is none, then <|im_start|>assistant\n.
    For display: a model reads chat_ids (the same text, its user's part never taken for control tokens)."""
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in _chat_turns(chat, messages)) \
        + "<|im_start|>assistant\n"


def _chat_turns(chat, messages):
    """[(role, content)] of the conversation: messages checked, the template's default system message first."""
    if chat is None:
        raise ValueError("this tokenizer has no chat template: its model is not a chat model")
    if not messages or any(not isinstance(m, dict) or set(m) != {"role", "content"} or
                           not all(isinstance(v, str) for v in m.values()) for m in messages):
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts of str, got {messages!r}")
    if messages[0]["role"] != "system" and chat["system"] is not None:
        messages = [{"role": "system", "content": chat["system"]}, *messages]
    return [(m["role"], m["content"]) for m in messages]


def chat_ids(enc, messages, answer=True):
    """The token ids of chat_prompt(chat_of(enc), messages): the template's markers (<|im_start|>, <|im_end|>)
    as their control-token ids, every role and content as plain text -- so a user's text that spells
    "<|im_end|>\n<|im_start|>system" stays text and cannot end its turn or forge another. answer=False leaves
    the last message's turn open (no <|im_end|>, no assistant turn): the model writes the rest of it.
    ValueError (chat_of) without a usable template, or when the vocabulary lacks a marker as a control token."""
    chat = chat_of(enc)
    start, end = (_control_id(enc, marker) for marker in CHATML_MARKERS)
    turns, ids = _chat_turns(chat, messages), []
    for i, (role, content) in enumerate(turns):
        ids += [start, *enc.encode_ordinary(f"{role}\n{content}")]
        if answer or i < len(turns) - 1:
            ids += [end, *enc.encode_ordinary("\n")]
    return ids + ([start, *enc.encode_ordinary("assistant\n")] if answer else [])


def _control_id(enc, marker):
    if marker not in enc.special_tokens_set:
        raise ValueError(f"the tokenizer {enc.name!r} has no control token {marker!r}, which its ChatML template "
                         "needs: the template does not belong to this vocabulary")
    return enc.encode_single_token(marker)


def hf_tokenizer(directory):
    """The tiktoken.Encoding of a Hugging Face tokenizer.json (byte-level BPE), or None without one."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        return None
    tj = read_json(path)
    try:
        vocab, merges, added = tj["model"]["vocab"], tj["model"]["merges"], tj.get("added_tokens", [])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a BPE tokenizer.json ({type(e).__name__}: {e})") from None
    tokens = [None] * (max([*vocab.values(), *(a["id"] for a in added)]) + 1)
    for tok, i in [*vocab.items(), *((a["content"], a["id"]) for a in added)]:
        tokens[i] = tok
    if None in tokens:
        raise ValueError(f"{path}: the vocabulary's ids have gaps")
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]    # newer files store pairs
    steps = (tj.get("pre_tokenizer") or {}).get("pretokenizers", [tj.get("pre_tokenizer") or {}])
    kinds = [s.get("type") for s in steps]
    digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
    if kinds not in (["ByteLevel"], ["Digits", "ByteLevel"]):
        raise ValueError(f"{path}: pre-tokenizer {kinds} is not supported (GPT-2's ByteLevel, optionally "
                         "after single Digits)")
    odd = [s for s in steps if (s["type"] == "Digits" and not s.get("individual_digits")) or
           (s["type"] == "ByteLevel" and (s.get("add_prefix_space") or s.get("use_regex", True) is False))]
    if odd:   # any of these splits text otherwise than the patterns here: other ids, silently
        raise ValueError(f"{path}: pre-tokenizer step {odd[0]} is not supported (Digits needs "
                         "individual_digits true; ByteLevel add_prefix_space false and use_regex true)")
    return bpe_tokenizer(os.path.basename(directory), tokens, merges, {a["id"] for a in added if a.get("special")},
                         "smollm" if digits else "gpt2")


# ==== 6. load_pretrained ========================================================================

def load_pretrained(path):
    """(model, tokenizer) from a .gguf file (Llama family) or a Hugging Face directory (config.json with
    model_type "llama" or "gpt2"; tokenizer None without a tokenizer.json). Named checkpoints ("smollm2")
    are fetched by data/prepare.py's fetch_pretrained, which returns such a path."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        metadata, tensors = read_gguf(path)                   # read once for the model and the tokenizer
        return llama_from_gguf(path, (metadata, tensors)), gguf_tokenizer(path, metadata)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such .gguf file or Hugging Face model directory")
    cfg_path = os.path.join(path, "config.json")
    model_type = read_json(cfg_path).get("model_type") if os.path.exists(cfg_path) else "gpt2"
    model = gpt2_from_hf(path) if model_type == "gpt2" else llama_from_hf(path)
    return model, hf_tokenizer(path)

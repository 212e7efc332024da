"""
A GPT language model from scratch, in one file (after nanoGPT and minGPT).

Pre-norm transformer blocks: x + attn(ln(x)), then x + mlp(ln(x)); causal self-attention through
torch's scaled_dot_product_attention; a GELU MLP; learned position embeddings; the output head shares
its weight with the token embedding. Every projection is a plain nn.Linear, so that lcd.py can swap
each one for a codebook (LUT) layer without knowing anything else about this file.

    model = GPT(SIZES["baby"] | {"vocab_size": 256})
    logits, loss = model(idx, targets)          # idx, targets: (B, T) int64
    out = model.generate(idx, max_new_tokens=100)

GPT.from_pretrained(dir) loads Hugging Face GPT-2 weights from a local model.safetensors.
"""
import json
import math
import os
import re
import struct
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 256   # longest context the position table covers
    vocab_size: int = 256   # set from data/<name>/meta.json
    n_layer: int = 4        # transformer blocks
    n_head: int = 4         # attention heads; n_embd must be divisible by it
    n_embd: int = 128       # residual stream width
    dropout: float = 0.0    # dropout on attention, MLP output and embeddings
    bias: bool = True       # biases in linear layers and LayerNorms (GPT-2 has them)


# Named sizes. `tiny` is for tests, `baby` is the CPU default, `gpt2` is the 124M GPT-2 shape.
SIZES = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)                     # each (B, T, C)
        # (B, T, C) -> (B, nh, T, hs): heads become a batch dimension
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)              # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's GELU


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if isinstance(config, dict):
            config = GPTConfig(**config)
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying: one matrix, two uses
        self.apply(self._init_weights)
        # GPT-2's scaled init: residual projections shrink with depth so the stream's variance stays put
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """Parameters without the position table (GPT-2's convention); the tied head counts once."""
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)           # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))                       # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens tokens after idx (B, T); returns (B, T + max_new_tokens)."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]  # crop to the context the model knows
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / max(temperature, 1e-8)  # (B, vocab)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    # ---------------------------------------------------------------------------------------------
    # Loading real GPT-2 weights from a local directory (no hub, no extra dependency)

    @classmethod
    def from_pretrained(cls, directory, **overrides):
        """Build the gpt2-shaped model from `directory`/model.safetensors (Hugging Face key names)."""
        path = os.path.join(directory, "model.safetensors")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: put a GPT-2 model.safetensors in {directory}")
        tensors = load_safetensors(path)
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}  # both layouts occur
        blocks = [int(k.split(".")[1]) for k in tensors if re.match(r"h\.\d+\.", k)]
        if not blocks or "wte.weight" not in tensors or "wpe.weight" not in tensors:
            raise ValueError(f"{path} has no GPT-2 blocks (h.0...) or no wte/wpe embeddings: is it a GPT-2 "
                             "checkpoint in Hugging Face's key names?")
        n_layer, n_embd = 1 + max(blocks), tensors["wte.weight"].shape[1]
        config = dict(SIZES["gpt2"], n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 64,  # GPT-2: 64 a head
                      vocab_size=tensors["wte.weight"].shape[0], block_size=tensors["wpe.weight"].shape[0])
        config.update(overrides)
        model = cls(config)
        sd = model.state_dict()
        # HF's GPT-2 uses Conv1D modules whose weights are stored (in, out): transpose into nn.Linear
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        for key in sd:
            if key == "lm_head.weight" or key.endswith(".attn.bias") or key.endswith(".attn.masked_bias"):
                continue  # tied to wte / causal masks, not parameters here
            hf_key = key.removeprefix("transformer.")
            if hf_key not in tensors:
                raise KeyError(f"{path} has no tensor {hf_key!r}: is this a GPT-2 checkpoint?")
            t = tensors[hf_key]
            t = t.t() if key.endswith(transposed) else t
            if t.shape != sd[key].shape:
                raise ValueError(f"{hf_key}: shape {tuple(t.shape)} in the file, {tuple(sd[key].shape)} expected")
            sd[key].copy_(t)
        return model


# safetensors: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
# then the raw little-endian tensor bytes; offsets are relative to the end of the header.
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


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


def config_fields():
    """Names of the GPTConfig fields (for the command-line config in train_kd.py)."""
    return [f.name for f in fields(GPTConfig)]


def config_dict(model):
    """The plain dict that rebuilds `model`'s architecture: dict(architecture="gpt", **GPTConfig fields)."""
    return dict(architecture="gpt", **vars(model.config))


def from_config(cfg):
    """A fresh model from config_dict()'s dict (the "architecture" key picks the class; only "gpt" here)."""
    cfg = dict(cfg)
    architecture = cfg.pop("architecture", None)
    if architecture != "gpt":
        raise ValueError(f"unknown architecture {architecture!r}: this model.py builds 'gpt'")
    unknown = set(cfg) - set(config_fields())
    if unknown:
        raise ValueError(f"GPT has no config fields {sorted(unknown)}; its fields: {config_fields()}")
    return GPT(cfg)

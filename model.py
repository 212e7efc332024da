"""
Two decoder-only language models from scratch, in one file (after nanoGPT, minGPT and llama2.c): the GPT
this project trains itself, and the Llama family (SmolLM2, TinyLlama, Llama 3.2) for pretrained weights.

Pre-norm transformer blocks: x + attn(ln(x)), then x + mlp(ln(x)); causal self-attention through
torch's scaled_dot_product_attention; a GELU MLP; learned position embeddings; the output head shares
its weight with the token embedding (unless a checkpoint holds its own head). Every projection is a plain
nn.Linear, so that lcd.py can swap each one for a codebook (LUT) layer without knowing anything else about
this file.

    model = GPT(SIZES["baby"] | {"vocab_size": 256})
    logits, loss = model(idx, targets)          # idx, targets: (B, T) int64
    out = model.generate(idx, max_new_tokens=100)

The Llama block differs from the GPT's in four places: RMSNorm instead of LayerNorm, rotary position
embeddings instead of a learned position table, grouped-query attention (fewer key/value heads than query
heads) and a SwiGLU MLP; no biases. Its projections are nn.Linear named as in Hugging Face
(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), so lcd.py quantizes both models alike.

Both models share generate() (with a KV cache: one position a step), config_dict() and from_config().
Pretrained weights (GPT-2, SmolLM2, TinyLlama) and their tokenizers are read by checkpoints.py, which builds
these models from the world's files (safetensors, GGUF, Hugging Face directories).
"""
import math
import numbers
from dataclasses import asdict, dataclass, fields

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
    tie_embeddings: bool = True  # the output head shares the token embedding's weight (GPT-2 does)


# Named sizes. `tiny` is for tests, `baby` is the CPU default, `gpt2` is the 124M GPT-2 shape.
SIZES = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
}


# -----------------------------------------------------------------------------------------------
# What both models share: causal attention over a KV cache, and generation

class KVCache:
    """Keys and values of every attention layer for the positions seen so far, preallocated for max_len
    positions (gpt-fast style), so that generate() runs one new position per step instead of the whole
    context. pos: how many positions are stored; the model advances it after each forward."""

    def __init__(self, max_len):
        self.max_len, self.pos, self.kv = max_len, 0, {}

    def update(self, layer, k, v):
        """Store k, v (B, n_kv_head, T, hs) of `layer` (the attention module, as key) at positions
        pos..pos+T-1; return the keys and values of all positions so far, (B, n_kv_head, pos+T, hs) each."""
        B, H, T, hs = k.shape
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.pos} stored, {T} more do not fit")
        if layer not in self.kv:
            self.kv[layer] = (k.new_zeros(B, H, self.max_len, hs), v.new_zeros(B, H, self.max_len, hs))
        keys, values = self.kv[layer]
        keys[:, :, self.pos:self.pos + T] = k
        values[:, :, self.pos:self.pos + T] = v
        return keys[:, :, :self.pos + T], values[:, :, :self.pos + T]


def causal_attention(q, k, v, kv_cache=None, layer=None, dropout_p=0.0):
    """Causal scaled dot-product attention: q (B, nh, T, hs) over k, v (B, n_kv_head, T, hs) -> (B, nh, T, hs).

    With a kv_cache, k and v join those of the earlier positions first and the queries sit at positions
    pos..pos+T-1, each seeing every position up to its own. Grouped-query attention (Ainslie et al. 2023):
    each key/value head serves nh / n_kv_head consecutive query heads."""
    start = 0
    if kv_cache is not None:
        start = kv_cache.pos
        k, v = kv_cache.update(layer, k, v)                                   # (B, n_kv_head, start+T, hs)
    gqa = k.size(1) != q.size(1)              # SDPA repeats each KV head for its query heads itself
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    T, S = q.size(2), k.size(2)
    mask = None                               # one new query sees every stored position: nothing to mask
    if T > 1:
        mask = torch.arange(S, device=q.device) <= torch.arange(start, start + T, device=q.device)[:, None]  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


def check_sampling(idx, max_new_tokens, temperature, top_k):
    """generate()'s arguments checked before any work; returns top_k as an int, or None for "off" (0, None)."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype.is_floating_point or idx.is_complex():
        got = f"shape {tuple(idx.shape)}, dtype {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"generate: idx must be a (B, T) tensor of token ids (int64), got {got}")
    if idx.size(1) == 0:
        raise ValueError(f"generate: the prompt is empty (idx has shape {tuple(idx.shape)}): give at least one "
                         "token to continue, e.g. a start-of-text or newline token")
    if not (isinstance(max_new_tokens, numbers.Integral) and not isinstance(max_new_tokens, bool)
            and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is None or (isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool) and top_k == 0):
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 1 (the k most likely tokens), or 0 / None for the whole "
                         f"vocabulary, got {top_k!r}")
    return int(top_k)


class CausalLM(nn.Module):
    """The interface the GPT and the Llama share: forward(idx, targets=None, kv_cache=None) -> (logits, loss)
    is each model's own; generate() and config_dict() are written once, here."""
    architecture = None  # "gpt" or "llama": the key of ARCHITECTURES, stored by config_dict()

    def config_dict(self):
        """{"architecture": ..., **config fields}: everything from_config() needs to rebuild the model."""
        return dict(architecture=self.architecture, **asdict(self.config))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, seed=None,
                 use_cache=True, on_token=None):
        """Sample max_new_tokens tokens after idx (B, T) int64; returns (B, T + max_new_tokens).

        temperature: > 0 divides the logits before sampling; 0 is greedy (the most likely token, argmax, no
        sampling: top_k, generator and seed then change nothing); negative, NaN or inf is a ValueError.
        top_k: None or 0 samples from the whole vocabulary; k >= 1 keeps the k most likely tokens (a k larger
        than the vocabulary keeps all of them); a negative or non-integer k is a ValueError. generator (a
        torch.Generator) or seed makes sampling reproducible. The prompt must hold at least one token: an
        empty one (T = 0) is a ValueError ("the prompt is empty"). With use_cache, the prompt runs once and
        each new token costs one position's work (KVCache); a model with a `decode_step` attribute (a callable
        (new tokens (B, T), cache) -> logits (B, vocab) of the last one, or None to decline: lcd_kernels.py's C
        step) runs each cached step through it. on_token, if given, is called with each new token (B, 1) as
        soon as it is chosen (to stream it); a true return stops there (e.g. at the end of a chat turn), the
        result then ending with that token. The context is block_size tokens: once the
        sequence is longer, each step re-runs the last block_size tokens without a cache (the GPT's learned
        position table ends there), exactly as use_cache=False does, so both paths give the same tokens."""
        top_k = check_sampling(idx, max_new_tokens, temperature, top_k)
        if seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        block_size, cache = self.config.block_size, None
        step = getattr(self, "decode_step", None)    # a faster step, e.g. lcd_kernels.attach_decode_step's, or None
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= block_size:
                if cache is None:
                    cache = KVCache(min(block_size, idx.size(1) + max_new_tokens))
                new = idx[:, cache.pos:]                               # the prompt once, then the newest token
                logits = step(new, cache) if step is not None else None   # (B, vocab), or None: not served
                if logits is None:                                     # the Python forward, the reference
                    logits = self(new, kv_cache=cache)[0][:, -1, :]
            else:
                logits = self(idx[:, -block_size:])[0][:, -1, :]       # crop to the context the model knows
            logits = logits.float()                                    # (B, vocab)
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)         # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.size(-1):
                    v, _ = torch.topk(logits, top_k)
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
            if on_token is not None and on_token(idx_next):
                break
        return idx


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)                     # each (B, T, C)
        # (B, T, C) -> (B, nh, T, hs): heads become a batch dimension
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = causal_attention(q, k, v, kv_cache, self, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
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

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(CausalLM):
    architecture = "gpt"

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
        if config.tie_embeddings:
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

    def forward(self, idx, targets=None, kv_cache=None):
        """idx, targets: (B, T) int64 -> logits (B, T, vocab), mean cross-entropy (or None). With a kv_cache
        (generate() makes one), idx holds the positions after the kv_cache.pos cached ones."""
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}"
                             " (the learned position table): crop it to the last block_size tokens")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        logits = self.lm_head(self.transformer.ln_f(x))                       # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return logits, loss

# -----------------------------------------------------------------------------------------------
# The Llama family (Touvron et al. 2023; llama2.c): RMSNorm, rotary embeddings, grouped-query attention,
# SwiGLU. Module names follow Hugging Face's LlamaForCausalLM, so its state_dict keys load as they are.

@dataclass
class LlamaConfig:
    block_size: int = 256          # context length the model was trained for (no position table: rotary)
    vocab_size: int = 256          # rows of the token embedding
    n_layer: int = 2               # transformer blocks
    n_head: int = 4                # query heads; n_embd must be divisible by it
    n_kv_head: int = 2             # key/value heads (grouped-query attention); divides n_head
    n_embd: int = 64               # residual stream width
    intermediate_size: int = 128   # hidden width of the SwiGLU MLP
    rope_theta: float = 10000.0    # base of the rotary frequencies theta^(-2i/hs)
    norm_eps: float = 1e-5         # RMSNorm's epsilon
    tie_embeddings: bool = True    # the output head shares the token embedding's weight


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (Zhang & Sennrich 2019): LayerNorm
    without the mean and the bias. Computed in float32 whatever the input dtype, as Hugging Face does."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x) * self.weight   # one fused op


def rotary_cos_sin(pos, hs, theta):
    """Rotary position embedding (RoFormer, Su et al. 2021): the angles pos * theta^(-2i/hs) of positions
    pos (T,) for the hs/2 pairs of a head, as (cos, sin), each (T, hs/2). Llama.forward computes them once
    and every layer shares them (one table a token, not one a layer)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, hs, 2, device=pos.device).float() / hs))  # (hs/2,)
    angles = pos.float()[:, None] * inv_freq[None, :]                                   # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Turn the pair (x_i, x_{i+hs/2}) of x (B, nh, T, hs) by its angle (Hugging Face's half-split layout);
    cos, sin from rotary_cos_sin. A query at m and a key at n then score q.k through their angle difference
    only: relative position."""
    x1, x2 = x.float().chunk(2, dim=-1)                                                  # (B, nh, T, hs/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class LlamaAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.q_proj = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=False)

    def forward(self, x, rotary, kv_cache=None):
        """x (B, T, C), rotary: (cos, sin) of these T positions -> (B, T, C)."""
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = causal_attention(q, k, v, kv_cache, self)                                 # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, rotary, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rotary, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(CausalLM):
    architecture = "llama"

    def __init__(self, config):
        super().__init__()
        if isinstance(config, dict):
            config = LlamaConfig(**config)
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head or (config.n_embd // config.n_head) % 2:
            raise ValueError(f"Llama needs n_embd ({config.n_embd}) divisible by n_head ({config.n_head}), n_head "
                             f"by n_kv_head ({config.n_kv_head}), and an even head size (rotary pairs)")
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList([LlamaBlock(config) for _ in range(config.n_layer)]),
            norm=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        for m in self.modules():               # Hugging Face's initializer_range 0.02, for training from scratch
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self):
        """All parameters (no position table here); a tied head counts once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, kv_cache=None):
        """idx, targets: (B, T) int64 -> logits (B, T, vocab), mean cross-entropy (or None); kv_cache as GPT's."""
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}"
                             " (the context the model was trained for): crop it to the last block_size tokens")
        x = self.model.embed_tokens(idx)                                       # (B, T, C)
        rotary = rotary_cos_sin(torch.arange(start, start + T, device=idx.device),
                                self.config.n_embd // self.config.n_head, self.config.rope_theta)
        for block in self.model.layers:
            x = block(x, rotary, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        logits = self.lm_head(self.model.norm(x))                              # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss


# A saved file stores config_dict(model); from_config rebuilds the model from it alone.
ARCHITECTURES = {"gpt": (GPT, GPTConfig), "llama": (Llama, LlamaConfig)}


def config_dict(model):
    """{"architecture": "gpt"|"llama", **config fields} of a model of this file (see from_config)."""
    return model.config_dict()


def is_config_type(value, want):
    """isinstance for config fields: a bool is not an int, an int is a float."""
    if want is bool or isinstance(value, bool):
        return want is bool and isinstance(value, bool)
    return isinstance(value, (int, float)) if want is float else isinstance(value, want)


def from_config(cfg):
    """Build a fresh (untrained) model from config_dict()'s dict. A missing field takes its default; an
    unknown architecture, an unknown field or a value of the wrong type is a ValueError."""
    if not isinstance(cfg, dict) or cfg.get("architecture") not in ARCHITECTURES:
        got = cfg.get("architecture") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"model config must be a dict with architecture one of {sorted(ARCHITECTURES)}, got {got!r}")
    cls, config_cls = ARCHITECTURES[cfg["architecture"]]
    types = {f.name: f.type for f in fields(config_cls)}
    unknown = sorted(set(cfg) - set(types) - {"architecture"})
    if unknown:
        raise ValueError(f"{cfg['architecture']} config has unknown fields {unknown}; known: {sorted(types)}")
    for key, value in cfg.items():
        want = types.get(key)
        if want is not None and not is_config_type(value, want):
            raise ValueError(f"{cfg['architecture']} config field {key!r} must be a {want.__name__}, got {value!r}")
    return cls(config_cls(**{k: v for k, v in cfg.items() if k != "architecture"}))

"""
The whole LCD pipeline in one script, stage by stage:

  1. data     - data/prepare.py, if data/<dataset>/ is missing
  2. teacher  - train the full-precision GPT, if out/teacher.pt is missing (AdamW, warmup + cosine)
  3+.         - quantization and distillation stages (see below)

    python train_kd.py                                  # everything, CPU-sized defaults
    python train_kd.py --preset=tiny --max_iters=50     # any global below can be overridden
    torchrun --nproc_per_node=2 train_kd.py             # the same, data-parallel (DDP)

Every run is resumable: checkpoints are written atomically (temp file + rename) and a killed run picks up
from the last one. Config values are module-level globals (nanoGPT style); `--key=value` overrides them,
type-checked, unknown keys rejected.
"""
import ast
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, SIZES

# -----------------------------------------------------------------------------------------------
# Config: defaults as globals, one line each. `--key=value` overrides them.
# I/O
out_dir = "out"                # checkpoints, reports, figures
dataset = "shakespeare"        # data/<dataset>/{train,val}.bin (or an absolute directory); prepared on first use
tokenizer = "bytes"            # 'bytes' or 'gpt2' (used when the dataset must be prepared)
init_from = "scratch"          # 'scratch' trains a teacher; a directory with model.safetensors loads GPT-2
seed = 1337                    # everything random starts here
stop_after = ""                # '' runs every stage; 'teacher' stops once the teacher is ready
device = "cuda" if torch.cuda.is_available() else "cpu"  # where the tensors live
# model (the preset fills these; an explicit --n_layer=... wins)
preset = "baby"                # a size from model.SIZES: tiny, baby, small, gpt2
n_layer = None                 # transformer blocks (None: from the preset)
n_head = None                  # attention heads (None: from the preset)
n_embd = None                  # width (None: from the preset)
block_size = None              # context length (None: from the preset)
dropout = 0.0                  # dropout while training the teacher
# teacher training
max_iters = 1000               # optimizer steps
batch_size = 32                # sequences per step and process
learning_rate = 3e-3           # peak learning rate
min_lr = 3e-4                  # learning rate at the end of the cosine
warmup_iters = 100             # linear warm-up steps
weight_decay = 0.1             # AdamW decay on matrices (not on norms and biases)
grad_clip = 1.0                # clip the global gradient norm (0: off)
ckpt_interval = 250            # steps between resumable checkpoints
eval_batches = 20              # validation batches (fixed windows, so every evaluation is comparable)
log_interval = 10.0            # seconds between progress lines when the output is not a terminal

CONFIG_KEYS = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]


def parse_config(argv, defaults=None):
    """Defaults overridden by `--key=value` arguments; values are Python literals, checked by type."""
    config = dict(defaults or {k: globals()[k] for k in CONFIG_KEYS})
    for arg in argv:
        key, sep, raw = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep:
            raise ValueError(f"argument {arg!r} is not of the form --key=value")
        if key not in config:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(config))}")
        try:
            value = ast.literal_eval(raw)  # a literal, never code
        except (ValueError, SyntaxError):
            value = raw                    # a bare word is a string
        default = config[key]
        if default is not None and not isinstance(default, str):
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not type(default) and value is not None:
                raise ValueError(f"--{key} wants a {type(default).__name__} (default {default!r}), got {raw!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            value = raw
        elif default is None and not (value is None or type(value) is int):
            raise ValueError(f"--{key} wants an int or None, got {raw!r}")  # every None default is an int knob
        config[key] = value
    if config.get("preset") not in SIZES:
        raise ValueError(f"unknown preset {config.get('preset')!r}; choose one of {', '.join(SIZES)}")
    return config


def model_config(config, vocab_size):
    """GPTConfig fields: the preset, then explicit overrides."""
    mc = dict(SIZES[config["preset"]], vocab_size=vocab_size, dropout=config["dropout"])
    for key in ("n_layer", "n_head", "n_embd", "block_size"):
        if config[key] is not None:
            mc[key] = config[key]
    return mc


# -----------------------------------------------------------------------------------------------
# Data: uint16 token files written by data/prepare.py

DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def ensure_data(dataset, tokenizer="bytes"):
    """Return data/<dataset>/meta.json as a dict, preparing the dataset first if it is missing."""
    data_dir = dataset if os.path.isabs(dataset) else os.path.join(DATA_ROOT, dataset)
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        if dataset not in ("shakespeare", f"shakespeare_{tokenizer}"):
            raise FileNotFoundError(f"{data_dir}/meta.json not found: prepare it with "
                                    f"python data/prepare.py --input=FILE --name={dataset}")
        sys.path.insert(0, DATA_ROOT)
        import prepare  # data/prepare.py
        prepare.prepare(name=dataset, tokenizer=tokenizer)
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    meta["dir"] = data_dir
    return meta


def load_tokens(data_dir, split):
    """The token ids of one split as a read-only memory map (uint16)."""
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run python data/prepare.py")
    return np.memmap(path, dtype=np.uint16, mode="r")


def get_batch(tokens, batch_size, block_size, generator=None, device="cpu"):
    """Random windows: x (B, T) and the next tokens y (B, T)."""
    if len(tokens) <= block_size:
        raise ValueError(f"{len(tokens)} tokens are too few for windows of {block_size}")
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([tokens[i:i + block_size] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([tokens[i + 1:i + 1 + block_size] for i in starts]).astype(np.int64))
    return x.to(device), y.to(device)


def eval_windows(tokens, block_size, batch_size=32, max_batches=20):
    """Fixed, evenly spaced windows over a split: the same batches every time, for every model."""
    n = min(batch_size * max_batches, (len(tokens) - 1) // block_size)
    starts = np.linspace(0, len(tokens) - block_size - 1, n).astype(np.int64)
    for i in range(0, n, batch_size):
        s = starts[i:i + batch_size]
        x = np.stack([tokens[j:j + block_size] for j in s]).astype(np.int64)
        y = np.stack([tokens[j + 1:j + 1 + block_size] for j in s]).astype(np.int64)
        yield torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def evaluate(model, tokens, block_size, batch_size=32, max_batches=20):
    """Mean next-token cross-entropy (nats) over the fixed validation windows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for x, y in eval_windows(tokens, block_size, batch_size, max_batches):
        out = model(x.to(device))
        logits = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)  # (B, T, V)
        losses.append(torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), y.to(device).flatten()).item())
    model.train(was_training)
    return float(np.mean(losses))


# -----------------------------------------------------------------------------------------------
# Plumbing: progress lines, atomic checkpoints, distributed set-up

class Progress:
    """A live progress line: step, loss, tokens/s, elapsed, ETA. Redraws on a terminal, else logs."""

    def __init__(self, name, total, tokens_per_step, enabled=True, start=0):
        self.name, self.total, self.tokens_per_step, self.enabled = name, total, tokens_per_step, enabled
        self.t0, self.start, self.last_log = time.time(), start, 0.0
        self.tty = sys.stdout.isatty()

    def update(self, step, loss, extra=""):
        if not self.enabled:
            return
        now = time.time()
        elapsed = now - self.t0
        done = step + 1 - self.start
        rate = done * self.tokens_per_step / max(elapsed, 1e-9)
        eta = (self.total - step - 1) * elapsed / max(done, 1)
        line = (f"{self.name} {step + 1}/{self.total} | loss {loss:.4f} | {rate / 1e3:.1f}k tok/s | "
                f"{_clock(elapsed)} elapsed | ETA {_clock(eta)}{extra}")
        if self.tty:
            print("\r" + line, end="\n" if step + 1 == self.total else "", flush=True)
        elif now - self.last_log >= log_interval or step + 1 == self.total or done == 1:
            print(line, flush=True)
            self.last_log = now


def _clock(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def atomic_save(obj, path):
    """torch.save to a temp file, then rename: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """Load a checkpoint written by atomic_save (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"{path} is not a readable checkpoint ({e}); delete it to start over") from None


def setup_distributed(device):
    """(rank, world_size, device): torchrun sets RANK/WORLD_SIZE; gloo on CPU, nccl on CUDA."""
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return rank, world, device


# -----------------------------------------------------------------------------------------------
# Stage 2: the full-precision teacher

def lr_at(step, config):
    """Linear warm-up, then cosine decay from learning_rate to min_lr."""
    if step < config["warmup_iters"]:
        return config["learning_rate"] * (step + 1) / config["warmup_iters"]
    progress = (step - config["warmup_iters"]) / max(1, config["max_iters"] - config["warmup_iters"])
    return config["min_lr"] + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (
        config["learning_rate"] - config["min_lr"])


def make_optimizer(model, config):
    """AdamW; weight decay on matrices only (norms, biases and the position table stay undecayed)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "wpe" in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=config["learning_rate"], betas=(0.9, 0.95))


def train_teacher(config, meta, rank=0, world=1, device="cpu"):
    """Train the FP teacher, resuming from out_dir/teacher_ckpt.pt; returns the trained model."""
    mc = model_config(config, meta["vocab_size"])
    torch.manual_seed(config["seed"])
    model = GPT(mc).to(device)
    optimizer = make_optimizer(model, config)
    gen = torch.Generator().manual_seed(config["seed"] + rank)  # each process its own batches
    ckpt_path = os.path.join(config["out_dir"], "teacher_ckpt.pt")
    start = 0
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["model_config"] != mc:
            raise RuntimeError(f"{ckpt_path} was written for model {ckpt['model_config']}, not {mc}: "
                               "delete it or use another --out_dir")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        start = ckpt["step"]
        if rank == 0:
            print(f"resuming teacher training from {ckpt_path} at step {start}")
    ddp_model = DDP(model) if world > 1 else model
    train = load_tokens(meta["dir"], "train")
    T = mc["block_size"]
    progress = Progress("teacher", config["max_iters"], config["batch_size"] * T * world,
                        enabled=rank == 0, start=start)
    model.train()
    for step in range(start, config["max_iters"]):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        x, y = get_batch(train, config["batch_size"], T, gen, device)
        _, loss = ddp_model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        optimizer.step()
        progress.update(step, loss.item())
        if (step + 1) % config["ckpt_interval"] == 0 and step + 1 < config["max_iters"]:
            rng = [gen.get_state()]
            if world > 1:  # every process's sampler state, so a resumed run draws what it would have
                rng = [torch.empty_like(rng[0]) for _ in range(world)]
                dist.all_gather(rng, gen.get_state())
            if rank == 0:
                atomic_save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step + 1,
                                 rng=rng, model_config=mc), ckpt_path)
    return model


def ensure_teacher(**overrides):
    """(teacher, meta): load out_dir/teacher.pt, or prepare data and train it first. For scripts and tests."""
    config = dict({k: globals()[k] for k in CONFIG_KEYS}, **overrides)
    meta = ensure_data(config["dataset"], config["tokenizer"])
    path = os.path.join(config["out_dir"], "teacher.pt")
    if not os.path.exists(path):
        model = train_teacher(config, meta, device=config["device"])
        save_teacher(model, path)
    return load_teacher(path, config["device"]), meta


def save_teacher(model, path):
    atomic_save(dict(model=model.state_dict(), model_config=vars(model.config)), path)


def load_teacher(path, device="cpu"):
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise RuntimeError(f"{path} is not a teacher checkpoint (no 'model'/'model_config'): delete it")
    model = GPT(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


# -----------------------------------------------------------------------------------------------
# The pipeline

def main(argv):
    try:
        config = parse_config(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    rank, world, device = setup_distributed(config["device"])
    config["device"] = device
    torch.manual_seed(config["seed"])
    t_start = time.time()

    # stage 1: data (rank 0 prepares, the others wait for it)
    if rank == 0:
        meta = ensure_data(config["dataset"], config["tokenizer"])
    if world > 1:
        dist.barrier()
    meta = ensure_data(config["dataset"], config["tokenizer"])
    val = load_tokens(meta["dir"], "val")

    # stage 2: the full-precision teacher
    teacher_path = os.path.join(config["out_dir"], "teacher.pt")
    if config["init_from"] != "scratch":
        teacher = GPT.from_pretrained(config["init_from"]).to(device)
    elif os.path.exists(teacher_path):
        teacher = load_teacher(teacher_path, device)
        if rank == 0:
            print(f"teacher: loaded {teacher_path}")
    else:
        t0 = time.time()
        teacher = train_teacher(config, meta, rank, world, device)
        if rank == 0:
            save_teacher(teacher, teacher_path)
            print(f"teacher: trained in {time.time() - t0:.0f} s, saved {teacher_path}")
        if world > 1:
            dist.barrier()
    teacher.eval()
    T = teacher.config.block_size
    if rank == 0:
        teacher_loss = evaluate(teacher, val, T, config["batch_size"], config["eval_batches"])
        print(f"teacher: {teacher.num_params() / 1e6:.2f}M parameters, val loss {teacher_loss:.4f} "
              f"(ppl {math.exp(teacher_loss):.2f})")

    if config["stop_after"] != "teacher":
        pass  # the quantization and distillation stages follow here

    if rank == 0:
        print(f"done in {time.time() - t_start:.0f} s")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

"""
The whole LCD pipeline in one script, stage by stage:

  1. data     - data/prepare.py, if data/<dataset>/ is missing
  2. teacher  - train the full-precision GPT, if out/teacher.pt is missing (AdamW, warmup + cosine)
  3. calib    - calibration batches (input statistics) and a held-out batch (speculative steps)
  4. ptq      - post-training quantization, no training: RTN, k-means, LCD's density init (lcd.quantize)
  5. kd       - plain KD: k-means init at 2^b, distilled with the same steps and optimizer as LCD
  6. lcd      - LCD: density init, progressive merges, speculative steps (+ adaptive smoothing with a_bits);
                --ablate=1 repeats it with each piece switched off
  7. report   - freeze to LUTLinear, evaluate, save out/lcd_w<b>.pt, print the table, write out/results.json

    python train_kd.py                                  # everything, CPU-sized defaults
    python train_kd.py --preset=tiny --max_iters=50     # any global below can be overridden
    torchrun --nproc_per_node=2 train_kd.py             # the same, data-parallel (DDP)

Every run is resumable: checkpoints are written atomically (temp file + rename) and a killed run picks up
from the last one. Config values are module-level globals (nanoGPT style); `--key=value` overrides them,
type-checked, unknown keys rejected.
"""
import ast
import copy
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

import lcd
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
stop_after = ""                # '' runs every stage; or stop after 'teacher', 'baselines', 'kd' or 'lcd'
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
# quantization and distillation (stages 3-7; lcd.py section 7)
bits = 2                       # b: 2^b centroids per row (or group) in the quantized student
group_size = None              # inputs sharing one codebook (None: one codebook per row)
a_bits = None                  # activation bits: None (weight-only), 8 or 4 (per-token, symmetric)
calib_batches = 4              # calibration batches (batch_size sequences each) for the statistics
kd_steps = 1500                # distillation steps, the same for plain KD and LCD (about 4 min each on 2 cores)
kd_batch_size = 16             # sequences per distillation step and process
kd_lr = 1e-3                   # peak learning rate of the centroids
kd_latent_lr = 1e-3            # peak learning rate of the latent weights (they decide the assignments)
kd_other_lr = 1e-4             # peak learning rate of norms and biases (with kd_train_norms)
kd_tau = 1.0                   # distillation temperature
kd_ce = 0.0                    # weight of the cross-entropy on the next-token labels
kd_warmup = 20                 # warm-up steps (again after each progressive merge)
kd_train_norms = True          # train norms and biases along with the codebooks
kd_ckpt_interval = 100         # distillation steps between resumable checkpoints
lcd_init = "density"           # LCD's centroid initialization: density, kmeans++ or uniform
progressive_p = 0              # LCD starts at 2^(bits + p) centroids, halved down to 2^bits (0: off, as measured)
final_frac = 0.75              # share of the distillation steps for the last progressive stage
speculative_every = 25         # steps between LCD's speculative steps (0: off)
reassign_every = 1             # steps between re-assigning weights to the centroid nearest their latent
smoothing = False              # LCD's adaptive smoothing (only with a_bits; off: it did not help when measured)
ablate = 0                     # 1: also run LCD with each piece switched off in turn

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
    choices = (("bits", tuple(lcd.ENTRIES_PER_WORD)), ("a_bits", (None, 8, 4)),
               ("lcd_init", ("density", "kmeans++", "uniform")), ("tokenizer", ("bytes", "gpt2")))
    for key, allowed in choices:                      # found now, not after the teacher has trained
        if key in config and config[key] not in allowed:
            raise ValueError(f"--{key} must be one of {allowed}, got {config[key]!r}")
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
    if meta.get("tokenizer") != tokenizer:
        raise ValueError(f"{data_dir} holds {meta.get('tokenizer')!r} tokens, not {tokenizer!r}: use a dataset "
                         f"prepared with that tokenizer, e.g. --dataset=shakespeare_{tokenizer}")
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
    if n == 0:
        raise ValueError(f"the split holds {len(tokens)} tokens, fewer than one window of {block_size} + 1: "
                         "prepare more text, or use a smaller --block_size")
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
    for i, (x, y) in enumerate(eval_windows(tokens, block_size, batch_size, max_batches)):
        if i == 0:   # the split's largest id, once (a model of another tokenizer fails here, clearly)
            lcd.check_token_ids(model, torch.from_numpy(np.asarray([tokens.min(), tokens.max()], dtype=np.int64)),
                                "evaluate: the split")
        logits = lcd.model_logits(model(x.to(device)))                                # (B, T, V)
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
    """torch.save to a temp file, flushed to disk, then renamed (lcd.atomic_write): a crash or a full disk
    never leaves a half-written checkpoint, and the previous one stays as it was."""
    lcd.atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path, keys=(), remedy="delete it to restart that stage"):
    """Load a checkpoint written by atomic_save (tensors and plain containers only): a dict holding `keys`.
    An empty, truncated or corrupt file, or one without those keys, is a RuntimeError naming the file and
    saying what to do (`remedy`)."""
    try:
        ckpt = lcd.read_torch_file(path, remedy)
    except ValueError as e:
        raise RuntimeError(str(e)) from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise RuntimeError(f"{path} is not a checkpoint of this stage (it lacks {missing}): {remedy}")
    return ckpt


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


TEACHER_KEYS = ("dataset", "max_iters", "batch_size", "learning_rate", "min_lr", "warmup_iters", "weight_decay",
                "grad_clip", "dropout", "seed")  # a resumed teacher run must have been started with these


def sampler_states(gen, world):
    """Every process's batch-sampler state (rank order), so that a resumed run draws what it would have."""
    if world == 1:
        return [gen.get_state()]
    states = [None] * world
    dist.all_gather_object(states, gen.get_state())   # objects: fine on gloo and nccl (CPU tensors)
    return states


def train_teacher(config, meta, rank=0, world=1, device="cpu"):
    """Train the FP teacher, resuming from out_dir/teacher_ckpt.pt; returns the trained model."""
    mc = model_config(config, meta["vocab_size"])
    torch.manual_seed(config["seed"])
    model = GPT(mc).to(device)
    optimizer = make_optimizer(model, config)
    gen = torch.Generator().manual_seed(config["seed"] + rank)  # each process its own batches
    ckpt_path = os.path.join(config["out_dir"], "teacher_ckpt.pt")
    start = 0
    fingerprint = {k: config[k] for k in TEACHER_KEYS}
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, ("model", "optimizer", "step", "rng", "model_config"),
                               "delete it to restart the teacher's training")
        if ckpt["model_config"] != mc or ckpt.get("config") != fingerprint:
            raise RuntimeError(f"{ckpt_path} was written by a run with another model or training configuration "
                               f"({ckpt['model_config']}, {ckpt.get('config')}): delete it or use another --out_dir")
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
            rng = sampler_states(gen, world)
            if rank == 0:
                atomic_save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step + 1,
                                 rng=rng, model_config=mc, config=fingerprint), ckpt_path)
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
    """The trained teacher; its training run is complete, so the resume checkpoint beside it goes."""
    atomic_save(dict(model=model.state_dict(), model_config=vars(model.config)), path)
    resume = os.path.join(os.path.dirname(path), "teacher_ckpt.pt")
    if os.path.exists(resume):
        os.remove(resume)


def load_teacher(path, device="cpu"):
    """The teacher saved by save_teacher; RuntimeError for an incomplete, corrupt or foreign file."""
    ckpt = load_checkpoint(path, ("model", "model_config"), "delete it to train the teacher again")
    model = GPT(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


# -----------------------------------------------------------------------------------------------
# Stages 3-7: calibration -> PTQ baselines -> plain KD and LCD distillation -> freeze -> report

def fp_footprint(model):
    """Bytes and bits per weight of the layers lcd.py quantizes, as the FP model holds them (fp32)."""
    params = sum(m.weight.numel() for m in lcd.find_linears(model).values())
    bits_fp = torch.finfo(next(model.parameters()).dtype).bits
    return dict(bits_per_weight=float(bits_fp), bytes=params * bits_fp // 8)


def result_row(method, model, config, val, seconds):
    """One row of the report: validation loss, perplexity, effective bits per weight, bytes, seconds."""
    fp = lcd.footprint(model)
    loss = evaluate(model, val, model_block_size(model), config["batch_size"], config["eval_batches"])
    return dict(method=method, bits=config["bits"], val_loss=loss, ppl=math.exp(loss),
                bits_per_weight=fp["bits_per_weight"], bytes=fp["total_bytes"], seconds=seconds)


def model_block_size(model):
    return model.config.block_size


def batch_stream(tokens, batch_size, block_size, generator, device):
    """Endless random training windows (x, y); draws lazily, so a generator state pins the position."""
    while True:
        yield get_batch(tokens, batch_size, block_size, generator, device)


def calibration_data(train, config, block_size):
    """Stage 3: calibration batches for the statistics, and a held-out batch that scores speculative steps;
    drawn from the training split with their own seed, so they are the same on every process and run."""
    gen = torch.Generator().manual_seed(config["seed"] + 1000)
    calib = [get_batch(train, config["batch_size"], block_size, gen)[0] for _ in range(config["calib_batches"])]
    return calib, get_batch(train, config["kd_batch_size"], block_size, gen)[0]


def student_for(method, teacher, config, calib, log=None):
    """The trainable student of a distillation run. 'kd': plain KD, k-means init at 2^bits, no extras;
    'lcd': density init, progressive, smoothing (with a_bits); the ablation variants (ablations()) flip one."""
    c = lcd_settings(method, config)
    return lcd.prepare_student(teacher, config["bits"], config["group_size"], calib,
                               progressive_p=c["progressive_p"], init=c["init"], weighted=c["weighted"],
                               smoothing=c["smoothing"], a_bits=config["a_bits"], log=log)


def lcd_settings(method, config):
    """Which of LCD's pieces are on for a distillation run (the ablation turns one off at a time)."""
    if method == "kd":
        return dict(init="kmeans++", weighted=False, progressive_p=0, speculative_every=0, smoothing=False)
    c = dict(init=config["lcd_init"], weighted=True, progressive_p=config["progressive_p"],
             speculative_every=config["speculative_every"], smoothing=config["smoothing"])
    return dict(c, **ablations(config).get(method, {}))


def ablations(config):
    """{variant: settings}: LCD with one piece flipped. A piece that is on is switched off (lcd-no-*); a piece
    whose default is off (set so by measurement) is switched on (lcd+*), so every piece shows its effect."""
    variants = {"lcd-no-density": dict(init="kmeans++")}
    if config["progressive_p"]:
        variants["lcd-no-progressive"] = dict(progressive_p=0)
    else:
        variants["lcd+progressive"] = dict(progressive_p=1)
    if config["speculative_every"]:
        variants["lcd-no-speculative"] = dict(speculative_every=0)
    else:
        variants["lcd+speculative"] = dict(speculative_every=25)
    if config["a_bits"] is not None:   # smoothing acts only on quantized activations
        variants["lcd-no-smoothing" if config["smoothing"] else "lcd+smoothing"] = dict(
            smoothing=not config["smoothing"])
    return variants


DISTILL_KEYS = ("bits", "group_size", "a_bits", "calib_batches", "kd_steps", "kd_batch_size", "kd_lr",
                "kd_latent_lr", "kd_other_lr", "kd_tau", "kd_ce", "kd_warmup", "kd_train_norms", "lcd_init",
                "progressive_p", "final_frac", "speculative_every", "reassign_every", "smoothing", "seed")


def model_digest(model):
    """A short sha256 of the model's weights: a resumed distillation must have the same teacher."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def run_distillation(method, teacher, config, train, calib, calib_x, rank, world, device):
    """Distill one student (resuming from out_dir/distill_<method>_w<bits>.pt); returns it frozen."""
    settings = lcd_settings(method, config)
    log = print if rank == 0 else None
    student = student_for(method, teacher, config, calib, log=log)
    T = model_block_size(teacher)
    gen = torch.Generator().manual_seed(config["seed"] + 2000 + rank)  # KD and LCD see the same batches
    path = os.path.join(config["out_dir"], f"distill_{method}_w{config['bits']}.pt")
    fingerprint = dict({k: config[k] for k in DISTILL_KEYS}, teacher=model_digest(teacher))
    state = None
    if os.path.exists(path):
        ckpt = load_checkpoint(path, ("state", "rng", "config"), f"delete it to restart the {method} distillation")
        if ckpt.get("config") != fingerprint:
            raise RuntimeError(f"{path} was written by a run with another configuration ({ckpt.get('config')}); "
                               "delete it or use another --out_dir")
        state = ckpt["state"]
        gen.set_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        if rank == 0:
            print(f"{method}: resuming distillation from {path} at step {state['step']}")

    def checkpoint(distill_state):
        rng = sampler_states(gen, world)
        if rank == 0:
            atomic_save(dict(state=distill_state, rng=rng, config=fingerprint), path)

    progress = Progress(method, config["kd_steps"], config["kd_batch_size"] * T * world, enabled=rank == 0,
                        start=state["step"] if state else 0)
    t0 = time.time()
    student, history = lcd.distill(
        teacher, student, batch_stream(train, config["kd_batch_size"], T, gen, device), config["kd_steps"],
        calib_x=calib_x, bits=config["bits"], tau=config["kd_tau"], ce_weight=config["kd_ce"],
        lr=config["kd_lr"], latent_lr=config["kd_latent_lr"], other_lr=config["kd_other_lr"],
        warmup=config["kd_warmup"], final_frac=config["final_frac"], train_norms=config["kd_train_norms"],
        speculative_every=settings["speculative_every"], reassign_every=config["reassign_every"],
        ddp=world > 1, state=state, checkpoint=checkpoint, checkpoint_every=config["kd_ckpt_interval"],
        log=log, on_step=progress.update)
    if rank == 0 and history["spec_checks"]:
        print(f"{method}: speculative wins {history['spec_wins']} over {history['spec_checks']} checks")
    return lcd.freeze(student), history, time.time() - t0, path


def print_table(rows, title):
    print(f"\n{title}")
    delta = any("delta_vs_lcd" in r for r in rows)
    print(f"{'method':<20} {'bits':>4} {'val_loss':>9} {'ppl':>8} {'bits/w':>7} {'bytes':>9} {'seconds':>8}"
          + (f" {'delta':>8}" if delta else ""))
    for r in rows:
        print(f"{r['method']:<20} {r['bits']:>4} {r['val_loss']:>9.4f} {r['ppl']:>8.3f} "
              f"{r['bits_per_weight']:>7.3f} {r['bytes']:>9} {r['seconds']:>8.1f}"
              + (f" {r['delta_vs_lcd']:>+8.4f}" if delta and r.get("delta_vs_lcd") is not None else ""))


def quantize_and_distill(config, teacher, meta, teacher_row, rank=0, world=1, device="cpu"):
    """Stages 3-7. Writes out_dir/lcd_w<bits>.pt (packed student) and out_dir/results.json (rank 0)."""
    train, val = load_tokens(meta["dir"], "train"), load_tokens(meta["dir"], "val")
    T, out, b = model_block_size(teacher), config["out_dir"], config["bits"]
    calib, calib_x = calibration_data(train, config, T)                    # stage 3
    teacher_row = dict(teacher_row, ppl=math.exp(teacher_row["val_loss"]) if rank == 0 else None)
    rows, checkpoints = [teacher_row], []

    # stage 4: post-training quantization, no training: RTN, k-means and LCD's density init (rank 0)
    if rank == 0:
        for method, name in (("rtn", "rtn"), ("kmeans", "kmeans"), ("lcd", "lcd-init")):
            t0 = time.time()
            quantized = lcd.quantize(copy.deepcopy(teacher), b, config["group_size"], calib, method=method)
            if config["a_bits"] is not None:
                for layer in quantized.modules():
                    if isinstance(layer, lcd.LUTLinear):
                        layer.a_bits = config["a_bits"]
            rows.append(result_row(name, quantized, config, val, time.time() - t0))
            print(f"{name}: val loss {rows[-1]['val_loss']:.4f}")

    # stages 5-6: plain KD, then LCD, with the same budget; then the ablation
    curves, ablation = {}, []
    methods = ["kd", "lcd"]
    if config["ablate"]:
        methods += list(ablations(config))
    last = {"baselines": 0, "kd": 1, "lcd": 2}.get(config["stop_after"], len(methods))
    for method in methods[:last]:
        student, history, seconds, path = run_distillation(method, teacher, config, train, calib, calib_x,
                                                           rank, world, device)
        checkpoints.append(path)
        if rank == 0:
            row = result_row(method, student, config, val, seconds)
            print(f"{method}: val loss {row['val_loss']:.4f} (teacher {teacher_row['val_loss']:.4f})")
            curves[method] = dict(loss=history["loss"], stages=history["stages"],
                                  spec_wins=history["spec_wins"], spec_checks=history["spec_checks"])
            (rows if method in ("kd", "lcd") else ablation).append(row)
            if method == "lcd":  # stage 7: the packed student
                lcd.save_quantized(student, os.path.join(out, f"lcd_w{b}.pt"))
    if config["ablate"] and rank == 0 and last > 2:
        t0 = time.time()   # KD off: LCD's initialization at 2^bits, frozen without training
        no_kd = lcd.freeze(student_for("lcd-no-kd", teacher, dict(config, progressive_p=0), calib))
        ablation.append(result_row("lcd-no-kd", no_kd, config, val, time.time() - t0))

    if rank == 0:
        print_table(rows, f"LCD report: b={b}, group_size={config['group_size']}, a_bits={config['a_bits']}, "
                          f"{config['kd_steps']} distillation steps")
        results = dict(rows=rows, config=config, curves=curves)
        if config["ablate"]:
            lcd_row = next((r for r in rows if r["method"] == "lcd"), None)
            for r in ablation:
                r["delta_vs_lcd"] = r["val_loss"] - lcd_row["val_loss"] if lcd_row else None
            print_table(ablation, "ablation: LCD with one piece switched off (delta = what that piece buys)")
            results["ablation"] = ablation
        write_json(results, os.path.join(out, "results.json"))
        print(f"wrote {os.path.join(out, 'results.json')}")
        for path in checkpoints:   # the run is complete: its distillation checkpoints have served
            if os.path.exists(path):
                os.remove(path)
    if world > 1:
        dist.barrier()


def write_json(obj, path):
    """json.dump, atomically (lcd.atomic_write): an error midway leaves the previous file as it was."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    lcd.atomic_write(path, write)


# -----------------------------------------------------------------------------------------------
# The pipeline

STAGES = ("", "teacher", "baselines", "kd", "lcd")  # values of --stop_after ('' runs everything)


def main(argv):
    try:
        config = parse_config(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if config["stop_after"] not in STAGES:
        sys.exit(f"error: --stop_after must be one of {STAGES}, got {config['stop_after']!r}")
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
    t_teacher = time.time()
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
        teacher_row = dict(method="teacher", bits=32, val_loss=teacher_loss if rank == 0 else None,
                           seconds=time.time() - t_teacher, **fp_footprint(teacher))
        quantize_and_distill(config, teacher, meta, teacher_row, rank, world, device)

    if rank == 0:
        print(f"done in {time.time() - t_start:.0f} s")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

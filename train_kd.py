"""
The whole LCD pipeline in one script, stage by stage:

  1. data     - data/prepare.py, if data/<dataset>/ is missing
  2. teacher  - train the full-precision GPT, if out/teacher.pt is missing (AdamW, warmup + cosine)
  3. calib    - calibration batches (input statistics) and a held-out batch (speculative steps)
  4. ptq      - post-training quantization, no training: RTN, k-means, LCD's density init (lcd.quantize)
  5. kd       - plain KD: k-means init at 2^b, distilled with the same steps and optimizer as LCD
  6. lcd      - LCD: density init, progressive merges, speculative steps (+ adaptive smoothing with a_bits);
                --ablate=1 repeats it with each piece switched off
  7. report   - freeze to LUTLinear, evaluate, save out/lcd_w<b>.pt (lcd_w<b>_g<group>.pt with groups), print the
                table and a text sample of the teacher and the packed student, write out/results_w<b>.json

    python train_kd.py                                  # everything, CPU-sized defaults
    python train_kd.py --help                           # every flag, its default and meaning
    python train_kd.py --preset=tiny --max_iters=50     # any global below can be overridden
    torchrun --nproc_per_node=2 train_kd.py             # the same, data-parallel (DDP)

Every run is resumable: checkpoints are written atomically (temp file + rename) and a killed run picks up
from the last one. Config values are module-level globals (nanoGPT style); `--key=value` overrides them,
type-checked, range-checked before any work starts, unknown keys rejected. Ctrl-C saves the teacher's
progress and says which checkpoint holds it; the same command resumes.
"""
import copy
import datetime
import hashlib
import json
import math
import os
import re
import resource
import sys
import time

import numpy as np
import torch

import baselines
import configurator
import lcd
import packed_model
import checkpoints
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, SIZES, config_dict, from_config

# -----------------------------------------------------------------------------------------------
# Config: defaults as globals, one line each. `--key=value` overrides them.
# I/O
out_dir = "out"                # checkpoints, reports, figures
dataset = "shakespeare"        # data/<dataset>/{train,val}.bin (or an absolute directory); prepared on first use
tokenizer = "bytes"            # 'bytes', 'gpt2' or 'smollm2' (used when the dataset must be prepared)
general_eval = "auto"          # also judge every row on modern English (Django's docs, evaluation only): auto (beside the plays), yes, no
init_from = "scratch"          # 'scratch' trains a teacher; 'smollm2' (through pip), a .gguf file or a model directory loads one
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
# quantization and distillation (stages 3-7; lcd.py sections 4-5)
bits = 2                       # b: 2^b centroids per row (or group) in the quantized student
group_size = None              # inputs sharing one codebook (None: one codebook per row)
a_bits = None                  # activation bits: None (weight-only), 8 or 4 (per-token, symmetric)
calib_batches = 4              # calibration batches (batch_size sequences each) for the statistics
distill_data = "plays"         # what calibration and distillation read: plays (the train split), teacher (text it writes), or mix (half each)
teacher_text_seqs = 128        # with distill_data teacher or mix: sequences the teacher writes, block_size tokens each (cached)
teacher_text_seed = 1337       # the seed of the teacher's text: its own, so that runs over several --seed share one cached text
kd_steps = 1500                # distillation steps, the same for plain KD and LCD (about 4 min each on 2 cores)
kd_batch_size = 16             # sequences per distillation step and process
kd_lr = 1e-3                   # peak learning rate of the centroids (end-to-end distillation)
kd_latent_lr = 1e-3            # peak learning rate of the latent weights (they decide the assignments; end-to-end)
kd_other_lr = 1e-4             # peak learning rate of norms and biases (with kd_train_norms; both stages)
kd_tau = 1.0                   # distillation temperature
kd_ce = 0.0                    # weight of the cross-entropy on the next-token labels
kd_warmup = 20                 # warm-up steps (again after each progressive merge)
kd_train_norms = True          # train norms and biases along with the codebooks
kd_ckpt_interval = 100         # distillation steps between resumable checkpoints
lcd_init = "density"           # LCD's centroid initialization: density, kmeans++ or uniform
compensate = 0                 # 1: LCD starts compensated (lcd-gptq: codebooks assigned with GPTQ's error feedback, refit under H)
progressive_p = 0              # LCD starts at 2^(bits + p) centroids, halved down to 2^bits (0: off, as measured)
final_frac = 0.75              # share of the distillation steps for the last progressive stage
speculative_every = 25         # steps between LCD's speculative steps (0: off)
reassign_every = 1             # steps between re-assigning weights to the centroid nearest their latent
smoothing = False              # LCD's adaptive smoothing (only with a_bits; off: it did not help when measured)
ablate = 0                     # 1: also run LCD with each piece switched off in turn
kd_baseline = 1                # 1: also distill plain KD (k-means init, none of LCD's pieces) with the same budget
kd_mode = "e2e"                # 'e2e': logit KD of the whole model; 'blocks': block-wise reconstruction, then kd_steps of it
block_steps = 50               # with kd_mode='blocks': AdamW steps per transformer block (output error vs the teacher's)
block_batch_size = 4           # with kd_mode='blocks': cached calibration sequences per block-wise step
block_lr = 1e-3                # with kd_mode='blocks': the centroids' peak learning rate in block-wise reconstruction
block_latent_lr = 1e-3         # with kd_mode='blocks': the latent weights' peak learning rate there
block_loss = "batch"           # with kd_mode='blocks': a block's squared error relative to the batch's mean square, or 'token': to each token's own (lcd.block_loss; measured no better)
block_seqs = 0                 # with kd_mode='blocks': distinct sequences (whole windows of the distillation data) it fits on (0: the calibration batches)
extra_bits = 0.0               # bits per weight spent above the b-bit model on its most sensitive layers, as b+1 bits (lcd.allocate_bits; every stored bit counted; 0: b bits everywhere)
budget = 1.0                   # multiplies block_steps and kd_steps: more distillation time (RESULTS.md: what 2x, 4x buy)
ptq = "rtn,kmeans,lcd-init"    # the report's post-training rows, comma-separated names of baselines.quality_rows
# the report's text sample: teacher and packed student continue one prompt from a held-out play
sample_prompt = "HAMLET:\nTo be, or not to be, that is the question:\n"  # the prompt (Hamlet is never trained on)
sample_tokens = 200            # tokens each model writes after the prompt (0: no sample)
sample_temperature = 0.8       # sampling temperature of the sample (0: greedy)
sample_top_k = 40              # sample among the k likeliest tokens (0: all of them)
chat_tokens = 48               # with a chat model (a chat template): tokens each model may answer each chat question with (0: no chat)

DEFAULTS = configurator.config_defaults(globals())   # the config lines above, as written: --help shows them
CONFIG_KEYS = list(DEFAULTS)

# A pretrained teacher (--init_from=smollm2, a .gguf file or a model directory) is two orders of magnitude larger
# than `baby`: these are its defaults, chosen by measurement (RESULTS.md, "Real LLM" and "Bits where the error is").
# A key given on the command line wins. A named checkpoint also brings its tokenizer and dataset.
PRETRAINED_DEFAULTS = dict(block_size=256, batch_size=8, eval_batches=4, calib_batches=8, kd_mode="blocks",
                           block_steps=80, block_batch_size=4, kd_steps=30, kd_batch_size=4, kd_warmup=5,
                           kd_ckpt_interval=10, speculative_every=10, ptq="rtn,lcd-init", sample_tokens=40,
                           distill_data="mix", kd_baseline=0,   # mix: measured best across both held-out sets (RESULTS.md)
                           compensate=1, extra_bits=0.15, block_seqs=320, teacher_text_seqs=256,
                           kd_lr=3e-4, kd_latent_lr=3e-4)   # end-to-end rates after the block-wise stage (RESULTS.md)
# The fifth line at b = 2 (RESULTS.md, "Bits where the error is"): plays x1.54 -> x1.32, general English x2.97 -> x2.09,
# at 2.243 bits per weight (<= 2.25, llama.cpp Q2_0's budget); 38.4 minutes on 2 idle cores with the teacher's text
# cached (about 8 more to write it on a first run), against 25.3 (29.5) before.
# The last line, the end-to-end rates (the block-wise stage keeps --block_lr=1e-3): 0.05 nats better on the tuning
# split from one block-wise checkpoint, level at the defaults (x1.32 / x2.14; RESULTS.md, "The end-to-end stage's own
# learning rate").
# GPTQ and the published methods (baselines.py) on SmolLM2 are bench.py --quality --model=smollm2 (minutes each, not in every run);
# plain KD doubles a run's time and is one flag away (--kd_baseline=1; --ablate=1 runs it too)
NAMED_CHECKPOINT_DEFAULTS = {"smollm2": dict(tokenizer="smollm2", dataset="shakespeare_smollm2")}
PTQ_NAMES = list(dict.fromkeys(row[0] for b in (2, 3, 4) for row in baselines.quality_rows(b)))


def parse_config(argv, defaults=None):
    """Defaults overridden by `--key=value` arguments; values are Python literals, checked by type."""
    config, given = configurator.parse_overrides(argv, defaults or DEFAULTS)
    if config.get("init_from", "scratch") != "scratch":          # a pretrained teacher: its own defaults
        pretrained = dict(PRETRAINED_DEFAULTS, **NAMED_CHECKPOINT_DEFAULTS.get(config["init_from"], {}))
        config.update({k: v for k, v in pretrained.items() if k in config and k not in given})
    if config.get("budget", 1.0) != 1.0:                        # the one flag for a longer (or shorter) run
        budget = config["budget"]
        if not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"--budget must be a number > 0 (a multiple of the distillation steps), got {budget!r}")
        steps = {key: config[key] for key in ("block_steps", "kd_steps")}
        for key, n in steps.items():
            if n * budget > COUNT_MAX:      # the product, not only the flag: 1e308 steps became inf
                raise ValueError(f"--budget={budget!r} makes --{key}={n} x {budget:g} = {n * budget:.3g} steps, past "
                                 f"the most a run counts ({COUNT_MAX}): give a --budget of at most "
                                 f"{COUNT_MAX / max(*steps.values(), 1):.3g}")
        for key, n in steps.items():
            config[key] = max(1, round(n * budget))
    if config.get("preset") not in SIZES:
        raise ValueError(f"unknown preset {config.get('preset')!r}; choose one of {', '.join(SIZES)}")
    choices = (("bits", tuple(packed_model.ENTRIES_PER_WORD)), ("a_bits", (None, 8, 4)),
               ("lcd_init", ("density", "kmeans++", "uniform")), ("tokenizer", ("bytes", "gpt2", "smollm2")),
               ("kd_mode", ("e2e", "blocks")), ("block_loss", lcd.BLOCK_LOSSES), ("general_eval", ("auto", "yes", "no")),
               ("distill_data", ("plays", "teacher", "mix")))
    for key, allowed in choices:                      # found now, not after the teacher has trained
        if key in config and config[key] not in allowed:
            raise ValueError(f"--{key} must be one of {allowed}, got {config[key]!r}")
    check_config(config)
    return config


# The range of every numeric key, checked before any work starts (a bad value found after the teacher has
# trained costs its training time). Keys missing from a config (a caller's partial dict) are skipped.
POSITIVE = ("learning_rate", "kd_lr", "kd_latent_lr", "kd_other_lr", "kd_tau", "block_lr", "block_latent_lr")
AT_LEAST_ONE = ("max_iters", "batch_size", "ckpt_interval", "eval_batches", "calib_batches", "kd_steps",
                "kd_batch_size", "kd_ckpt_interval", "n_layer", "n_head", "n_embd", "block_size",  # None: preset
                "block_batch_size", "teacher_text_seqs")
NON_NEGATIVE = ("seed", "teacher_text_seed", "min_lr", "warmup_iters", "weight_decay", "grad_clip", "log_interval", "kd_ce",
                "kd_warmup", "progressive_p", "speculative_every", "reassign_every", "sample_tokens", "block_steps",
                "block_seqs", "extra_bits",
                "sample_temperature", "sample_top_k", "chat_tokens")
FRACTIONS = (("dropout", 0.0, True, 1.0, False), ("final_frac", 0.0, False, 1.0, True))  # key, lo, lo ok, hi, hi ok
COUNT_MAX = 2 ** 31 - 1   # the most of any count (steps, batches, sequences, tokens): sizes, loops and kernels take C ints
SEEDS = ("seed", "teacher_text_seed")
SEED_MAX = 2 ** 63 - 1    # the stages add offsets below 2^32 to a seed (seed + 2000 + rank, ...): torch takes < 2^64


def check_config(config):
    """Raise ValueError naming the key, the value and the allowed range for any value out of range;
    group_size is checked against the model's width as far as the config knows it (the preset)."""
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{key} must be a finite number, got {value!r}")
    for keys, ok, wanted in ((POSITIVE, lambda v: v > 0, "> 0"), (AT_LEAST_ONE, lambda v: v >= 1, ">= 1"),
                             (NON_NEGATIVE, lambda v: v >= 0, ">= 0")):
        for key in keys:
            if config.get(key) is not None and not ok(config[key]):
                raise ValueError(f"--{key} must be {wanted}, got {config[key]!r}")
    for key in AT_LEAST_ONE + NON_NEGATIVE:
        value = config.get(key)
        if isinstance(value, int) and value > (SEED_MAX if key in SEEDS else COUNT_MAX):
            raise ValueError(f"--{key} must be at most {SEED_MAX if key in SEEDS else COUNT_MAX}, got {value!r}")
    for key, lo, lo_ok, hi, hi_ok in FRACTIONS:
        if key in config and not ((lo <= config[key] if lo_ok else lo < config[key]) and
                                  (config[key] <= hi if hi_ok else config[key] < hi)):
            raise ValueError(f"--{key} must lie in {'[' if lo_ok else '('}{lo}, {hi}{']' if hi_ok else ')'}, "
                             f"got {config[key]!r}")
    if "min_lr" in config and "learning_rate" in config and config["min_lr"] > config["learning_rate"]:
        raise ValueError(f"--min_lr={config['min_lr']} is above --learning_rate={config['learning_rate']}: "
                         "the cosine decays from learning_rate down to min_lr")
    if config.get("sample_tokens", 0) > 0 and not config.get("sample_prompt", "x"):
        raise ValueError("--sample_prompt is empty: the prompt is empty, and a sample continues a prompt: give "
                         "at least one character, or --sample_tokens=0 for no sample")
    for key in ("ablate", "kd_baseline", "compensate"):
        if config.get(key, 0) not in (0, 1):
            raise ValueError(f"--{key} must be 0 or 1, got {config[key]!r}")
    if config.get("distill_data") == "teacher" and config.get("teacher_text_seqs", 2) < 2:
        raise ValueError(f"--teacher_text_seqs={config['teacher_text_seqs']} with --distill_data=teacher: the text "
                         "is teacher_text_seqs windows of block_size tokens, and distillation draws windows of "
                         "block_size + 1 (the next token too) from it: give --teacher_text_seqs >= 2 (or "
                         "--distill_data=mix, which adds the plays)")
    if "progressive_p" in config and config.get("bits", bits) + config["progressive_p"] > 8:
        raise ValueError(f"--progressive_p={config['progressive_p']} at --bits={config.get('bits', bits)}: LCD starts "
                         f"at 2^(bits + p) centroids and stores an assignment in one byte (at most 2^8): give "
                         f"--progressive_p <= {8 - config.get('bits', bits)}")
    if config.get("extra_bits", 0) > 0 and config.get("bits", bits) == 4:
        raise ValueError(f"--extra_bits={config['extra_bits']} at --bits=4: the sensitive layers get b + 1 bits, and "
                         "codebooks hold at most 2^4 centroids; give --extra_bits=0 at 4 bits")
    if config.get("extra_bits", 0) > 0 and config.get("progressive_p", 0) > 0:
        raise ValueError(f"--extra_bits={config['extra_bits']} with --progressive_p={config['progressive_p']}: the "
                         "progressive merges halve every codebook to 2^bits, which bits by layer do not allow; "
                         "give one of them 0")
    if config.get("stop_after", "") not in STAGES:
        raise ValueError(f"--stop_after must be one of {STAGES}, got {config['stop_after']!r}")
    if "device" in config:
        check_device(config["device"])
    if config.get("init_from", "scratch") != "scratch":
        check_init_from(config)
    if "ptq" in config:
        unknown = [n for n in ptq_names(config) if n not in PTQ_NAMES]
        if unknown:
            raise ValueError(f"--ptq names {unknown}: choose among {', '.join(PTQ_NAMES)} (comma-separated)")
    if "preset" in config and config.get("init_from", "scratch") == "scratch":
        mc = model_config(config, vocab_size=1)
        if mc["n_embd"] % mc["n_head"]:
            raise ValueError(f"n_embd={mc['n_embd']} is not divisible by n_head={mc['n_head']}: every head gets "
                             "n_embd / n_head channels; change --n_embd or --n_head")
        check_groups(config, mc["n_embd"])
    elif "group_size" in config:
        check_groups(config, None)


def check_init_from(config):
    """--init_from: a checkpoint name data/prepare.py can fetch, a .gguf file, or a directory holding a
    model.safetensors (or its shards' index). GPT-2 weights read GPT-2 tokens."""
    source = config["init_from"]
    if source in prepare_module().PRETRAINED:
        return
    if os.path.isfile(source) and source.endswith(".gguf"):
        return
    if not any(os.path.exists(os.path.join(source, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
        raise ValueError(f"--init_from={source}: not a checkpoint name ({', '.join(prepare_module().PRETRAINED)}), "
                         "a .gguf file, or a directory with model.safetensors (or model.safetensors.index.json); "
                         "use 'scratch' to train a teacher")
    config_json = os.path.join(source, "config.json")
    is_gpt2 = not os.path.exists(config_json) or '"gpt2"' in open(config_json).read()
    if is_gpt2 and config.get("tokenizer") != "gpt2":
        raise ValueError("--init_from loads GPT-2 weights, which read GPT-2 tokens: add --tokenizer=gpt2 "
                         "and a dataset prepared with it (e.g. --dataset=shakespeare_gpt2)")


def ptq_names(config):
    return [name.strip() for name in config["ptq"].split(",") if name.strip()]


def check_groups(config, width=None):
    """group_size: None (one codebook per row) or a multiple of 16 (a 2-bit index word never straddles two
    codebooks: kernels.cu's fast path), large enough that the fp16 codebooks cost no more bits than the
    indices (16 * 2^b / group_size <= b), and at most the model's narrowest layer input (width)."""
    gs, b = config.get("group_size"), config.get("bits", bits)
    if gs is None:
        return
    if gs < 1:
        raise ValueError(f"--group_size={gs}: a group is a positive number of inputs sharing one codebook; "
                         "use e.g. 64, or None for one codebook per row")
    if width is not None and gs > width:
        raise ValueError(f"--group_size={gs} is wider than the model's narrowest layer input ({width}, its "
                         f"n_embd): use a group_size <= {width}, or None for one codebook per row")
    smallest = 16 * math.ceil(2 ** b / b)       # the least multiple of 16 with 16 * 2^b / group_size <= b
    if gs < smallest or gs % 16:
        cost = f"; {gs} would cost {16 * 2 ** b / gs:.1f} bits a weight" if gs < smallest else ""
        raise ValueError(f"--group_size={gs} at {b} bits is refused: use a multiple of 16 (index words never "
                         f"straddle two codebooks) and at least {smallest} (each group's fp16 codebook costs "
                         f"16*2^{b}/group_size bits a weight, at most the {b} bits of the indices{cost}), or None "
                         "for one codebook per row")


def check_device(name):
    """A torch device this machine has: 'cpu', 'cuda', 'cuda:N'."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device={name!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name}: this machine has no CUDA GPU that torch can use: use --device=cpu")


def help_text():
    """`python train_kd.py --help`: the usage lines of the docstring, then every key, default and meaning."""
    usage = next(part for part in __doc__.split("\n\n") if "python train_kd.py" in part)
    return (f"usage: python train_kd.py [--key=value ...]   (the whole LCD pipeline, stages 1-7)\n\n{usage}"
            f"\n\nEvery key below takes --key=value (a Python literal, or a bare word for a string):\n\n"
            + configurator.describe_config(os.path.abspath(__file__), DEFAULTS)
            + "\n\nWith a pretrained teacher (--init_from other than scratch) these defaults change (a key given "
              "on the command line wins):\n  pretrained: " + ", ".join(f"--{k}={v}" for k, v in PRETRAINED_DEFAULTS.items())
            + "".join(f"\n  and with --init_from={name}: " + ", ".join(f"--{k}={v}" for k, v in extra.items())
                      for name, extra in NAMED_CHECKPOINT_DEFAULTS.items()))


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


def prepare_module():
    """data/prepare.py, imported from its folder."""
    if DATA_ROOT not in sys.path:
        sys.path.insert(0, DATA_ROOT)
    import prepare
    return prepare


def ensure_data(dataset, tokenizer="bytes", log=print):
    """Return data/<dataset>/meta.json as a dict, the dataset checked against it (prepare.check_dataset: every
    file's length and sha256). The plays and the general-English set are prepared when missing, and prepared
    again when incomplete or corrupt (one line saying so), by one process at a time: the others (the ranks of
    a torchrun, runs started together) wait for it (packed_model.exclusive) and find it ready. Any other
    dataset that is missing is a FileNotFoundError, a corrupt one a ValueError naming the file and the command
    that prepares it again."""
    data_dir = dataset if os.path.isabs(dataset) else os.path.join(DATA_ROOT, dataset)
    meta_path, prepare = os.path.join(data_dir, "meta.json"), prepare_module()
    meta, problem = prepare.check_dataset(data_dir)
    known = dataset == general_name(tokenizer) or dataset in ("shakespeare", f"shakespeare_{tokenizer}")
    if problem is not None and known:
        with packed_model.exclusive(meta_path, f"the dataset {dataset}", log):
            meta, problem = prepare.check_dataset(data_dir)      # another process may have prepared it meanwhile
            if problem is not None:
                if os.path.exists(meta_path):
                    log(f"{data_dir}: {problem}: removed; preparing the dataset again")
                    for name in ("meta.json", "train.bin", "val.bin"):   # meta.json first: it vouches for the rest
                        if os.path.exists(os.path.join(data_dir, name)):
                            os.remove(os.path.join(data_dir, name))
                if dataset == general_name(tokenizer):
                    prepare.prepare_general(tokenizer)
                else:
                    prepare.prepare(name=dataset, tokenizer=tokenizer)
                meta, problem = prepare.check_dataset(data_dir)
    if problem is not None and not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: prepare it with "
                                f"python data/prepare.py --input=FILE --name={dataset}")
    if problem is not None:
        source = (meta or {}).get("source") or "FILE"
        raise ValueError(f"--dataset={dataset}: {problem}; the dataset is incomplete or corrupt: prepare it again "
                         f"with python data/prepare.py --input={source} --name={os.path.basename(data_dir)}")
    if meta.get("tokenizer") != tokenizer:
        raise ValueError(f"{data_dir} holds {meta.get('tokenizer')!r} tokens, not {tokenizer!r}: use a dataset "
                         f"prepared with that tokenizer, e.g. --dataset=shakespeare_{tokenizer}")
    meta["dir"] = data_dir
    return meta


def general_name(tokenizer):
    """The general-English evaluation set's name in data/ for a tokenizer (data/prepare.py --source=general)."""
    return "general" if tokenizer == "bytes" else f"general_{tokenizer}"


def held_out_sets(config, meta):
    """{name: tokens} that every row is judged on: "val", the dataset's held-out split (the plays), and with
    general_eval (auto: when the dataset is the plays) "general", modern English that nothing trains on."""
    sets = {"val": load_tokens(meta["dir"], "val")}
    if config.get("general_eval") == "yes" or (config.get("general_eval") == "auto"
                                               and os.path.basename(meta["dir"]).startswith("shakespeare")):
        sets["general"] = load_tokens(ensure_data(general_name(meta["tokenizer"]), meta["tokenizer"])["dir"], "val")
    return sets


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

    def __init__(self, name, total, tokens_per_step, enabled=True, start=0, log_interval=log_interval):
        self.name, self.total, self.tokens_per_step, self.enabled = name, total, tokens_per_step, enabled
        self.log_interval = log_interval       # seconds between lines when the output is not a terminal
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
        elif now - self.last_log >= self.log_interval or step + 1 == self.total or done == 1:
            print(line, flush=True)
            self.last_log = now


def peak_memory_gib(reset=False):
    """The process's peak resident memory in GiB since the start or the last reset=True (Linux: VmHWM in
    /proc/self/status, reset through /proc/self/clear_refs; elsewhere the lifetime peak, never reset)."""
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2 ** 20
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
    except (OSError, StopIteration, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # Linux and BSD report KiB
    _PEAKS.append(peak)
    return peak


_PEAKS = []   # every peak_memory_gib() reading: the run's peak is their maximum (a reset also resets ru_maxrss)


def _clock(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def atomic_save(obj, path):
    """torch.save to a temp file, flushed to disk, then renamed (packed_model.atomic_write): a crash or a full disk
    never leaves a half-written checkpoint, and the previous one stays as it was."""
    packed_model.atomic_write(path, lambda tmp: torch.save(obj, tmp))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with one line saying where the progress is saved (raised by the stages, printed by the script)."""


def load_checkpoint(path, keys=(), remedy="delete it to restart that stage"):
    """Load a checkpoint written by atomic_save (tensors and plain containers only): a dict holding `keys`.
    An empty, truncated or corrupt file, or one without those keys, is a RuntimeError naming the file and
    saying what to do (`remedy`)."""
    try:
        ckpt = packed_model.read_torch_file(path, remedy)
    except ValueError as e:
        raise RuntimeError(str(e)) from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise RuntimeError(f"{path} is not a checkpoint of this stage (it lacks {missing}): {remedy}")
    return ckpt


# How long a collective (DDP's gradients, a broadcast) waits for every rank. Rank 0 works alone between the
# collectives of distillation -- the post-training rows (GPTQ on a pretrained model: minutes to an hour on a
# slow machine), each row's evaluation, the report -- while the other ranks wait at the next one; with
# torch's default (10 or 30 minutes) a slow machine timed out and torchrun killed the whole run. A rank
# that dies is seen by torchrun at once, so a long timeout costs nothing there. Files that rank 0 writes
# (data, the teacher's text) are not waited for at a collective at all (packed_model.exclusive).
DIST_TIMEOUT = datetime.timedelta(hours=24)


def setup_distributed(device):
    """(rank, world_size, device): torchrun sets RANK/WORLD_SIZE; gloo on CPU, nccl on CUDA; collectives
    wait DIST_TIMEOUT."""
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", timeout=DIST_TIMEOUT)
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
        stored = dict(ckpt.get("config") or {}, **{f"model {k}": v for k, v in ckpt["model_config"].items()})
        wanted = dict(fingerprint, **{f"model {k}": v for k, v in mc.items()})
        differ = [k for k in wanted if k not in ("learning_rate", "min_lr") and stored.get(k) != wanted[k]]
        if differ:     # the rates may change: a diverged run resumes with lower ones
            shown = "; ".join(f"{k}: {stored.get(k)!r} in the checkpoint, {wanted[k]!r} now" for k in differ[:6])
            raise RuntimeError(f"{ckpt_path} was written by a run with another model or training configuration "
                               f"({shown}): resume with those settings, or delete it or use another --out_dir")
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
                        enabled=rank == 0, start=start, log_interval=config["log_interval"])
    saved = start                        # the step the checkpoint on disk resumes at (start: none newer)

    def save(step, rng):
        nonlocal saved
        if rank == 0:
            atomic_save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                             rng=rng, model_config=mc, config=fingerprint), ckpt_path)
        saved = step

    model.train()
    # On Ctrl-C the run can be saved where the weights, the optimizer and the sampler agree: at the start of
    # a step, or after its update; not during the update (resume_at None), which leaves it half-done.
    resume_at = None
    try:
        for step in range(start, config["max_iters"]):
            resume_at = (step, gen.get_state())
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            x, y = get_batch(train, config["batch_size"], T, gen, device)
            _, loss = ddp_model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"] if config["grad_clip"] > 0
                                                  else float("inf"))
            if not (math.isfinite(loss.item()) and torch.isfinite(norm)):
                kept = f"{ckpt_path} (step {saved}) is kept as it was" if saved else "no checkpoint was written yet"
                raise lcd.Diverged(f"teacher: the loss is {loss.item()} (gradient norm {norm.item()}) at step {step}: "
                                   f"the training diverged and stops before the update; {kept}. The same command "
                                   f"with a lower --learning_rate (now {config['learning_rate']}, e.g. ten times "
                                   "lower) resumes from it")
            resume_at = None
            optimizer.step()
            resume_at = (step + 1, gen.get_state())
            progress.update(step, loss.item())
            if (step + 1) % config["ckpt_interval"] == 0 and step + 1 < config["max_iters"]:
                save(step + 1, sampler_states(gen, world))
    except KeyboardInterrupt:
        # one process only: several would first have to agree on a step (they keep the periodic checkpoints)
        if world == 1 and resume_at is not None and resume_at[0] > saved:
            save(resume_at[0], [resume_at[1]])
        where = (f"the teacher's progress is saved in {ckpt_path} (step {saved} of {config['max_iters']})"
                 if saved > 0 else "no teacher checkpoint was written yet")
        raise Interrupted(f"{where}; run the same command to resume") from None
    return model


def ensure_teacher(**overrides):
    """(teacher, meta): load out_dir/teacher.pt, or prepare data and train it first. For scripts and tests."""
    config = dict(DEFAULTS, **overrides)
    check_outputs(config)
    meta = ensure_data(config["dataset"], config["tokenizer"])
    path = os.path.join(config["out_dir"], "teacher.pt")
    if not os.path.exists(path):
        model = train_teacher(config, meta, device=config["device"])
        save_teacher(model, path, teacher_data(config, meta))
    return load_teacher(path, config["device"], teacher_data(config, meta)), meta


def teacher_data(config, meta):
    """What a teacher was trained on, stored in teacher.pt: a later run on other data must not reuse it."""
    return dict(dataset=config["dataset"], tokenizer=meta["tokenizer"], vocab_size=meta["vocab_size"],
                source_sha256=meta.get("source_sha256"))


def save_teacher(model, path, data=None):
    """The trained teacher (and `data`, teacher_data()); its training run is complete, so the resume
    checkpoint beside it goes."""
    ckpt = dict(model=model.state_dict(), model_config=vars(model.config))
    if data is not None:
        ckpt["data"] = data
    atomic_save(ckpt, path)
    resume = os.path.join(os.path.dirname(path), "teacher_ckpt.pt")
    if os.path.exists(resume):
        os.remove(resume)


def load_teacher(path, device="cpu", data=None, log=print):
    """The teacher saved by save_teacher; RuntimeError for an incomplete, corrupt or foreign file. data
    (teacher_data() of this run): refuse a teacher trained on other data (another dataset, tokenizer or
    vocabulary), which would be reused silently otherwise."""
    ckpt = load_checkpoint(path, ("model", "model_config"), "delete it to train the teacher again")
    if data is not None:
        check_teacher_data(ckpt.get("data"), data, ckpt["model_config"].get("vocab_size"), path, log)
    model = GPT(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def load_pretrained_teacher(source, meta, log=print):
    """--init_from: a name data/prepare.py fetches (smollm2), a .gguf file or a Hugging Face directory
    (checkpoints.load_pretrained). The dataset's tokens must be the model's: its ids must fit the vocabulary."""
    t0 = time.time()
    prepare = prepare_module()
    path = prepare.fetch_pretrained(source) if source in prepare.PRETRAINED else source
    teacher, enc = checkpoints.load_pretrained(path)
    check_teacher_tokenizer(meta, source, path, teacher.config.vocab_size, enc)
    if log:
        log(f"teacher: {type(teacher).__name__} from {path} in {time.time() - t0:.1f} s")
    return teacher.eval()


def check_teacher_tokenizer(meta, source, path, model_vocab, enc):
    """Refuse a dataset whose tokens are not the pretrained teacher's, before any work: its tokenizer
    (meta.json) must be the teacher's own -- the same vocabulary size as the checkpoint's tokenizer (enc,
    None when the checkpoint has none) and, for a named checkpoint (smollm2), the same name -- and its ids
    must fit the model's vocabulary. Both names and both vocabulary sizes are in the message."""
    ours = f"{source!r}'s tokenizer" + (f" (vocabulary {enc.n_vocab})" if enc is not None else "")
    theirs = f"--dataset={meta['dir']} holds {meta['tokenizer']!r} tokens (vocabulary {meta['vocab_size']})"
    tok = source if source in prepare_module().PRETRAINED else "<the model's tokenizer>"
    remedy = (f"prepare the data with the model's tokenizer (python data/prepare.py --tokenizer={tok}) and "
              f"give --tokenizer={tok} --dataset=<that dataset>")
    named_mismatch = source in prepare_module().PRETRAINED and meta["tokenizer"] != source
    size = enc.n_vocab if enc is not None else model_vocab   # without a tokenizer file: the model's own
    if named_mismatch or size != meta["vocab_size"]:
        raise RuntimeError(f"{theirs}, but the teacher {path} reads {ours}, model vocabulary {model_vocab}: "
                           f"the tokenizers do not match; {remedy}")
    if meta["vocab_size"] > model_vocab:
        raise RuntimeError(f"{theirs}, more than {path}'s vocabulary of {model_vocab}: {remedy}")


def check_teacher_data(stored, wanted, vocab_size, path, log=print):
    """Raise RuntimeError if the teacher in `path` (trained on `stored`) does not fit this run's `wanted`
    data; a teacher.pt from before these records (stored None) is accepted with a note if its vocabulary fits."""
    advice = (f"use another --out_dir for this dataset, or delete {path} to train a new teacher on it")
    if vocab_size != wanted["vocab_size"]:
        raise RuntimeError(f"{path} is a teacher with a vocabulary of {vocab_size} tokens, but --dataset="
                           f"{wanted['dataset']} holds {wanted['tokenizer']!r} tokens (vocabulary "
                           f"{wanted['vocab_size']}): {advice}")
    if stored is None:
        if log:
            log(f"note: {path} does not record the dataset it was trained on (saved by an older train_kd.py); "
                f"it is reused for --dataset={wanted['dataset']}: delete it if it was trained on other data")
        return
    differ = [k for k in ("dataset", "tokenizer", "vocab_size", "source_sha256")
              if stored.get(k) is not None and wanted.get(k) is not None and stored.get(k) != wanted[k]]
    if differ:
        def show(d):
            return ", ".join(f"{k}={d.get(k)!r}" for k in differ)
        raise RuntimeError(f"{path} is a teacher trained on other data ({show(stored)}) than this run reads "
                           f"({show(wanted)}): {advice}")


# -----------------------------------------------------------------------------------------------
# Stages 3-7: calibration -> PTQ baselines -> plain KD and LCD distillation -> freeze -> report

def fp_footprint(model):
    """Bytes and bits per weight of the layers lcd.py quantizes, as the FP model holds them (fp32)."""
    params = sum(m.weight.numel() for m in packed_model.find_linears(model).values())
    bits_fp = torch.finfo(next(model.parameters()).dtype).bits
    return dict(bits_per_weight=float(bits_fp), bytes=params * bits_fp // 8)


def evaluate_sets(model, sets, config):
    """{val_loss, ppl} on the held-out split and, when `sets` has them, {general_loss, general_ppl} on the
    general-English set and {tune_loss, tune_ppl} on the tuning split: the same fixed windows for every row."""
    scores = {}
    for name, tokens in sets.items():
        loss = evaluate(model, tokens, context_length(config, model), config["batch_size"], config["eval_batches"])
        prefix = "val" if name == "val" else name
        scores.update({f"{prefix}_loss": loss, "ppl" if name == "val" else f"{name}_ppl": math.exp(loss)})
    return scores


def scores_text(scores):
    """evaluate_sets' scores as a log line: 'val loss 4.1822 (ppl 65.51); general English: loss ... (ppl ...)'."""
    loss, general, tune = scores["val_loss"], scores.get("general_loss"), scores.get("tune_loss")
    return f"val loss {loss:.4f} (ppl {math.exp(loss):.2f})" + (
        f"; general English: loss {general:.4f} (ppl {math.exp(general):.2f})" if general is not None else "") + (
        f"; tuning split: loss {tune:.4f}" if tune is not None else "")


def result_row(method, model, config, sets, seconds):
    """One row of the report: loss and perplexity on every held-out set (evaluate_sets), effective bits per
    weight, bytes, seconds."""
    fp = packed_model.footprint(model)
    return dict(method=method, bits=config["bits"], **evaluate_sets(model, sets, config),
                bits_per_weight=fp["bits_per_weight"], bytes=fp["total_bytes"], seconds=seconds)


def context_length(config, model):
    """Tokens per window (calibration, distillation, evaluation): --block_size, at most the model's context
    (a pretrained model knows thousands of positions; windows of PRETRAINED_DEFAULTS' 256 are what a CPU affords)."""
    return min(config.get("block_size") or model.config.block_size, model.config.block_size)


def batch_stream(tokens, batch_size, block_size, generator, device):
    """Endless random training windows (x, y); draws lazily, so a generator state pins the position."""
    while True:
        yield get_batch(tokens, batch_size, block_size, generator, device)


# Teacher-written distillation data (LLM-QAT's data-free KD, Liu et al. 2023; BitDistiller distils on the
# teacher's own text too): a 2-bit student has little capacity, and what it is distilled on is what it keeps.
# Text the teacher writes is the teacher's own distribution - its general English, and for a chat model its
# chat turns - where the plays are one narrow corner of it. Half the sequences start, as in LLM-QAT, from one
# token drawn uniformly from the vocabulary; with a chat template the other half start from the template's
# system message and an open user turn, so the teacher writes a request and answers it. Sampled at
# temperature 1 with the KV cache, a batch at a time; written once to data/cache/, keyed by the teacher's
# digest and the settings, and reused by calibration, block-wise reconstruction and end-to-end KD.
TEACHER_TEXT_BATCH = 64   # sequences the teacher writes at once (one batched generate; about as fast as 16 on 2 cores over 256 tokens)
TUNING_SEQS = 32          # sequences of the tuning split the teacher writes (never distilled on: settings are chosen on it)


def teacher_text_prompts(enc, n, generator):
    """n prompts (lists of token ids) of two kinds, alternating batch by batch: one uniformly drawn
    ordinary token (LLM-QAT), or the chat template's opening up to an open user turn (a chat model only)."""
    special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    ordinary = [i for i in range(enc.n_vocab) if i not in special]
    opening = None
    if getattr(enc, "chat", None) is not None:      # the system turn, then the user's turn left open
        opening = checkpoints.chat_ids(enc, [{"role": "user", "content": ""}], answer=False)
    prompts = []
    for start in range(0, n, TEACHER_TEXT_BATCH):
        size = min(TEACHER_TEXT_BATCH, n - start)
        if opening is not None and (start // TEACHER_TEXT_BATCH) % 2:
            prompts += [list(opening)] * size
        else:
            picks = torch.randint(len(ordinary), (size,), generator=generator).tolist()
            prompts += [[ordinary[p]] for p in picks]
    return prompts


@torch.no_grad()
def write_teacher_text(teacher, enc, n_seqs, block_size, seed, log=print):
    """n_seqs sequences of block_size tokens that the teacher writes (teacher_text_prompts, then sampling
    at temperature 1), concatenated: a uint16 array of n_seqs * block_size token ids."""
    gen = torch.Generator().manual_seed(seed)
    prompts, out, t0 = teacher_text_prompts(enc, n_seqs, gen), [], time.time()
    device = next(teacher.parameters()).device
    for start in range(0, n_seqs, TEACHER_TEXT_BATCH):
        batch = torch.tensor(prompts[start:start + TEACHER_TEXT_BATCH], dtype=torch.long, device=device)  # (B, P)
        seqs = teacher.generate(batch, block_size - batch.shape[1], temperature=1.0,
                                seed=seed + start)                                  # (B, block_size)
        out.append(seqs.cpu().numpy().astype(np.uint16))
        if log:
            done = start + batch.shape[0]
            log(f"teacher text: {done}/{n_seqs} sequences, {done * block_size / (time.time() - t0):.0f} tokens/s")
    return np.concatenate(out).reshape(-1)


def teacher_text(config, teacher, meta, n_seqs, seed, what, rank=0):
    """n_seqs sequences of the context length that the teacher writes from `seed` (write_teacher_text), as one
    uint16 array; cached in data/cache/teacher_text_<key>.bin, keyed by the teacher's digest and the settings,
    and checked on every read (its length and sha256): a cut-off or altered text is written again, never used."""
    T = context_length(config, teacher)
    key = hashlib.sha256(json.dumps([model_digest(teacher), meta["tokenizer"], n_seqs, T, seed,
                                     TEACHER_TEXT_BATCH]).encode()).hexdigest()[:16]
    path = os.path.join(DATA_ROOT, "cache", f"teacher_text_{key}.bin")
    log = print if rank == 0 else (lambda line: print(f"rank {rank}: {line}"))

    def write(tmp):    # whichever process comes first (rank 0, or one of a sweep) writes; the others wait
        t0 = time.time()
        tokens = write_teacher_text(teacher, get_tokenizer(meta["tokenizer"]), n_seqs, T, seed, log=log)
        tokens.tofile(tmp)
        log(f"{what}: wrote {path} ({len(tokens):,} tokens in {time.time() - t0:.0f} s)")
    packed_model.cached(path, write, what, log, expect_bytes=2 * n_seqs * T)
    return np.fromfile(path, dtype=np.uint16)


def distillation_tokens(config, teacher, meta, train, rank=0, world=1):
    """The tokens calibration and distillation read (--distill_data): the train split (plays), the text the
    teacher writes (teacher; teacher_text_seqs sequences), or both in equal shares (mix: the teacher's
    tokens, then as many evenly spaced block_size windows of the plays)."""
    if config["distill_data"] == "plays":
        return train
    text = teacher_text(config, teacher, meta, config["teacher_text_seqs"], config["teacher_text_seed"] + 3000,
                        "the teacher's text", rank)
    if config["distill_data"] == "teacher":
        return text
    T = context_length(config, teacher)
    starts = np.linspace(0, len(train) - T, num=len(text) // T).astype(np.int64)
    return np.concatenate([text, *(np.asarray(train[s:s + T]) for s in starts)])


def tuning_tokens(config, teacher, meta, rank=0):
    """The tuning split: TUNING_SEQS sequences the teacher writes from a seed of its own - text nothing distils
    on and no report is about, the same for every distillation setting, to choose settings on (the held-out
    plays and general English are only reported)."""
    return teacher_text(config, teacher, meta, TUNING_SEQS, config["teacher_text_seed"] + 5000, "the tuning split",
                        rank)


def calibration_data(train, config, block_size):
    """Stage 3: calibration batches for the statistics, and a held-out batch that scores speculative steps;
    drawn from the training split with their own seed, so they are the same on every process and run."""
    gen = torch.Generator().manual_seed(config["seed"] + 1000)
    calib = [get_batch(train, config["batch_size"], block_size, gen)[0] for _ in range(config["calib_batches"])]
    return calib, get_batch(train, config["kd_batch_size"], block_size, gen)[0]


_PLANS = {}   # bits_plan's plans of this process, by teacher and budget


def bits_plan(teacher, config, calib, extra_bits, log=None):
    """config["bits"] everywhere, or with extra_bits > 0 lcd.allocate_bits' bits by layer, extra_bits bits per
    weight above the b-bit model (computed once a run: every variant with the same budget shares it)."""
    if not extra_bits:
        return config["bits"]
    key = (id(teacher), config["bits"], extra_bits, config["group_size"], config["lcd_init"])
    if key not in _PLANS:
        _PLANS[key] = lcd.allocate_bits(teacher, calib, config["bits"], extra_bits,
                                        config["group_size"], init=config["lcd_init"], log=log)[0]
    return _PLANS[key]


def block_calibration(train, config, T, calib):
    """What block-wise reconstruction fits on: with block_seqs, that many distinct whole windows of the
    distillation data (drawn without replacement, aligned to its block_size windows: the teacher's sequences
    and the plays' windows of the mix stay whole), in batches of `batch_size`; else the calibration batches."""
    if not config["block_seqs"]:
        return calib
    n = len(train) // T
    if config["block_seqs"] > n:
        raise ValueError(f"--block_seqs={config['block_seqs']}: the distillation data holds {n} windows of {T} tokens; "
                         "give at most that many, or more text (--teacher_text_seqs)")
    gen = torch.Generator().manual_seed(config["seed"] + 4000)
    picks = torch.randperm(n, generator=gen)[:config["block_seqs"]].sort().values.tolist()
    x = torch.from_numpy(np.stack([np.asarray(train[i * T:(i + 1) * T]) for i in picks]).astype(np.int64))
    return list(x.split(config["batch_size"]))


def student_for(method, teacher, config, calib, log=None):
    """The trainable student of a distillation run. 'kd': plain KD, k-means init at 2^bits, no extras;
    'lcd': density init, progressive, smoothing (with a_bits), bits where the error is (extra_bits), the
    compensated start (compensate); the ablation variants (ablations()) flip one."""
    c = lcd_settings(method, config)
    bits = bits_plan(teacher, config, calib, c["extra_bits"], log)        # an int, or a dict of them by layer
    return lcd.prepare_student(teacher, bits, config["group_size"], calib,
                               progressive_p=c["progressive_p"], init=c["init"], weighted=c["weighted"],
                               smoothing=c["smoothing"], a_bits=config["a_bits"], log=log,
                               start=baselines.gptq_cluster if c["compensate"] else None)


def lcd_settings(method, config):
    """Which of LCD's pieces are on for a distillation run (the ablation turns one off at a time)."""
    if method == "kd":   # the same distillation (kd_mode, steps, optimizer) without LCD's own pieces
        return dict(init="kmeans++", weighted=False, progressive_p=0, speculative_every=0, smoothing=False,
                    kd_mode=config["kd_mode"], compensate=False, extra_bits=0.0)
    c = dict(init=config["lcd_init"], weighted=True, progressive_p=config["progressive_p"],
             speculative_every=config["speculative_every"], smoothing=config["smoothing"], kd_mode=config["kd_mode"],
             compensate=bool(config["compensate"]), extra_bits=config["extra_bits"])
    return dict(c, **ablations(config).get(method, {}))


def ablations(config):
    """{variant: settings}: LCD with one piece flipped. A piece that is on is switched off (lcd-no-*); a piece
    whose default is off (set so by measurement) is switched on (lcd+*), so every piece shows its effect."""
    variants = {"lcd-no-density": dict(init="kmeans++")}
    if config["progressive_p"]:
        variants["lcd-no-progressive"] = dict(progressive_p=0)
    else:   # progressive merges need one codebook size: with bits by layer, this variant has b bits everywhere
        variants["lcd+progressive"] = dict(progressive_p=1, extra_bits=0.0)
    if config["speculative_every"]:
        variants["lcd-no-speculative"] = dict(speculative_every=0)
    else:
        variants["lcd+speculative"] = dict(speculative_every=25)
    if config["a_bits"] is not None:   # smoothing acts only on quantized activations
        variants["lcd-no-smoothing" if config["smoothing"] else "lcd+smoothing"] = dict(
            smoothing=not config["smoothing"])
    variants["lcd-no-compensate" if config["compensate"] else "lcd+compensate"] = dict(
        compensate=not config["compensate"])
    if config["extra_bits"]:          # the same bits everywhere (fewer bits per weight: the report says how many)
        variants["lcd-uniform-bits"] = dict(extra_bits=0.0)
    elif config["bits"] < 4 and not config["progressive_p"]:
        variants["lcd+extra-bits"] = dict(extra_bits=0.15)
    if config["kd_mode"] == "blocks":  # end-to-end KD alone, as many steps as fit in LCD's wall time (quantize_and_distill)
        variants["lcd-e2e"] = dict(kd_mode="e2e")
    else:
        variants["lcd+blocks"] = dict(kd_mode="blocks")
    return variants


DISTILL_KEYS = ("bits", "group_size", "a_bits", "calib_batches", "kd_steps", "kd_batch_size", "kd_lr",
                "kd_latent_lr", "kd_other_lr", "kd_tau", "kd_ce", "kd_warmup", "kd_train_norms", "lcd_init", "compensate",
                "progressive_p", "final_frac", "speculative_every", "reassign_every", "smoothing", "seed",
                "kd_mode", "block_steps", "block_batch_size", "block_size", "batch_size", "distill_data",
                "teacher_text_seqs", "teacher_text_seed", "block_seqs", "extra_bits", "block_loss", "block_lr",
                "block_latent_lr")


def model_digest(model):
    """A short sha256 of the model's weights: a resumed distillation must have the same teacher."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


RESUME_MAY_CHANGE = ("kd_lr", "kd_latent_lr", "kd_other_lr", "block_lr", "block_latent_lr")  # a diverged run resumes with lower rates


def check_fingerprint(stored, wanted, path, method):
    """Refuse a distillation checkpoint of another run (bits, group size, method, model, ...), naming every
    key that differs with both values; the learning rates may change (a resume after Diverged lowers them)."""
    stored = stored if isinstance(stored, dict) else {}
    differ = [k for k in wanted if k not in RESUME_MAY_CHANGE and stored.get(k) != wanted[k]]
    if differ:
        shown = "; ".join(f"{k}: {stored.get(k)!r} in the checkpoint, {wanted[k]!r} now" for k in differ[:6])
        raise RuntimeError(f"{path} was written by a {method} run with another configuration ({shown}): resume "
                           "with those settings, or delete it (or use another --out_dir) to start afresh")
    for k in RESUME_MAY_CHANGE:
        if k in wanted and stored.get(k) != wanted[k]:
            print(f"{method}: resuming with --{k}={wanted[k]} (the checkpoint was written at {stored.get(k)})")


def run_distillation(method, teacher, config, train, calib, calib_x, rank, world, device):
    """Distill one student (resuming from out_dir/distill_<method>_<tag>.pt); returns it frozen, its
    history, the seconds it took (the student's preparation included) and the checkpoint's path.
    kd_mode 'blocks': lcd.reconstruct_blocks on the calibration sequences first (checkpointed after every
    block), then kd_steps of end-to-end distillation; 'e2e': the latter alone."""
    settings = lcd_settings(method, config)
    log = print if rank == 0 else None
    t0 = time.time()
    student = student_for(method, teacher, config, calib, log=log)
    T = context_length(config, teacher)
    gen = torch.Generator().manual_seed(config["seed"] + 2000 + rank)  # KD and LCD see the same batches
    path = os.path.join(config["out_dir"], f"distill_{method}_{run_tag(config)}.pt")
    fingerprint = dict({k: config[k] for k in DISTILL_KEYS}, teacher=model_digest(teacher), kd_mode=settings["kd_mode"],
                       method=method)
    ckpt = {}
    if os.path.exists(path):
        ckpt = load_checkpoint(path, ("rng", "config"), f"delete it to restart the {method} distillation")
        check_fingerprint(ckpt.get("config"), fingerprint, path, method)
        gen.set_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        if rank == 0:
            where = f"step {ckpt['state']['step']}" if ckpt.get("state") else f"block {ckpt['blocks']['block']}"
            print(f"{method}: resuming distillation from {path} at {where}")
    state, saved = ckpt.get("state"), dict(ckpt)     # saved: what the checkpoint on disk holds

    def save(**parts):
        rng = sampler_states(gen, world)
        if rank == 0:
            atomic_save(dict(rng=rng, config=fingerprint, **parts), path)
        saved.update(parts)

    blocks_history, blocks_seconds = None, 0.0
    rates = ("block_lr", "block_latent_lr")    # the flags a divergence names: the stage's own rates
    try:
        if settings["kd_mode"] == "blocks" and state is None:      # stage 6a: one block at a time
            n_blocks = len(lcd.find_blocks(teacher)[1])
            progress = Progress(f"{method} blocks", n_blocks * config["block_steps"],
                                config["block_batch_size"] * T * world, enabled=rank == 0,
                                log_interval=config["log_interval"])
            t_blocks = time.time()
            student, blocks_history = lcd.reconstruct_blocks(
                teacher, student, block_calibration(train, config, T, calib), config["block_steps"],
                batch_size=config["block_batch_size"],
                lr=config["block_lr"], latent_lr=config["block_latent_lr"], other_lr=config["kd_other_lr"],
                train_norms=config["kd_train_norms"], reassign_every=config["reassign_every"], ddp=world > 1,
                state=ckpt.get("blocks"), checkpoint=lambda blocks: save(blocks=blocks), log=log,
                on_step=progress.update, loss=config["block_loss"])
            blocks_seconds = time.time() - t_blocks
        rates = ("kd_lr", "kd_latent_lr")
        progress = Progress(method, config["kd_steps"], config["kd_batch_size"] * T * world, enabled=rank == 0,
                            start=state["step"] if state else 0, log_interval=config["log_interval"])
        t_e2e = time.time()
        student, history = lcd.distill(
            teacher, student, batch_stream(train, config["kd_batch_size"], T, gen, device), config["kd_steps"],
            calib_x=calib_x, bits=config["bits"], tau=config["kd_tau"], ce_weight=config["kd_ce"],
            lr=config["kd_lr"], latent_lr=config["kd_latent_lr"], other_lr=config["kd_other_lr"],
            warmup=config["kd_warmup"], final_frac=config["final_frac"], train_norms=config["kd_train_norms"],
            speculative_every=settings["speculative_every"], reassign_every=config["reassign_every"],
            ddp=world > 1, state=state, checkpoint=lambda distill_state: save(state=distill_state),
            checkpoint_every=config["kd_ckpt_interval"], log=log, on_step=progress.update)
    except lcd.Diverged as e:
        if saved.get("state"):
            kept = f"{path} (step {saved['state']['step']}) is kept"
        elif saved.get("blocks"):
            kept = f"{path} (block {saved['blocks']['block']} done) is kept"
        else:
            kept = "no checkpoint was written yet"
        lower = " and ".join(f"--{k} (now {config[k]})" for k in rates)
        raise lcd.Diverged(f"{e}\n{method}: {kept}; the same command with a lower {lower}, e.g. ten times lower, "
                           "resumes from it") from None
    except KeyboardInterrupt:
        if saved.get("state"):
            where = f"{method}'s distillation progress is saved in {path} (step {saved['state']['step']} of " \
                    f"{config['kd_steps']})"
        elif saved.get("blocks"):
            where = f"{method}'s block-wise progress is saved in {path} (block {saved['blocks']['block']} done)"
        else:
            where = (f"no {method} distillation checkpoint was written yet (one comes every "
                     f"{config['kd_ckpt_interval']} steps, and after every block)")
        raise Interrupted(f"{where}; run the same command to resume") from None
    history.update(blocks=blocks_history, blocks_seconds=blocks_seconds, e2e_seconds=time.time() - t_e2e)
    if rank == 0 and history["spec_checks"]:
        print(f"{method}: speculative wins {history['spec_wins']} over {history['spec_checks']} checks")
    return lcd.freeze(student), history, time.time() - t0, path


def print_table(rows, title):
    """The report's table: per row the loss and perplexity on the held-out plays and, when measured, on
    general English, each also as a multiple of the teacher's perplexity (x teacher); then the loss on the
    tuning split (tuning_tokens), where there is one."""
    print(f"\n{title}")
    delta = any("delta_vs_lcd" in r for r in rows)
    general = any("general_ppl" in r for r in rows)
    tune = any("tune_loss" in r for r in rows)
    teacher = next((r for r in rows if r["method"] == "teacher"), None)

    def times(r, key):
        return f"{r[key] / teacher[key]:>9.3f}" if teacher and teacher.get(key) else f"{'':>9}"
    print(f"{'method':<20} {'bits':>4} {'bits/w':>7} {'val_loss':>9} {'ppl':>9} {'x teacher':>9}"
          + (f" {'gen_loss':>9} {'gen_ppl':>9} {'x teacher':>9}" if general else "")
          + (f" {'tune_loss':>9}" if tune else "") + f" {'bytes':>11} {'seconds':>8}" + (f" {'delta':>8}" if delta else ""))
    for r in rows:
        print(f"{r['method']:<20} {r['bits']:>4} {r['bits_per_weight']:>7.3f} {r['val_loss']:>9.4f} "
              f"{r['ppl']:>9.3f} {times(r, 'ppl')}"
              + (f" {r['general_loss']:>9.4f} {r['general_ppl']:>9.3f} {times(r, 'general_ppl')}"
                 if general and "general_ppl" in r else "")
              + (f" {r['tune_loss']:>9.4f}" if tune and "tune_loss" in r else (f" {'':>9}" if tune else ""))
              + f" {r['bytes']:>11} {r['seconds']:>8.1f}"
              + (f" {r['delta_vs_lcd']:>+8.4f}" if delta and r.get("delta_vs_lcd") is not None else ""))


def run_tag(config):
    """The name of a run's outputs: w<bits>, then _g<group_size> and _a<a_bits> when set (lcd_w2_g64.pt)."""
    tag = f"w{config['bits']}"
    if config.get("group_size") is not None:
        tag += f"_g{config['group_size']}"
    if config.get("a_bits") is not None:
        tag += f"_a{config['a_bits']}"
    return tag


def replaced(path):
    """' (replaced an earlier one)' when `path` exists: a later run says what it overwrites."""
    return " (replaced an earlier one)" if os.path.exists(path) else ""


def get_tokenizer(name):
    """data/prepare.py's tokenizer `name` ('bytes' or 'gpt2'): a tiktoken Encoding."""
    return prepare_module().get_tokenizer(name)


def load_student(path, device="cpu", teacher_path=None):
    """(model, tokenizer name) of a packed student file (packed_model.save_quantized), built from the model
    configuration in its header. A file written before headers held it needs `teacher_path`: the
    teacher.pt whose architecture it was quantized from."""
    header = packed_model.quantized_header(path)
    tokenizer = header.get("tokenizer")
    if "model_config" in header or teacher_path is None:
        model = packed_model.load_quantized(from_config, path)   # a clear error when the header holds no model_config
    else:
        ckpt = load_checkpoint(teacher_path)
        model = packed_model.load_quantized(GPT(ckpt["model_config"]), path)
        tokenizer = tokenizer or (ckpt.get("data") or {}).get("tokenizer")
    if tokenizer is None:   # neither file names it: the two tokenizers have different vocabulary sizes
        vocab = model.config.vocab_size
        tokenizer = "bytes" if vocab == 256 else "gpt2"
        print(f"note: {path} names no tokenizer; a vocabulary of {vocab} suggests {tokenizer!r}")
    return model.to(device).eval(), tokenizer


def decode_safely(enc, ids):
    """(text, unknown ids) of token ids: an id the tokenizer has no entry for (a model with a larger
    vocabulary than its tokenizer) becomes U+FFFD and is listed, instead of tiktoken's KeyError."""
    parts, unknown = [], []
    for i in ids:
        try:
            parts.append(enc.decode_single_token_bytes(i))
        except (KeyError, ValueError, OverflowError):
            parts.append("\ufffd".encode())
            unknown.append(i)
    return b"".join(parts).decode("utf-8", errors="replace"), unknown


@torch.no_grad()
def sample_texts(models, tokenizer, prompt, max_new_tokens, temperature=1.0, top_k=0, seed=0, log=print):
    """Each model's continuation of `prompt`, all from the same seed, printed one after the other, labelled.
    models: {label: model with .generate(idx (1, T), n, temperature, top_k)}; tokenizer: a name for
    get_tokenizer; top_k 0: all tokens. Only generate() is timed, after a one-token warm-up.
    Returns {label: dict(text, tokens, seconds, tokens_per_s)}; ValueError for an empty prompt or one whose
    token ids lie outside a model's vocabulary."""
    enc = get_tokenizer(tokenizer)
    ids = enc.encode_ordinary(prompt)
    if not ids:
        raise ValueError("the prompt is empty: give at least one character to continue")
    samples = {}
    log(f"\ntext sample: {max_new_tokens} tokens after the prompt, seed {seed}, temperature {temperature}, "
        f"top-k {top_k or 'off'}\n--- prompt ---\n{prompt}")
    for label, model in models.items():
        vocab = model.config.vocab_size
        if max(ids) >= vocab:
            raise ValueError(f"the prompt's {tokenizer!r} token id {max(ids)} is outside the vocabulary of "
                             f"{vocab} of {label}: the model was trained on another tokenizer")
        device = next(model.parameters()).device
        idx = torch.tensor([ids], dtype=torch.long, device=device)                        # (1, T)
        model.generate(idx, 1)        # untimed warm-up: a first call pays for allocations and thread start-up
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k or None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        text, unknown = decode_safely(enc, out[0, len(ids):].tolist())
        if unknown:
            log(f"note: {label} wrote {len(unknown)} token id(s) the {tokenizer!r} tokenizer has no entry for "
                f"(first {unknown[0]}; the tokenizer has {enc.n_vocab} ids, the model {vocab}), shown as U+FFFD: "
                "the model and the tokenizer do not match")
        samples[label] = dict(text=text, tokens=max_new_tokens, seconds=seconds,
                              tokens_per_s=max_new_tokens / max(seconds, 1e-9))
        log(f"--- {label}: {samples[label]['tokens_per_s']:.1f} tokens/s ---\n{text}")
    return samples


def post_training_rows(config, teacher, calib, sets):
    """Stage 4 (rank 0): the --ptq rows - RTN, k-means, LCD's density init, GPTQ, ... - quantized from the
    calibration statistics alone, no training; each evaluated on the held-out tokens."""
    t_stage, b, rows = time.time(), config["bits"], []
    rows_at_b = {row[0]: row for row in baselines.quality_rows(b)}
    for name in ptq_names(config):
        if name not in rows_at_b:
            print(f"{name}: no such row at {b} bits, skipped")
            continue
        _, method, group, kw = rows_at_b[name]
        t0 = time.time()
        quantized = baselines.quantize(copy.deepcopy(teacher), b, group or config["group_size"], calib,
                                       method=method, **kw)
        if config["a_bits"] is not None:
            for layer in quantized.modules():
                if isinstance(layer, packed_model.LUTLinear):
                    layer.a_bits = config["a_bits"]
        rows.append(result_row(name, quantized, config, sets, time.time() - t0))
        print(f"{name}: val loss {rows[-1]['val_loss']:.4f} ({rows[-1]['seconds']:.1f} s to quantize)")
    print(f"post-training rows: {time.time() - t_stage:.0f} s, evaluations included; peak memory "
          f"{peak_memory_gib(reset=True):.2f} GiB")
    return rows


def e2e_steps_in_lcd_time(config, timings, world):
    """lcd-e2e's step count: LCD's end-to-end steps plus as many as its block-wise time would have paid for
    (rank 0's clock, broadcast, so that every rank runs the same steps)."""
    blocks_seconds, e2e_seconds = timings["lcd"]
    steps = [config["kd_steps"] + round(blocks_seconds / (e2e_seconds / config["kd_steps"]))]
    if world > 1:
        dist.broadcast_object_list(steps, src=0)
    return steps[0]


def distillation_rows(config, teacher, train, calib, calib_x, sets, rank, world, device):
    """Stages 5-6: plain KD, then LCD, on the same batches with the same budget; with --ablate, LCD with
    each piece switched off. Returns (rows, ablation rows, curves, the frozen LCD student or None, the
    resume files that served); the rows are rank 0's (the other ranks' lists stay empty)."""
    rows, ablation, curves, timings, resume_files, lcd_student = [], [], {}, {}, [], None
    methods = ["kd", "lcd"] + (list(ablations(config)) if config["ablate"] else [])
    last = {"baselines": 0, "kd": 1, "lcd": 2}.get(config["stop_after"], len(methods))
    if not (config["kd_baseline"] or config["ablate"]):   # the baseline row off: LCD alone (and what follows it)
        methods, last = methods[1:], max(0, last - 1)
    for method in methods[:last]:
        run_config = config
        if method == "lcd-e2e":    # end-to-end KD alone in LCD's wall time
            run_config = dict(config, kd_steps=e2e_steps_in_lcd_time(config, timings, world))
            if rank == 0:
                print(f"lcd-e2e: {run_config['kd_steps']} end-to-end steps, the wall time of lcd's blocks + "
                      f"{config['kd_steps']} steps")
        student, history, seconds, path = run_distillation(method, teacher, run_config, train, calib, calib_x,
                                                           rank, world, device)
        resume_files.append(path)
        timings[method] = (history["blocks_seconds"], history["e2e_seconds"])
        lcd_student = student if method == "lcd" else lcd_student
        if rank != 0:
            continue
        row = result_row(method, student, config, sets, seconds)
        print(f"{method}: {scores_text(row)}; {seconds:.0f} s (block-wise "
              f"{history['blocks_seconds']:.0f} s, end-to-end {history['e2e_seconds']:.0f} s); "
              f"peak memory {peak_memory_gib(reset=True):.2f} GiB")
        curves[method] = {k: history[k] for k in ("loss", "stages", "spec_wins", "spec_checks", "blocks",
                                                  "blocks_seconds", "e2e_seconds")}
        (rows if method in ("kd", "lcd") else ablation).append(row)
    if config["ablate"] and rank == 0 and last > 2:
        t0 = time.time()   # KD off: LCD's initialization at 2^bits, frozen without training
        no_kd = lcd.freeze(student_for("lcd-no-kd", teacher, dict(config, progressive_p=0), calib))
        ablation.append(result_row("lcd-no-kd", no_kd, config, sets, time.time() - t0))
    return rows, ablation, curves, lcd_student, resume_files


def save_packed_student(config, student, teacher, meta):
    """Stage 7a: out_dir/lcd_<tag>.pt, the packed student with its model configuration and tokenizer in the
    header, so that it loads by itself (load_student, bench.py --generate). Returns its path."""
    path = os.path.join(config["out_dir"], f"lcd_{run_tag(config)}.pt")
    note = replaced(path)
    packed_model.save_quantized(student, path, model_config=config_dict(teacher), tokenizer=meta["tokenizer"])
    print(f"wrote {path}{note}")
    return path


# The report's chat questions (a fact, a list, a line of code, a sum): a chat model, quantized, should still
# answer them as its teacher does; the teacher and the packed student answer each greedily, side by side.
CHAT_QUESTIONS = ("What is the capital of France?", "Give me three tips for staying healthy.",
                  "Write a Python function that returns the square of a number.", "What is 12 + 7?")
LOOP_NGRAM, LOOP_REPEATS = 3, 3   # an answer loops when some run of 3 words comes 3 times or more (or see loops)


def loops(text, n=LOOP_NGRAM, repeats=LOOP_REPEATS):
    """Whether `text` goes round in a loop: some run of n words occurs `repeats` times or more, or a piece of
    up to 8 characters stands 10 times or more back to back ("2222222222", "+12 +12 +12 ...")."""
    if re.search(r"(.{1,8}?)\1{9,}", text, re.S):
        return True
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return any(grams.count(g) >= repeats for g in set(grams))


@torch.no_grad()
def chat_answers(models, tokenizer, questions=CHAT_QUESTIONS, max_new_tokens=48, log=print):
    """Each model's greedy answer to each question in the tokenizer's chat template (checkpoints.chat_prompt),
    cut at the end of its turn. Returns [{question, answers: {label: dict(text, loops)}}]; printed side by
    side, an answer that loops flagged."""
    enc = get_tokenizer(tokenizer)
    chat = checkpoints.chat_of(enc)        # ValueError saying why, before any answer: no template, or not ChatML
    ends = {enc.encode_single_token(t) for t in (chat["end"], "<|endoftext|>") if t in enc.special_tokens_set}
    results = []
    log(f"\nchat: greedy answers in the model's chat template (ChatML), at most {max_new_tokens} tokens each")
    for question in questions:
        ids = checkpoints.chat_ids(enc, [{"role": "user", "content": question}])   # the question stays text
        answers = {}
        log(f"--- {question}")
        for label, model in models.items():
            idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)   # (1, T)
            new = model.generate(idx, max_new_tokens, temperature=0)[0, len(ids):].tolist()
            new = new[:next((i for i, t in enumerate(new) if t in ends), len(new))]   # the end of its turn
            text = enc.decode(new).strip()
            answers[label] = dict(text=text, loops=loops(text))
            log(f"  {label}{' [LOOPS]' if answers[label]['loops'] else ''}: {text!r}")
        results.append(dict(question=question, answers=answers))
    return results


def report_chat(models, tokenizer, max_new_tokens, log=print):
    """The report's chat answers (chat_answers) for a chat model; None for a model without a chat template,
    and for one whose template this reader cannot follow (not ChatML), after one line saying why: the rest
    of the report does not depend on chat."""
    enc = get_tokenizer(tokenizer)
    if getattr(enc, "chat", None) is None:
        if getattr(enc, "chat_refusal", None):
            log(f"chat: skipped: {enc.chat_refusal}")
        return None
    return chat_answers(models, tokenizer, max_new_tokens=max_new_tokens, log=log)


def write_report(config, teacher, meta, rows, ablation, curves, packed_path, device):
    """Stage 7b (rank 0): the table, the ablation, the text sample of the teacher and of the packed student
    loaded back from its file, their chat answers (a chat model), and out_dir/results_<tag>.json with its
    copy out_dir/results.json."""
    b, out, tag = config["bits"], config["out_dir"], run_tag(config)
    steps = (f"{config['block_steps']} block-wise steps a block + " if config["kd_mode"] == "blocks" else "") \
        + f"{config['kd_steps']} end-to-end distillation steps"
    print_table(rows, f"LCD report: b={b}, group_size={config['group_size']}, a_bits={config['a_bits']}, {steps}")
    results = dict(rows=rows, config=config, curves=curves)
    if config["ablate"]:
        lcd_row = next((r for r in rows if r["method"] == "lcd"), None)
        for r in ablation:
            r["delta_vs_lcd"] = r["val_loss"] - lcd_row["val_loss"] if lcd_row else None
        print_table(ablation, "ablation: LCD with one piece switched off (delta = what that piece buys)")
        results["ablation"] = ablation
    packed = load_student(packed_path, device)[0] if packed_path else None   # as a user would load it
    models = {"teacher": teacher, f"packed {b}-bit student {packed_path}": packed}
    if packed is not None and config["sample_tokens"] > 0:
        results["sample"] = dict(prompt=config["sample_prompt"], seed=config["seed"], texts=sample_texts(
            models, meta["tokenizer"], config["sample_prompt"], config["sample_tokens"],
            config["sample_temperature"], config["sample_top_k"], config["seed"]))
    if packed is not None and config["chat_tokens"] > 0:
        answers = report_chat(models, meta["tokenizer"], config["chat_tokens"])
        if answers is not None:
            results["chat"] = answers
    for path in (os.path.join(out, f"results_{tag}.json"), os.path.join(out, "results.json")):
        note = replaced(path)
        write_json(results, path)
        print(f"wrote {path}{note}" + (" (a copy: the latest run, read by bench.py --figures)"
                                        if path.endswith("results.json") else ""))


def quantize_and_distill(config, teacher, meta, teacher_row, rank=0, world=1, device="cpu"):
    """Stages 3-7. Writes out_dir/lcd_<tag>.pt (packed student), out_dir/results_<tag>.json and its copy
    out_dir/results.json, the latest run (rank 0); tag: run_tag()."""
    sets = held_out_sets(config, meta)
    train = distillation_tokens(config, teacher, meta, load_tokens(meta["dir"], "train"), rank, world)
    if config["init_from"] != "scratch" or config["distill_data"] != "plays":   # a pretrained or text-writing teacher
        tune = tuning_tokens(config, teacher, meta, rank)          # settings are chosen on it, not on `sets`
        sets = dict(sets, tune=tune)
        teacher_row = dict(teacher_row, **evaluate_sets(teacher, {"tune": tune}, config))
    calib, calib_x = calibration_data(train, config, context_length(config, teacher))          # stage 3
    rows = [teacher_row]
    if rank == 0:
        rows += post_training_rows(config, teacher, calib, sets)                                 # stage 4
    kd_rows, ablation, curves, student, resume_files = distillation_rows(                       # stages 5-6
        config, teacher, train, calib, calib_x, sets, rank, world, device)
    if rank == 0:                                                                                # stage 7
        packed_path = save_packed_student(config, student, teacher, meta) if student is not None else None
        write_report(config, teacher, meta, rows + kd_rows, ablation, curves, packed_path, device)
        for path in resume_files:   # the run is complete: its distillation checkpoints have served
            if os.path.exists(path):
                os.remove(path)
    # the other ranks' work ends with the distillation: they do not wait for rank 0's report (no collective)


def write_json(obj, path):
    """json.dump, atomically (packed_model.atomic_write): an error midway leaves the previous file as it was."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    packed_model.atomic_write(path, write)


# -----------------------------------------------------------------------------------------------
# The pipeline

STAGES = ("", "teacher", "baselines", "kd", "lcd")  # values of --stop_after ('' runs everything)


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return
    try:
        config = parse_config(argv)
        check_outputs(config)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    try:
        run(config)
    except KeyboardInterrupt as e:   # Ctrl-C: the stages say where their progress is saved (Interrupted)
        if isinstance(e, Interrupted):
            raise
        raise Interrupted(f"the stage under way saves nothing; what is done is in {config['out_dir']}/ and the "
                          "same command goes on from there") from None


def check_outputs(config):
    """Every place this run writes, checked writable before any work (an OSError naming the flag and the
    directory otherwise): --out_dir (checkpoints, the teacher, the packed student, the report) and, when
    the dataset is still to be prepared, its data directory. A run must not train for an hour and then
    lose it at the first save."""
    packed_model.check_writable(config["out_dir"], f"--out_dir={config['out_dir']}")
    dataset = config["dataset"]
    data_dir = dataset if os.path.isabs(dataset) else os.path.join(DATA_ROOT, dataset)
    if (not os.path.exists(os.path.join(data_dir, "meta.json"))
            and dataset in ("shakespeare", f"shakespeare_{config['tokenizer']}")):    # ensure_data prepares it
        packed_model.check_writable(data_dir, f"--dataset={dataset} (to be prepared)")


def data_stage(config, rank, world):
    """Stage 1: the dataset's meta.json (data/prepare.py writes it and the general-English evaluation set on
    first use). Every rank asks for both: the first prepares each, the others wait for its lock, never at
    a collective (ensure_data)."""
    log = print if rank == 0 else (lambda line: print(f"rank {rank}: {line}"))
    meta = ensure_data(config["dataset"], config["tokenizer"], log)
    held_out_sets(config, meta)                                                  # the general set too
    return meta


def check_config_against_data(config, meta, block_size):
    """The flags whose bounds the data sets, checked once the dataset is there and before the teacher trains
    (ValueError naming the flag, the bound and what to do): windows of block_size + 1 tokens must fit in the
    train split and every held-out set; the sample prompt must be spelled by the tokenizer in ids of the
    vocabulary; a chat model's opening of the teacher's text (distill_data teacher or mix) must leave room
    in a window for the teacher to write."""
    sets = held_out_sets(config, meta)
    if not meta.get("eval_only"):
        sets["train"] = load_tokens(meta["dir"], "train")
    for name, tokens in sets.items():
        if block_size is not None and len(tokens) <= block_size:    # None: a pretrained model's own context
            what = "the general-English set" if name == "general" else f"the {name} split of --dataset={config['dataset']}"
            raise ValueError(f"--block_size={block_size}: {what} holds {len(tokens)} tokens, fewer than one window "
                             f"of block_size + 1: give a --block_size below {len(tokens)}, or prepare more text")
    enc = get_tokenizer(meta["tokenizer"])
    if config["sample_tokens"] > 0:
        try:
            ids = enc.encode_ordinary(config["sample_prompt"])
        except ValueError as e:
            raise ValueError(f"--sample_prompt: {e}") from None
        if max(ids) >= meta["vocab_size"]:
            raise ValueError(f"--sample_prompt: token id {max(ids)} is outside the vocabulary of {meta['vocab_size']}")
    if config["distill_data"] != "plays" and getattr(enc, "chat", None) is not None:
        opening = len(checkpoints.chat_ids(enc, [{"role": "user", "content": ""}], answer=False))
        if block_size is not None and opening >= block_size:
            raise ValueError(f"--block_size={block_size} with --distill_data={config['distill_data']}: the chat "
                             f"template's opening of the teacher's text takes {opening} tokens, leaving the teacher "
                             f"nothing to write: give a --block_size above {opening}, or --distill_data=plays")
    if config["kd_mode"] == "blocks" and config["block_seqs"] and block_size is not None:
        available = {"teacher": config["teacher_text_seqs"], "mix": 2 * config["teacher_text_seqs"]}.get(
            config["distill_data"], len(sets.get("train", ())) // block_size)
        if config["block_seqs"] > available:
            raise ValueError(f"--block_seqs={config['block_seqs']}: --distill_data={config['distill_data']} holds "
                             f"{available} whole windows of {block_size} tokens: give --block_seqs <= {available}, or "
                             "more of the teacher's text (--teacher_text_seqs)")


def teacher_stage(config, meta, rank, world, device):
    """Stage 2: the full-precision teacher - pretrained (--init_from), loaded from out_dir/teacher.pt, or
    trained and saved there - and its report row (rank 0 evaluates it)."""
    t_teacher = time.time()
    teacher_path = os.path.join(config["out_dir"], "teacher.pt")
    log = print if rank == 0 else None
    if config["init_from"] != "scratch":
        teacher = load_pretrained_teacher(config["init_from"], meta, log=log).to(device)
    elif os.path.exists(teacher_path):
        teacher = load_teacher(teacher_path, device, teacher_data(config, meta), log=log)
        if rank == 0:
            print(f"teacher: loaded {teacher_path}")
    else:
        t0 = time.time()
        teacher = train_teacher(config, meta, rank, world, device)
        if rank == 0:    # the other ranks hold the same weights (DDP): they go on without waiting for the file
            save_teacher(teacher, teacher_path, teacher_data(config, meta))
            print(f"teacher: trained in {time.time() - t0:.0f} s, saved {teacher_path}")
    teacher.eval()
    try:
        check_groups(config, teacher.config.n_embd)   # a loaded teacher's width may not be the preset's
    except ValueError as e:
        sys.exit(f"error: {e}")
    scores = {}
    if rank == 0:
        scores = evaluate_sets(teacher, held_out_sets(config, meta), config)
        print(f"teacher: {teacher.num_params() / 1e6:.2f}M parameters, {scores_text(scores)}")
    row = dict(method="teacher", bits=32, **scores, seconds=time.time() - t_teacher, **fp_footprint(teacher))
    return teacher, row


def run(config):
    """Stages 1-7 for a checked config (parse_config), in the README's order."""
    rank, world, device = setup_distributed(config["device"])
    config["device"] = device
    torch.manual_seed(config["seed"])
    t_start = time.time()
    if rank == 0:
        check_outputs(config)                                                     # before any work
    meta = data_stage(config, rank, world)                                        # 1. data
    try:               # the flags the data bounds, before the teacher trains (a pretrained one may be shorter)
        block_size = (model_config(config, 1) if config["init_from"] == "scratch" else config)["block_size"]
        check_config_against_data(config, meta, block_size)
    except ValueError as e:
        sys.exit(f"error: {e}")
    teacher, teacher_row = teacher_stage(config, meta, rank, world, device)       # 2. the teacher
    if config["stop_after"] != "teacher":                                         # 3-7: quantize, distill, report
        quantize_and_distill(config, teacher, meta, teacher_row, rank, world, device)
    if rank == 0:
        last = peak_memory_gib()
        print(f"done in {time.time() - t_start:.0f} s; peak memory {max(_PEAKS):.2f} GiB (since the last stage's "
              f"line: {last:.2f} GiB)")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)   # a log file (> run.log) shows each line as it is printed
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt as e:      # one line, not a traceback: what was saved and how to go on
        if os.environ.get("RANK", "0") == "0":
            print(f"\ninterrupted: {e}" if str(e) else "\ninterrupted", file=sys.stderr)
        sys.exit(130)

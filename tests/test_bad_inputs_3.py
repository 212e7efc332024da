"""Bad inputs from the field, round 3 (issue 30): what a user in the field ran into, each kind fixed
wherever it can happen. Messages are matched by their key words.

  2. an empty batch into a packed layer    7. user text that spells control tokens
  3. torchrun while rank 0 works alone      8. module names that shadow common packages
  4. a truncated or corrupt cache          11. a flag that passes its check, then fails later
  5. two runs filling the same cache
  6. a chat template the reader does not support
"""
import importlib.metadata
import os
import sys

import pytest
import torch
import torch.nn as nn

import baselines
import lcd
import lcd_kernels
import packed_model
from conftest import ROOT


# ---- 2. an empty batch into a packed layer ----------------------------------------------------------

def packed_layers():
    """{name: layer} of every quantized layer class, each (N=24, K=32): LUTLinear at 2 and 3 bits with
    and without outliers or groups, GridLinear, the baselines' layers, lcd.LCDLinear and Q8Linear."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(32, 24)
    W = linear.weight.detach()
    X = torch.randn(64, 32, generator=g)
    stats = dict(h=X.pow(2).mean(0), H=X.T @ X / 64, X=X)
    layers = {f"lut{b}{'-g16' if gs else ''}{'-outliers' if frac else ''}":
              lcd.quantize_linear(linear, b, gs, outlier_frac=frac)
              for b in (2, 3) for gs in (None, 16) for frac in (0.0, 0.02)}
    layers["grid (rtn)"] = lcd.quantize_linear(linear, 2, method="rtn")
    layers["gptq"] = baselines.gptq(W, stats, 2, bias=linear.bias)
    layers["claq"] = baselines.claq(W, stats, 2, bias=linear.bias)
    layers["lcq"] = baselines.lcq(W, stats, 2, steps=2)
    layers["lbllm-w2a4"] = baselines.lbllm(W, stats, 2, steps=2, act_steps=2)
    c = lcd.cluster(W, torch.ones(32), 4)
    layers["lcd (distilled)"] = lcd.LCDLinear(W, c["codebook"], c["idx"], None, bias=linear.bias)
    layers["q8 head"] = packed_model.Q8Linear.from_linear(linear)
    return layers


@pytest.fixture(scope="module")
def every_layer():
    return packed_layers()


@pytest.mark.parametrize("c_kernels", [False, True])
@pytest.mark.parametrize("shape", [(0, 32), (3, 0, 32), (0, 5, 32)])
def test_an_empty_batch_gives_an_empty_result_on_every_path(every_layer, monkeypatch, c_kernels, shape):
    # the reference path (no C kernels) took the partial-sum tables for 0 rows: "Expected i < index_size"
    monkeypatch.setattr(lcd_kernels, "CPU_KERNELS", c_kernels)
    torch.set_num_threads(2)
    for name, layer in every_layer.items():
        for grad in (False, True):
            x = torch.randn(*shape, requires_grad=grad)
            with torch.set_grad_enabled(grad):
                y = layer(x)
            assert y.shape == (*shape[:-1], 24), (name, grad, y.shape)
            full = layer(torch.randn(2, 32))                         # the same layer still serves rows
            assert full.shape == (2, 24) and torch.isfinite(full).all(), name


def test_one_row_still_takes_the_partial_sum_tables():
    layer = packed_layers()["lut2"]
    assert layer.partial_sums_apply(torch.randn(1, 32))
    assert not layer.partial_sums_apply(torch.randn(0, 32))          # nothing to look up: blocked_forward


# ---- 8. module names that shadow common packages ----------------------------------------------------

# Import names that users of an LLM project commonly hold (installed, or as their own top-level package):
# a project module of one of these names, first on sys.path, hides it from everything imported after it
# (kernels.py hid Hugging Face's `kernels`, which transformers 5 imports).
COMMON_PACKAGES = {
    "transformers", "kernels", "datasets", "tokenizers", "accelerate", "safetensors", "evaluate", "peft", "trl",
    "huggingface_hub", "diffusers", "optimum", "bitsandbytes", "sentencepiece", "einops", "triton", "xformers",
    "flash_attn", "vllm", "deepspeed", "gguf", "llama_cpp", "auto_gptq", "awq", "hqq", "quanto", "torchao",
    "lm_eval", "wandb", "tensorboard", "tqdm", "yaml", "numpy", "scipy", "sklearn", "pandas", "matplotlib",
    "torch", "tiktoken", "cupy", "numba", "onnx", "onnxruntime", "jax", "flax", "tensorflow", "keras", "jinja2",
    "regex", "requests", "filelock", "fsspec", "packaging", "pytest",
    # generic names that other projects' own packages take (and that a `pip install -e` puts on the path)
    "utils", "util", "tests", "test", "data", "config", "configs", "models", "common", "tools", "scripts",
    "src", "lib", "core", "helpers", "modules", "layers", "ops", "kernel", "quantization", "benchmarks",
}


def project_modules():
    """{name: path} of every module the project puts first on sys.path: the .py files and packages at the
    repository root, data/prepare.py (train_kd and the tests put data/ on the path) and the tests' own
    modules (pytest puts tests/ on the path)."""
    modules = {}
    for folder in (ROOT, os.path.join(ROOT, "data"), os.path.join(ROOT, "tests")):
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if name.endswith(".py"):
                modules[name[:-3]] = path
            elif os.path.isfile(os.path.join(path, "__init__.py")):      # a regular package
                modules[name] = path
    return modules


def shadowing(names):
    """{name: why} of the names that hide a package: a common one, an installed one, or the standard library's."""
    installed = set(importlib.metadata.packages_distributions())
    why = {}
    for name in names:
        if name in COMMON_PACKAGES:
            why[name] = "a commonly installed package"
        elif name in installed:
            why[name] = f"installed here by {importlib.metadata.packages_distributions()[name]}"
        elif name in sys.stdlib_module_names:
            why[name] = "a standard-library module"
    return why


def test_no_project_module_shadows_a_common_or_installed_package():
    modules = project_modules()
    assert {"lcd", "lcd_kernels", "prepare", "conftest", "cuda_emulation"} <= set(modules)   # it looks everywhere
    assert shadowing(["kernels", "numpy", "json", "lcd_kernels"]) == {       # and it can fail
        "kernels": "a commonly installed package", "numpy": "a commonly installed package",
        "json": "a standard-library module"}
    found = shadowing(modules)
    assert not found, "project modules named like other packages: " + ", ".join(
        f"{modules[n]} ({why})" for n, why in found.items())

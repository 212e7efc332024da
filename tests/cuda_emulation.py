"""
Run kernels.cu on the CPU: compile it unchanged with g++ and tests/cuda_emulation.h, then launch its
kernels through ctypes with the same (name, grid, block, args) that lcd_kernels.py hands to CuPy.
Used by tests/test_kernels.py and by `python bench.py --emulate=1`. A correctness tool, not a timer.
"""

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS_CU = os.path.join(ROOT, "kernels.cu")
EMULATION_H = os.path.join(ROOT, "tests", "cuda_emulation.h")
CXX_FLAGS = ["-O1", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w"]
BUILD_DIR = os.path.join(tempfile.gettempdir(), "lcd_kernels_emulation")  # cache, keyed by a source hash


def kernel_names(source):
    """The extern "C" __global__ entry points of a .cu source, in order."""
    pattern = r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\('
    return re.findall(pattern, source)


def build(build_dir=BUILD_DIR):
    """Compile kernels.cu + one launcher per kernel into a shared library (cached); return its path."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise RuntimeError("the CPU emulation of kernels.cu needs g++ with OpenMP (apt install g++)")
    with open(KERNELS_CU) as f:
        kernels_source = f.read()
    with open(EMULATION_H) as f:
        header_source = f.read()
    names = kernel_names(kernels_source)
    if not names:
        raise RuntimeError(f"no extern \"C\" __global__ kernels found in {KERNELS_CU}")
    # kernels.cu unchanged, followed by the launchers; the header comes in through -include
    launchers = f'#include "{KERNELS_CU}"\n' + "".join(f"EMULATE_KERNEL({n})\n" for n in names)
    key = hashlib.sha256("\0".join([kernels_source, header_source, launchers, *CXX_FLAGS]).encode()).hexdigest()[:16]
    library = os.path.join(build_dir, f"kernels_{key}.so")
    if os.path.exists(library):
        return library
    os.makedirs(build_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
        source = os.path.join(tmp, "launchers.cpp")
        with open(source, "w") as f:
            f.write(launchers)
        temp_library = os.path.join(tmp, "lcd_kernels.so")
        command = [compiler, *CXX_FLAGS, "-include", EMULATION_H, source, "-o", temp_library]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"g++ failed to compile kernels.cu for the CPU:\n{' '.join(command)}\n{result.stderr}")
        os.replace(temp_library, library)   # atomic: a parallel build never sees half a library
    return library


class EmulatedKernels:
    """kernels.cu on the CPU. launch(name, grid, block, args) has the meaning of a CuPy kernel call:
    tensors (CPU, contiguous) are passed by pointer, Python ints as C int, floats as C float."""

    def __init__(self, library=None):
        self.library = ctypes.CDLL(library or build())
        with open(KERNELS_CU) as f:
            self.names = kernel_names(f.read())

    def launch(self, name, grid, block, args):
        if name not in self.names:
            raise ValueError(f"kernels.cu has no kernel {name!r}; it has {self.names}")
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        if block[1:] != (1, 1):
            raise ValueError(f"the emulation runs 1-D blocks only, got block={block}")
        values = []   # ctypes objects, kept alive for the call
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.device.type != "cpu" or not a.is_contiguous():
                    raise ValueError("emulated kernels take contiguous CPU tensors")
                values.append(ctypes.c_void_p(a.data_ptr()))
            elif isinstance(a, bool) or not isinstance(a, (int, float)):
                raise TypeError(f"kernel argument of unsupported type {type(a).__name__}")
            elif isinstance(a, int):
                values.append(ctypes.c_int(a))
            else:
                values.append(ctypes.c_float(a))
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        launcher = getattr(self.library, f"launch_{name}")
        launcher.restype = ctypes.c_int
        status = launcher(*[ctypes.c_uint(g) for g in grid], ctypes.c_uint(block[0]),
                          ctypes.c_int(len(values)), pointers)
        if status == -1:
            raise ValueError(f"bad launch of {name}: grid={grid} block={block} with {len(values)} arguments")
        if status == -2:
            raise RuntimeError(f"OpenMP would not start {block[0]} threads for one block (check OMP_THREAD_LIMIT)")

    def float_to_half_bits(self, f):
        self.library.emulated_float2half_bits.restype = ctypes.c_uint16
        return self.library.emulated_float2half_bits(ctypes.c_float(f))

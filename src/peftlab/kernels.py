"""CPU kernels that torch has no single op for, built once with the system's C++ compiler.

`compensated_adamw`: the compensated bf16 AdamW step of one tensor (optim.py states the
arithmetic) as one loop over its elements: read g, w, m, v, c (bf16), compute in fp32
registers, write w, m, v, c — 18 bytes of memory traffic per weight, no temporaries. The
random rounding bits are a hash of (stream key, element index), so any split of the loop
across threads gives the same bits; `optim._update` is the same step in torch ops and the
tests hold the two bit-identical.

The shared object is built with `-O3 -march=native` into the cache (by a hash of the source,
the flags and the CPU), loaded with ctypes, and called without the GIL from one thread per
torch thread. No compiler, or a failed build: `load()` returns None and callers use the torch
version.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
/* round to nearest even, NaN -> 0x7FC0: what torch's float -> bfloat16 conversion does */
static inline uint16_t to_bf16(float f) {
    uint32_t u = bits_of(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline uint32_t mix32(uint32_t x) {
    x = ((x >> 16) ^ x) * 0x45D9F3Bu;
    x = ((x >> 16) ^ x) * 0x45D9F3Bu;
    return (x >> 16) ^ x;
}

extern "C" void compensated_adamw(uint16_t* w, const uint16_t* g, uint16_t* m, uint16_t* v, uint16_t* c,
                                  int64_t start, int64_t stop, uint32_t key, float step_size, float inv_sqrt_bc2,
                                  float decay, float b1, float b2, float eps, float gscale) {
    const float one_b1 = 1.0f - b1, one_b2 = 1.0f - b2;
    for (int64_t i = start; i < stop; i++) {
        float g32 = from_bf16(g[i]) * gscale, w32 = from_bf16(w[i]);
        float m32 = from_bf16(m[i]) * b1 + g32 * one_b1;
        float v32 = from_bf16(v[i]) * b2 + g32 * g32 * one_b2;
        float y = from_bf16(c[i]) - decay * w32 - step_size * m32 / (sqrtf(v32) * inv_sqrt_bc2 + eps);
        uint16_t nw = to_bf16(w32 + y);
        uint32_t r = mix32((uint32_t)i + key);
        m[i] = (uint16_t)((bits_of(m32) + (r & 0xFFFFu)) >> 16);  /* stochastic: add 16 random bits, cut */
        v[i] = (uint16_t)((bits_of(v32) + (r >> 16)) >> 16);
        c[i] = to_bf16(y - (from_bf16(nw) - w32));
        w[i] = nw;
    }
}
"""
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-x", "c++"]
_lock = threading.Lock()
_loaded: dict = {}


def compiler() -> str | None:
    return next((shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)), None)


def _cache() -> Path:
    root = Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab")) / "kernels"
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:  # an unwritable home: a private folder in /tmp
        fallback = Path(tempfile.gettempdir()) / f"peftlab-kernels-{os.getuid()}"
        fallback.mkdir(mode=0o700, exist_ok=True)
        return fallback


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def load():
    """The built library (ctypes), or None where it cannot be built."""
    with _lock:
        if "lib" in _loaded:
            return _loaded["lib"]
        _loaded["lib"] = lib = _build()
        return lib


def _build():
    cxx = compiler()
    if cxx is None:
        return None
    digest = hashlib.sha256("\0".join([SOURCE, *FLAGS, cxx, _cpu()]).encode()).hexdigest()[:16]
    target = _cache() / f"peftlab_kernels-{digest}.so"
    if not target.exists():
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with tempfile.NamedTemporaryFile("w", suffix=".cpp", delete=False) as src:
            src.write(SOURCE)
        try:
            subprocess.run([cxx, *FLAGS, src.name, "-o", str(tmp)], check=True, capture_output=True, timeout=300)
            os.replace(tmp, target)  # whole or not at all: another process may be loading it
        except (OSError, subprocess.SubprocessError):
            return None
        finally:
            os.unlink(src.name)
            if tmp.exists():
                tmp.unlink()
    lib = ctypes.CDLL(str(target))
    f = lib.compensated_adamw
    f.restype = None
    f.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32] + [ctypes.c_float] * 7
    return lib


_pool: dict = {}
CHUNK = 1 << 16  # below this many weights one thread does it all


def compensated_adamw(w, g, m, v, c, key: int, step_size, inv_sqrt_bc2, decay, b1, b2, eps, gscale=1.0) -> bool:
    """Run the step on flat contiguous bf16 CPU tensors in place; False where the kernel is
    not available (no compiler) or the tensors do not qualify (the caller uses torch ops)."""
    tensors = (w, g, m, v, c)
    if not all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors):
        return False
    lib = load()
    if lib is None:
        return False
    n, ptrs = w.numel(), [t.data_ptr() for t in tensors]
    args = (ctypes.c_uint32(key), *(ctypes.c_float(float(x)) for x in (step_size, inv_sqrt_bc2, decay, b1, b2, eps, gscale)))
    threads = max(1, min(torch.get_num_threads(), n // CHUNK))
    if threads == 1:
        lib.compensated_adamw(*ptrs, 0, n, *args)
        return True
    pool = _pool.get(threads) or _pool.setdefault(threads, ThreadPoolExecutor(threads, thread_name_prefix="peftlab-kernel"))
    bounds = [n * i // threads for i in range(threads + 1)]
    for f in [pool.submit(lib.compensated_adamw, *ptrs, a, b, *args) for a, b in zip(bounds, bounds[1:])]:
        f.result()  # ctypes releases the GIL: the parts run at once
    return True

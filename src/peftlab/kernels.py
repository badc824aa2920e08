"""CPU kernels that torch has no single op for, built once with the system's C++ compiler.

`softmax_xent`: the chunked loss's (loss.py) per-row cross-entropy and its gradient, in place:
per row one pass for the max, one for Σ exp, one that overwrites the logits with softmax −
one-hot (fp32 arithmetic; bf16 rounded to nearest even as torch casts). A row stays in L2
between the passes, and no new (c, V) tensor is made. bf16 logits: AVX-512 intrinsics (without
them the compiled torch chunk is faster); fp32 logits: plain C over 16 float lanes that the
compiler vectorizes to the CPU's width, on every CPU.

`sum_squares`: Σ x² of all gradients, for clipping's total norm (one read at memory speed;
torch's norm of a bf16 tensor runs at well under half of it here). AVX-512 intrinsics where
the CPU has them, elsewhere a plain-C loop over 32 float lanes that the compiler vectorizes
(AVX2: 128M fp32 weights in 21 ms against torch's 39).

`compensated_adamw`: the compensated bf16 AdamW step of one tensor (optim.py states the
arithmetic) as one loop over its elements: read g, w, m, v, c (bf16), compute in fp32
registers, write w, m, v, c — 18 bytes of memory traffic per weight, no temporaries. The
random rounding bits are a hash of (stream key, element index), so any split of the loop
across threads gives the same bits; `optim._update` is the same step in torch ops and the
tests hold the two bit-identical.

The C++ is kernels.cpp beside this file (shipped in the wheel). It is built with `-O3
-march=native` into the cache (by a hash of the source, the flags and the CPU), loaded with
ctypes, and called without the GIL from one thread per torch thread. No compiler, or a failed
build: `load()` returns None and callers use the torch version.
"""

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
# no fused multiply-adds and no reassociation (the torch tests pin the bits); -fno-trapping-math lets
# branch-free selects vectorize (no kernel reads floating-point exception flags)
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-x", "c++"]
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
    try:
        source = SOURCE.read_text()
    except OSError:  # an install without the C++ file: the torch versions run
        return None
    if cxx is None:
        return None
    digest = hashlib.sha256("\0".join([source, *FLAGS, cxx, _cpu()]).encode()).hexdigest()[:16]
    target = _cache() / f"peftlab_kernels-{digest}.so"
    if not target.exists():
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:  # the source goes in on stdin: the bytes hashed are the bytes built
            subprocess.run([cxx, *FLAGS, "-", "-o", str(tmp)], input=source.encode(), check=True, capture_output=True,
                           timeout=300)
            os.replace(tmp, target)  # whole or not at all: another process may be loading it
        except (OSError, subprocess.SubprocessError):
            return None
        finally:
            if tmp.exists():
                tmp.unlink()
    lib = ctypes.CDLL(str(target))
    lib.compensated_adamw.restype = lib.softmax_xent.restype = lib.softmax_xent_f32.restype = None
    lib.compensated_adamw.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32] + [ctypes.c_float] * 7
    lib.softmax_xent.argtypes = lib.softmax_xent_f32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    lib.softmax_xent_vectorized.restype = ctypes.c_int
    for f in (lib.sum_squares_bf16, lib.sum_squares_f32):
        f.restype, f.argtypes = ctypes.c_double, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    return lib


_pool: dict = {}
CHUNK = 1 << 16  # below this many weights one thread does it all


def _parallel(f, n: int, min_part: int) -> list:
    """[f(start, stop), ...] over [0, n), split across torch's threads in parts of at least
    `min_part` (ctypes releases the GIL: the parts run at once)."""
    threads = max(1, min(torch.get_num_threads(), n // max(1, min_part)))
    if threads == 1:
        return [f(0, n)]
    pool = _pool.get(threads) or _pool.setdefault(threads, ThreadPoolExecutor(threads, thread_name_prefix="peftlab-kernel"))
    bounds = [n * i // threads for i in range(threads + 1)]
    return [done.result() for done in [pool.submit(f, a, b) for a, b in zip(bounds, bounds[1:])]]


def compensated_adamw(w, g, m, v, c, key: int, step_size, inv_sqrt_bc2, decay, b1, b2, eps, gscale=1.0) -> bool:
    """Run the step on flat contiguous bf16 CPU tensors in place; False where the kernel is
    not available (no compiler) or the tensors do not qualify (the caller uses torch ops)."""
    tensors = (w, g, m, v, c)
    if not all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors):
        return False
    lib = load()
    if lib is None:
        return False
    args = (ctypes.c_uint32(key), *(ctypes.c_float(float(x)) for x in (step_size, inv_sqrt_bc2, decay, b1, b2, eps, gscale)))
    _parallel(lambda a, b: lib.compensated_adamw(*(t.data_ptr() for t in tensors), a, b, *args), w.numel(), CHUNK)
    return True


def has_vectorized_loss(dtype: torch.dtype) -> bool:
    """softmax_xent is built and runs on vectors for logits of `dtype`: fp32 wherever it builds
    (plain C the compiler vectorizes), bf16 on AVX-512 (elsewhere its scalar loops are slower
    than torch's compiled chunks)."""
    lib = load()
    return lib is not None and (dtype == torch.float32 or dtype == torch.bfloat16 and bool(lib.softmax_xent_vectorized()))


def softmax_xent(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Per-row cross-entropy of (c, V) bf16 or fp32 logits against (c,) int64 targets, as (c,)
    fp32; the logits become d(loss)/d(logits) = softmax − one-hot, in place. None where the
    kernel is not available for that dtype or the inputs do not qualify (the caller takes
    torch's way)."""
    if not (logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float32) and logits.dim() == 2
            and logits.is_contiguous() and targets.dtype == torch.int64 and targets.shape == logits.shape[:1]):
        return None
    rows, vocab = logits.shape
    if rows and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        return None  # torch's indexing says what is wrong
    if not has_vectorized_loss(logits.dtype):
        return None
    lib = load()
    kernel = lib.softmax_xent_f32 if logits.dtype == torch.float32 else lib.softmax_xent
    targets = targets.contiguous()
    loss = torch.empty(rows, dtype=torch.float32)
    _parallel(lambda a, b: kernel(logits.data_ptr(), targets.data_ptr(), loss.data_ptr(), a, b, vocab),
              rows, max(1, CHUNK // max(1, vocab)))
    return loss


def sum_squares(tensors: list) -> float | None:
    """Σ t² over contiguous bf16 or fp32 CPU tensors (float64 sum of fp32 partial sums), or None
    where the kernel is not available or a tensor does not qualify. The elements of all of them
    are split evenly across threads (one hand-off per thread, not per tensor)."""
    if not all(type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float32)
               and t.is_contiguous() for t in tensors):
        return None
    lib = load()
    if lib is None:
        return None
    tensors = [t for t in tensors if t.numel()]
    offsets = [0]
    for t in tensors:
        offsets.append(offsets[-1] + t.numel())

    def part(start: int, stop: int) -> float:  # the elements [start, stop) of the tensors laid end to end
        total = []
        for t, first, end in zip(tensors, offsets, offsets[1:]):
            a, b = max(start, first), min(stop, end)
            if a < b:
                f = lib.sum_squares_bf16 if t.dtype == torch.bfloat16 else lib.sum_squares_f32
                total.append(f(t.data_ptr(), a - first, b - first))
        return math.fsum(total)

    return math.fsum(_parallel(part, offsets[-1], CHUNK))

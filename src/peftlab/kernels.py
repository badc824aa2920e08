"""CPU kernels that torch has no single op for, built once with the system's C++ compiler.

`softmax_xent`: the chunked loss's (loss.py) per-row cross-entropy and its gradient on bf16
logits, in place: per row one pass for the max, one for Σ exp, one that overwrites the logits
with softmax − one-hot (fp32 arithmetic, bf16 rounded to nearest even as torch casts). A row
(V bf16) stays in L2 between the passes, and no (c, V) fp32 tensor or new buffer is made.

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

The shared object is built with `-O3 -march=native` into the cache (by a hash of the source,
the flags and the CPU), loaded with ctypes, and called without the GIL from one thread per
torch thread. No compiler, or a failed build: `load()` returns None and callers use the torch
version.
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

#ifdef __AVX512F__
#include <immintrin.h>
static inline __m512 bf16x16(__m512i widened) { return _mm512_castsi512_ps(_mm512_slli_epi32(widened, 16)); }
static inline __m512i load16(const uint16_t* p) { return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)); }
static inline void store_bf16x16(uint16_t* p, __m512 f) {  /* round to nearest even (finite values) */
    __m512i u = _mm512_castps_si512(f);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}
/* e^x for x <= 0: Cephes' expf (x = n·ln2 + r, a degree-7 polynomial in r, times 2^n) */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  /* e^-104 is below the smallest float */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}
#endif

/* Σ x² over elements [start, stop): float lanes per block of 4096 elements, blocks summed in
   double (gradient clipping's norm: one read of each gradient, at memory speed) */
#ifdef __AVX512F__
#define SUM_SQUARES_BLOCKS(LOAD16)                                                          \
    for (; i + 4096 <= stop; i += 4096) {                                                    \
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();                           \
        for (int64_t j = i; j < i + 4096; j += 32) {                                         \
            __m512 f0 = LOAD16(x + j), f1 = LOAD16(x + j + 16);                              \
            a0 = _mm512_fmadd_ps(f0, f0, a0);                                                \
            a1 = _mm512_fmadd_ps(f1, f1, a1);                                                \
        }                                                                                    \
        total += _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));                                \
    }
static inline __m512 load_bf16_ps(const uint16_t* p) { return bf16x16(load16(p)); }
#else
/* the same blocks in plain C: 32 independent float lanes, which -O3 turns into vectors of
   whatever width the CPU has (AVX2: 4 × 8) without reordering any lane's sum */
#define SUM_SQUARES_BLOCKS(LOAD16)                                                          \
    for (; i + 4096 <= stop; i += 4096) {                                                    \
        float acc[32] = {0};                                                                 \
        for (int64_t j = i; j < i + 4096; j += 32)                                           \
            for (int k = 0; k < 32; k++) { float f = LOAD1(x[j + k]); acc[k] += f * f; }     \
        float lanes = 0.0f;                                                                  \
        for (int k = 0; k < 32; k++) lanes += acc[k];                                        \
        total += lanes;                                                                      \
    }
#endif

extern "C" double sum_squares_bf16(const uint16_t* x, int64_t start, int64_t stop) {
    double total = 0.0;
    int64_t i = start;
#define LOAD1 from_bf16
    SUM_SQUARES_BLOCKS(load_bf16_ps)
#undef LOAD1
    for (; i < stop; i++) { double f = from_bf16(x[i]); total += f * f; }
    return total;
}

extern "C" double sum_squares_f32(const float* x, int64_t start, int64_t stop) {
    double total = 0.0;
    int64_t i = start;
#define LOAD1(v) (v)
    SUM_SQUARES_BLOCKS(_mm512_loadu_ps)
#undef LOAD1
    for (; i < stop; i++) total += (double)x[i] * x[i];
    return total;
}

/* 1 where softmax_xent runs on 16-wide vectors; its scalar loops (libm expf) are slower than
   torch's compiled chunks, and the caller then takes those. */
extern "C" int softmax_xent_vectorized(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

/* Rows [row0, row1) of z (rows × V, bf16): loss[r] = logsumexp(z_r) − z_r[t_r], z_r becomes
   softmax(z_r) − one-hot(t_r). A row with an inf or NaN gets loss NaN and a NaN gradient. */
extern "C" void softmax_xent(uint16_t* z, const int64_t* targets, float* loss, int64_t row0, int64_t row1, int64_t V) {
    for (int64_t r = row0; r < row1; r++) {
        uint16_t* x = z + r * V;
        int64_t j = 0;
        float mx = -INFINITY, s = 0.0f;
        int bad = 0;
#ifdef __AVX512F__
        const __m512i exponent = _mm512_set1_epi32(0x7F80);
        __m512 vmx = _mm512_set1_ps(-INFINITY);
        __mmask16 vbad = 0;
        for (; j + 16 <= V; j += 16) {
            __m512i w = load16(x + j);
            vbad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(w, exponent), exponent);
            vmx = _mm512_max_ps(vmx, bf16x16(w));
        }
        bad = vbad != 0;
        mx = _mm512_reduce_max_ps(vmx);
#endif
        for (; j < V; j++) {
            bad |= (x[j] & 0x7F80) == 0x7F80;
            float f = from_bf16(x[j]);
            mx = f > mx ? f : mx;
        }
        if (bad) {
            loss[r] = NAN;
            for (j = 0; j < V; j++) x[j] = 0x7FC0;
            continue;
        }
        j = 0;
#ifdef __AVX512F__
        const __m512 vm = _mm512_set1_ps(mx);
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        for (; j + 32 <= V; j += 32) {
            s0 = _mm512_add_ps(s0, exp16(_mm512_sub_ps(bf16x16(load16(x + j)), vm)));
            s1 = _mm512_add_ps(s1, exp16(_mm512_sub_ps(bf16x16(load16(x + j + 16)), vm)));
        }
        for (; j + 16 <= V; j += 16) s0 = _mm512_add_ps(s0, exp16(_mm512_sub_ps(bf16x16(load16(x + j)), vm)));
        s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#endif
        for (; j < V; j++) s += expf(from_bf16(x[j]) - mx);
        const float lse = mx + logf(s), target = from_bf16(x[targets[r]]);
        loss[r] = lse - target;
        j = 0;
#ifdef __AVX512F__
        const __m512 vl = _mm512_set1_ps(lse);
        for (; j + 16 <= V; j += 16) store_bf16x16(x + j, exp16(_mm512_sub_ps(bf16x16(load16(x + j)), vl)));
#endif
        for (; j < V; j++) x[j] = to_bf16(expf(from_bf16(x[j]) - lse));
        x[targets[r]] = to_bf16(expf(target - lse) - 1.0f);
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
    lib.compensated_adamw.restype = lib.softmax_xent.restype = None
    lib.compensated_adamw.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32] + [ctypes.c_float] * 7
    lib.softmax_xent.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
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


def has_vectorized_loss() -> bool:
    """softmax_xent is built and runs on AVX-512 vectors (elsewhere its scalar loops are slower
    than torch's compiled chunks)."""
    lib = load()
    return lib is not None and bool(lib.softmax_xent_vectorized())


def softmax_xent(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Per-row cross-entropy of (c, V) bf16 logits against (c,) int64 targets, as (c,) fp32;
    the logits become d(loss)/d(logits) = softmax − one-hot, in place. None where the kernel
    is not available (no compiler, no AVX-512) or the inputs do not qualify (the caller takes
    torch's way)."""
    if not (logits.device.type == "cpu" and logits.dtype == torch.bfloat16 and logits.dim() == 2 and logits.is_contiguous()
            and targets.dtype == torch.int64 and targets.shape == logits.shape[:1]):
        return None
    rows, vocab = logits.shape
    if rows and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        return None  # torch's indexing says what is wrong
    if not has_vectorized_loss():
        return None
    lib = load()
    targets = targets.contiguous()
    loss = torch.empty(rows, dtype=torch.float32)
    _parallel(lambda a, b: lib.softmax_xent(logits.data_ptr(), targets.data_ptr(), loss.data_ptr(), a, b, vocab),
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

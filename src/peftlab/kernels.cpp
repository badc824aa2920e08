// peftlab's CPU kernels: kernels.py says what each one is for, builds this file and calls it.
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

/* e^x in plain C for x <= 0 (Cephes' expf as exp16 above, without fused multiply-adds): no
   call and no branch, so loops over it vectorize to the CPU's width. 2^n is applied as two
   normal factors, so results below the normal range come out as subnormals, not as zero. */
static inline float exp_le0(float x) {
    x = x > -104.0f ? x : -104.0f;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round to nearest: |n| <= 151 */
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + (r + 1.0f);
    int32_t e = (int32_t)n, e1 = e / 2, e2 = e - e1;
    return y * __builtin_bit_cast(float, (uint32_t)(e1 + 127) << 23) * __builtin_bit_cast(float, (uint32_t)(e2 + 127) << 23);
}

static inline uint32_t is_nonfinite(float f) { return (bits_of(f) & 0x7F800000u) == 0x7F800000u; }

/* softmax_xent on fp32 logits: the same three passes per row, in 16 independent float lanes
   that the compiler vectorizes (AVX2: 2 × 8) — a row of V floats (SmolLM2: 192 KB) stays in L2. */
extern "C" void softmax_xent_f32(float* z, const int64_t* targets, float* loss, int64_t row0, int64_t row1, int64_t V) {
    enum { L = 16 };
    for (int64_t r = row0; r < row1; r++) {
        float* x = z + r * V;
        float lane[L];
        uint32_t nonfinite[L] = {0};
        for (int k = 0; k < L; k++) lane[k] = -INFINITY;
        int64_t j = 0;
        for (; j + L <= V; j += L)
            for (int k = 0; k < L; k++) {
                float f = x[j + k];
                nonfinite[k] |= is_nonfinite(f);
                lane[k] = f > lane[k] ? f : lane[k];
            }
        float mx = -INFINITY;
        uint32_t bad = 0;
        for (int k = 0; k < L; k++) { mx = lane[k] > mx ? lane[k] : mx; bad |= nonfinite[k]; }
        for (; j < V; j++) { bad |= is_nonfinite(x[j]); mx = x[j] > mx ? x[j] : mx; }
        if (bad) {
            loss[r] = NAN;
            for (j = 0; j < V; j++) x[j] = NAN;
            continue;
        }
        for (int k = 0; k < L; k++) lane[k] = 0.0f;
        for (j = 0; j + L <= V; j += L)
            for (int k = 0; k < L; k++) lane[k] += exp_le0(x[j + k] - mx);
        float s = 0.0f;
        for (int k = 0; k < L; k++) s += lane[k];
        for (; j < V; j++) s += exp_le0(x[j] - mx);
        const float lse = mx + logf(s), target = x[targets[r]];
        loss[r] = lse - target;
        for (j = 0; j < V; j++) x[j] = exp_le0(x[j] - lse);
        x[targets[r]] = exp_le0(target - lse) - 1.0f;
    }
}

/* dtype.h - loading rows of any pn_dtype into the compute type `real` and
 * storing them back, rounding to nearest even. The software conversions give
 * the same bits as the F16C instructions, so every ISA variant agrees.
 *
 * One set of conversions serves every op: pn_load_run and pn_store_run are
 * always inlined, so that where n and dt are constants (the spatial engines'
 * short runs of values) the conversion is a few instructions in registers
 * next to the arithmetic that uses them; pn_load_row and pn_store_row are the
 * same conversions as calls of their own, for whole rows. */
#ifndef PYNORM_DTYPE_H
#define PYNORM_DTYPE_H

#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>   /* F16C conversions; SSE2 streaming stores (kernel.h) */
#endif

#include "common.h"   /* PN_ALWAYS_INLINE */

static inline float pn_bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t pn_float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* bfloat16 is the top half of a float32. */
static inline float pn_bf16_to_float(uint16_t h) { return pn_bits_to_float((uint32_t)h << 16); }
/* Written without branches (the NaN case is a select) so that loops over it
 * become vector code in every build: with an early return for NaN, GCC left
 * the AVX-512 store loop scalar (0.2 ns a value, more than the rest of a
 * LayerNorm row's work). */
static inline uint16_t pn_float_to_bf16(float f) {
    const uint32_t u = pn_float_to_bits(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;   /* round half to even on the dropped 16 bits */
    const uint32_t quiet = (u >> 16) | 0x40u;                          /* NaN: its payload, quieted */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

/* IEEE binary16. */
static inline float pn_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) /* Inf or NaN (NaNs come out quiet, as F16C makes them) */
        return pn_bits_to_float(sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0));
    if (exp == 0) {  /* zero or subnormal: man * 2^-24, exact in float */
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return pn_bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}
static inline uint16_t pn_float_to_half(float f) {
    uint32_t u = pn_float_to_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    u &= 0x7fffffffu;
    if (u >= 0x47800000u)              /* >= 65536, Inf or NaN */
        return (uint16_t)(sign | (u > 0x7f800000u ? 0x7e00u | ((u >> 13) & 0x3ffu) : 0x7c00u));
    if (u < 0x38800000u) {             /* below 2^-14: a subnormal half or zero */
        /* Adding 0.5 aligns the value's bits to the half's subnormal grid; the
         * float adder does the round-to-nearest-even for us. */
        float v = pn_bits_to_float(u) + 0.5f;
        return (uint16_t)(sign | (pn_float_to_bits(v) - 0x3f000000u));
    }
    /* Normal: rebias the exponent, round the 13 dropped bits half to even
     * (a carry into the exponent is right, up to Inf at 65520). */
    u += 0xc8000fffu + ((u >> 13) & 1u);
    return (uint16_t)(sign | (u >> 13));
}

/* dst[i] = src[i] as `real`, for n values of dtype dt. F16C's conversion of
 * binary16 is exact, as the software one is. */
static PN_ALWAYS_INLINE void pn_load_run(real *dst, const void *src, pn_dtype dt, int64_t n) {
    int64_t i = 0;
    switch (dt) {
    case PN_FLOAT32: { const float *s = (const float *)src; for (; i < n; i++) dst[i] = (real)s[i]; break; }
    case PN_FLOAT64: { const double *s = (const double *)src; for (; i < n; i++) dst[i] = (real)s[i]; break; }
    case PN_BFLOAT16: {
        const uint16_t *s = (const uint16_t *)src;
#ifdef __AVX2__
        /* widened and shifted straight from memory, 8 values in two
         * instructions (GCC's vector code loaded 16 values and split them) */
        if (sizeof(real) == sizeof(float)) {
#ifdef __AVX512F__
            /* the row's own width: 8-value stores read back as 16-value
             * vectors stalled store forwarding (0.3-0.6x) */
            for (; i + 16 <= n; i += 16)
                _mm512_storeu_si512((void *)((float *)dst + i),
                                    _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(s + i))), 16));
#endif
            for (; i + 8 <= n; i += 8)
                _mm256_storeu_si256((__m256i *)((float *)dst + i),
                                    _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i))), 16));
        }
#endif
        for (int64_t k = 0, rest = n - i; k < rest; k++) dst[i + k] = (real)pn_bf16_to_float(s[i + k]);
        break;
    }
    case PN_FLOAT16: {
        const uint16_t *s = (const uint16_t *)src;
#ifdef __F16C__
        if (sizeof(real) == sizeof(float)) {   /* straight into the row */
            float *d = (float *)dst;
#ifdef __AVX512F__
            for (; i + 16 <= n; i += 16)
                _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + i))));
#endif
            for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
        }
        for (; i + 8 <= n; i += 8) {
            float tmp[8];
            _mm256_storeu_ps(tmp, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
            for (int j = 0; j < 8; j++) dst[i + j] = (real)tmp[j];
        }
#endif
        /* (counted from i: for a constant n GCC warned of an overflowing iteration here) */
        for (int64_t k = 0, rest = n - i; k < rest; k++) dst[i + k] = (real)pn_half_to_float(s[i + k]);
        break;
    }
    }
}

/* pn_float_to_bf16 on the first values of f, in vector registers, with the
 * same bits: u + 0x7fff + (bit 16 of u), the top half kept (round half to
 * even; overflow carries into Inf), and for a NaN u | 0x400000 (quieted, the
 * payload kept). Returns how many it converted (a multiple of the width; 0
 * without AVX2). This is the rounding that a bf16 row's store spends its
 * time on (no AVX512_BF16 instruction is assumed): GCC's vector code for the
 * scalar loop shifted and packed each vector separately (0.2 ns a value on
 * AVX-512); here 32 values take 11 AVX-512 instructions, the top halves of
 * two vectors picked by one word shuffle; the NaN select runs only for a
 * pair of vectors that holds a NaN (one compare of the pair finds it). */
static PN_ALWAYS_INLINE int64_t pn_floats_to_bf16_simd(uint16_t *d, const float *f, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    {
        const __m512i half = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
        const __m512i bit16 = _mm512_set1_epi32(0x10000), quiet = _mm512_set1_epi32(0x400000);
        const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                                   31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
        for (; i + 32 <= n; i += 32) {
            const __m512 x0 = _mm512_loadu_ps(f + i), x1 = _mm512_loadu_ps(f + i + 16);
            /* one compare finds a NaN in either vector; without one the NaN select is skipped */
            const int any_nan = _mm512_cmp_ps_mask(x0, x1, _CMP_UNORD_Q) != 0;
            __m512i r[2];
            for (int k = 0; k < 2; k++) {
                const __m512 x = k ? x1 : x0;
                const __m512i u = _mm512_castps_si512(x);
                const __mmask16 odd = _mm512_test_epi32_mask(u, bit16);
                const __m512i up = _mm512_add_epi32(u, half);
                r[k] = _mm512_mask_add_epi32(up, odd, up, one);
                if (any_nan) r[k] = _mm512_mask_or_epi32(r[k], _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), u, quiet);
            }
            _mm512_storeu_si512((void *)(d + i), _mm512_permutex2var_epi16(r[0], odd_words, r[1]));
        }
    }
#endif
#ifdef __AVX2__
    {
        const __m256i half = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), quiet = _mm256_set1_epi32(0x400000);
        for (; i + 16 <= n; i += 16) {
            const __m256 x0 = _mm256_loadu_ps(f + i), x1 = _mm256_loadu_ps(f + i + 8);
            /* one compare finds a NaN in either vector; without one (nearly
             * always) the NaN select is skipped: 4 of the 9 instructions a
             * vector took, the same bits */
            const int any_nan = !_mm256_testz_ps(_mm256_cmp_ps(x0, x1, _CMP_UNORD_Q), _mm256_cmp_ps(x0, x1, _CMP_UNORD_Q));
            __m256i r[2];
            for (int k = 0; k < 2; k++) {
                const __m256 x = k ? x1 : x0;
                const __m256i u = _mm256_castps_si256(x);
                const __m256i bias = _mm256_add_epi32(half, _mm256_and_si256(_mm256_srli_epi32(u, 16), one));
                __m256i v = _mm256_add_epi32(u, bias);
                if (any_nan) {
                    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
                    v = _mm256_blendv_epi8(v, _mm256_or_si256(u, quiet), nan);
                }
                r[k] = _mm256_srli_epi32(v, 16);
            }
            /* values below 2^16: the saturating pack keeps them; then undo its lane interleave */
            const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xd8);
            _mm256_storeu_si256((__m256i *)(d + i), packed);
        }
    }
#endif
    (void)d; (void)f; (void)n;
    return i;
}

/* dst[i] = src[i] rounded to dtype dt (F16C where there is F16C: the bits
 * of the software rounding). */
static PN_ALWAYS_INLINE void pn_store_run(void *dst, const real *src, pn_dtype dt, int64_t n) {
    int64_t i = 0;
    switch (dt) {
    case PN_FLOAT32: { float *d = (float *)dst; for (; i < n; i++) d[i] = (float)src[i]; break; }
    case PN_FLOAT64: { double *d = (double *)dst; for (; i < n; i++) d[i] = (double)src[i]; break; }
    case PN_BFLOAT16: {
        uint16_t *d = (uint16_t *)dst;
        if (sizeof(real) == sizeof(float)) i = pn_floats_to_bf16_simd(d, (const float *)src, n);
        for (; i < n; i++) d[i] = pn_float_to_bf16((float)src[i]);
        break;
    }
    case PN_FLOAT16: {
        uint16_t *d = (uint16_t *)dst;
#ifdef __F16C__
        if (sizeof(real) == sizeof(float)) {   /* straight from the row */
            const float *f = (const float *)src;
#ifdef __AVX512F__
            for (; i + 16 <= n; i += 16)
                _mm256_storeu_si256((__m256i *)(d + i), _mm512_cvtps_ph(_mm512_loadu_ps(f + i), _MM_FROUND_TO_NEAREST_INT));
#endif
            for (; i + 8 <= n; i += 8)
                _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(f + i), _MM_FROUND_TO_NEAREST_INT));
        }
        for (; i + 8 <= n; i += 8) {
            float tmp[8];
            for (int j = 0; j < 8; j++) tmp[j] = (float)src[i + j];
            _mm_storeu_si128((__m128i *)(d + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(tmp), _MM_FROUND_TO_NEAREST_INT));
        }
#endif
        for (; i < n; i++) d[i] = pn_float_to_half((float)src[i]);
        break;
    }
    }
}

/* The same, for n values of a row. */
static inline void pn_load_row(real *dst, const void *src, pn_dtype dt, int64_t n) { pn_load_run(dst, src, dt, n); }
static inline void pn_store_row(void *dst, const real *src, pn_dtype dt, int64_t n) { pn_store_run(dst, src, dt, n); }

/* The row as `real` values: the row itself when it already has that type,
 * else converted into buf. */
static inline const real *pn_row_as_real(const void *src, pn_dtype dt, real *buf, int64_t n) {
    if (dt == (sizeof(real) == 8 ? PN_FLOAT64 : PN_FLOAT32)) return (const real *)src;
    pn_load_row(buf, src, dt, n);
    return buf;
}

/* Whether a loop reads rows of dt widened in place (pn_bf16_to_float per value,
 * a shift in registers, exact) rather than through pn_row_as_real's buffer:
 * bfloat16 rows in the float build. The token norms' statistics, residual add
 * and y pieces take that path, with the buffer's bits. */
static inline int pn_widen_in_loop(pn_dtype dt) {
    return dt == PN_BFLOAT16 && sizeof(real) == sizeof(float);
}

#endif /* PYNORM_DTYPE_H */

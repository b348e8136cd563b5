/* dtype.h - loading rows of any pn_dtype into the compute type `real` and
 * storing them back, rounding to nearest even. The software conversions give
 * the same bits as the F16C instructions, so every ISA variant agrees. */
#ifndef PYNORM_DTYPE_H
#define PYNORM_DTYPE_H

#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>   /* F16C conversions; SSE2 streaming stores (kernel.h) */
#endif

#include "pynorm.h"

static inline float pn_bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t pn_float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* bfloat16 is the top half of a float32. */
static inline float pn_bf16_to_float(uint16_t h) { return pn_bits_to_float((uint32_t)h << 16); }
static inline uint16_t pn_float_to_bf16(float f) {
    uint32_t u = pn_float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);   /* round half to even on the dropped 16 bits */
    return (uint16_t)(u >> 16);
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

/* dst[i] = src[i] as `real`, for n elements of a row in dtype dt. */
static inline void pn_load_row(real *dst, const void *src, pn_dtype dt, int64_t n) {
    int64_t i = 0;
    switch (dt) {
    case PN_FLOAT32: { const float *s = (const float *)src; for (; i < n; i++) dst[i] = (real)s[i]; break; }
    case PN_FLOAT64: { const double *s = (const double *)src; for (; i < n; i++) dst[i] = (real)s[i]; break; }
    case PN_BFLOAT16: { const uint16_t *s = (const uint16_t *)src; for (; i < n; i++) dst[i] = (real)pn_bf16_to_float(s[i]); break; }
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
        for (; i < n; i++) dst[i] = (real)pn_half_to_float(s[i]);
        break;
    }
    }
}

/* dst[i] = src[i] rounded to dtype dt. */
static inline void pn_store_row(void *dst, const real *src, pn_dtype dt, int64_t n) {
    int64_t i = 0;
    switch (dt) {
    case PN_FLOAT32: { float *d = (float *)dst; for (; i < n; i++) d[i] = (float)src[i]; break; }
    case PN_FLOAT64: { double *d = (double *)dst; for (; i < n; i++) d[i] = (double)src[i]; break; }
    case PN_BFLOAT16: { uint16_t *d = (uint16_t *)dst; for (; i < n; i++) d[i] = pn_float_to_bf16((float)src[i]); break; }
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

/* The row as `real` values: the row itself when it already has that type,
 * else converted into buf. */
static inline const real *pn_row_as_real(const void *src, pn_dtype dt, real *buf, int64_t n) {
    if (dt == (sizeof(real) == 8 ? PN_FLOAT64 : PN_FLOAT32)) return (const real *)src;
    pn_load_row(buf, src, dt, n);
    return buf;
}

#endif /* PYNORM_DTYPE_H */

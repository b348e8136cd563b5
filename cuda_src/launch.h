/* launch.h - launch geometry, row partitions and index arithmetic of
 * libpynorm_cuda (internal header).
 *
 * Plain C++ with no CUDA header and no device: every function here is
 * __host__ __device__ under nvcc and an ordinary inline function under a host
 * compiler, so cuda_src/tests/test_launch.cpp checks the very code the
 * kernels and their dispatch run (kernel choice and block size for every C,
 * which columns a thread holds, the backward's row partition, the spatial
 * index walks, scratch sizes) on a machine without a GPU.
 */
#ifndef PN_CUDA_LAUNCH_H
#define PN_CUDA_LAUNCH_H

#include <stddef.h>
#include <stdint.h>

#include "pynorm.h"

#if defined(__CUDACC__)
#define PN_HD __host__ __device__ __forceinline__
#else
#define PN_HD inline
#endif

namespace pn {

/* ------------------------------------------------------------------------ */
/* Limits of the kernel families (all in elements of a row).                 */

constexpr int kWarpMaxC = 1024;    /* C <= this: one warp per row            */
constexpr int kRegMaxC = 16384;    /* forward, C <= this: the row is kept in registers */
constexpr int kBwdRegMaxC = 8192;  /* backward, C <= this: rows and the partition's
                                      dweight/dbias sums kept in registers */
constexpr int kFwdWarpsPerBlock = 4;
constexpr int kBwdWarpsPerBlock = 8;
constexpr int kStreamThreads = 512;
constexpr int kFwdBlockE = 16;     /* elements a thread holds, forward block kernel */
constexpr int kBwdBlockE = 8;      /* the same, backward block kernel */
constexpr int kShiftCount = 16;    /* LayerNorm's shift: mean of the row's first 16 values */
constexpr int kFoldEvery = 16;     /* streaming kernels: float partial sums go to double every 16 values */
constexpr int64_t kMaxPartitions = 256;
constexpr int64_t kGridCap = int64_t(1) << 24; /* grid-stride loops beyond this */

/* The combine functions of shard.cu take the shards' widths/counts by value
 * (kernel arguments): at most this many shards (pynorm_cuda.h,
 * PN_CUDA_MAX_SHARDS). */
constexpr int kMaxShards = 64;

/* ------------------------------------------------------------------------ */
/* Arithmetic                                                                */

inline bool mul_ovf(int64_t a, int64_t b, int64_t *r) { return __builtin_mul_overflow(a, b, r); }
inline bool add_ovf(int64_t a, int64_t b, int64_t *r) { return __builtin_add_overflow(a, b, r); }

PN_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
PN_HD unsigned round_up32(int64_t n) { return (unsigned)(((n + 31) / 32) * 32); }
PN_HD unsigned grid_for(int64_t n) { return (unsigned)(n < kGridCap ? n : kGridCap); }
/* Elementwise grid-stride passes over n values with 256-thread blocks. */
PN_HD unsigned elem_grid(int64_t n) { return grid_for(ceil_div(n, 256) < 65535 ? ceil_div(n, 256) : 65535); }

/* Offset (in elements) of row `row` of a B x T x C buffer whose rows start at
 * b*sb + t*st. The host folds the layout to T == 1 (offset row*sb) whenever
 * every buffer of the call allows it, which avoids the 64-bit division. */
PN_HD int64_t row_off(int64_t row, int64_t T, int64_t sb, int64_t st)
{
    if (T == 1) return row * sb;
    const int64_t b = row / T;
    return b * sb + (row - b * T) * st;
}

/* The same with H > 1 heads per (b, t) (pn_norm_options.H): T counts the
 * rows of a b (heads included, T = T_user * H), row (b, t, k) starts at
 * b*sb + t*st + k*sh, as the C library's pn_row. H == 1 is row_off above
 * (the host folds every dense head layout to it). */
PN_HD int64_t row_off(int64_t row, int64_t T, int64_t H, int64_t sb, int64_t st, int64_t sh)
{
    if (H <= 1) return row_off(row, T, sb, st);
    const int64_t b = row / T, r = row - b * T, t = r / H;
    return b * sb + t * st + (r - t * H) * sh;
}

/* ------------------------------------------------------------------------ */
/* Row fragments: a thread of a row holds E elements in chunks of V          */
/* consecutive ones (V = 16 / element size); chunk j of thread tid starts at */
/* column (j * tpr + tid) * V (tpr: threads per row).                        */

PN_HD int vec_width(int esize) { return 16 / esize; }

/* Column of element k (0 <= k < E) of thread tid's fragment. */
PN_HD int col_of_v(int V, int k, int tid, int tpr) { return ((k / V) * tpr + tid) * V + (k % V); }

/* ------------------------------------------------------------------------ */
/* Kernel choice, by C and the element size alone (so the order of every     */
/* sum, hence the bits, depends only on C and the dtype).                    */

enum TokKind { kTokWarp = 0, kTokBlock = 1, kTokStream = 2 };

struct TokPlan {
    int kind;          /* TokKind */
    int E;             /* register kernels: elements per thread */
    unsigned threads;  /* threads per block */
    int rows_per_block;/* forward warp kernel: rows a block takes at once; else 1 */
};

/* float64 rows stream with up to 512 threads, 4 values a thread at least. */
PN_HD unsigned f64_threads(int64_t C)
{
    const int64_t n = round_up32(ceil_div(C, 4) < kStreamThreads ? ceil_div(C, 4) : kStreamThreads);
    return (unsigned)(n < 32 ? 32 : n);
}

/* E of the warp kernels: 8, 16, 24 or 32 elements a lane (C <= 1024). */
PN_HD int warp_E(int64_t C) { return C <= 256 ? 8 : C <= 512 ? 16 : C <= 768 ? 24 : 32; }

/* Forward (LayerNorm, RMSNorm, fused or not). esize: the dtype's size. */
PN_HD TokPlan fwd_plan(int64_t C, int esize)
{
    TokPlan p = {kTokStream, 0, (unsigned)kStreamThreads, 1};
    if (esize == 8) {
        p.threads = f64_threads(C);
    } else if (C <= kWarpMaxC) {
        p.kind = kTokWarp;
        p.E = warp_E(C);
        p.threads = 32 * kFwdWarpsPerBlock;
        p.rows_per_block = kFwdWarpsPerBlock;
    } else if (C <= kRegMaxC) {
        p.kind = kTokBlock;
        p.E = kFwdBlockE;
        p.threads = round_up32(ceil_div(C, kFwdBlockE));
    }
    return p;
}

/* Backward dx (the register kernels also take dweight/dbias; the streaming
 * kind leaves them to the column kernel). One block per partition for the
 * register kinds. */
PN_HD TokPlan bwd_plan(int64_t C, int esize)
{
    TokPlan p = {kTokStream, 0, (unsigned)kStreamThreads, 1};
    if (esize == 8) {
        p.threads = f64_threads(C);
    } else if (C <= kWarpMaxC) {
        p.kind = kTokWarp;
        p.E = warp_E(C);
        p.threads = 32 * kBwdWarpsPerBlock;
    } else if (C <= kBwdRegMaxC) {
        p.kind = kTokBlock;
        p.E = kBwdBlockE;
        p.threads = round_up32(ceil_div(C, kBwdBlockE));
    }
    return p;
}

/* Threads per row of a plan: a warp, or the whole block. */
PN_HD int plan_tpr(const TokPlan &p) { return p.kind == kTokWarp ? 32 : (int)p.threads; }

/* LayerNorm's shift is taken from the row's first shift_count(C) values. */
PN_HD int shift_count(int64_t C) { return C < kShiftCount ? (int)C : kShiftCount; }

/* ------------------------------------------------------------------------ */
/* Partitions                                                                */

/* Fixed partition of the rows for the backward passes: depends only on
 * (rows, C). A partition is a contiguous run of `chunk` rows (the last one may
 * be shorter); there are P <= 256 of them, none empty. */
PN_HD void partition(int64_t rows, int64_t C, int64_t *P, int64_t *chunk)
{
    const int64_t unit = (C <= kWarpMaxC) ? kBwdWarpsPerBlock : 1;   /* rows a partition works on at once */
    int64_t p = ceil_div(rows, unit);
    if (p > kMaxPartitions) p = kMaxPartitions;
    const int64_t ch = ceil_div(rows, p);
    *chunk = ch;
    *P = ceil_div(rows, ch);
}

/* BatchNorm's fixed cut of the M = N*S positions of a channel: at most
 * kSpMaxChunks chunks of equal length (the last may be shorter), their number
 * ceil(M / kSpChunkMin) below that cap, so a chunk holds more than
 * kSpChunkMin / 2 positions whenever there are several. */
constexpr int64_t kSpChunkMin = 1024;
constexpr int64_t kSpMaxChunks = 256;

PN_HD void sp_partition(int64_t M, int64_t *P, int64_t *chunk)
{
    int64_t p = ceil_div(M, kSpChunkMin);
    if (p > kSpMaxChunks) p = kSpMaxChunks;
    *chunk = ceil_div(M, p);
    *P = ceil_div(M, *chunk);
}

/* ------------------------------------------------------------------------ */
/* dtypes and sizes (host checks)                                            */

inline int dtype_size(pn_dtype d)
{
    switch (d) {
    case PN_FLOAT32: return 4;
    case PN_FLOAT16: return 2;
    case PN_BFLOAT16: return 2;
    case PN_FLOAT64: return 8;
    }
    return 0;
}

inline bool valid_dtype(pn_dtype d) { return d == PN_FLOAT32 || d == PN_FLOAT16 || d == PN_BFLOAT16 || d == PN_FLOAT64; }

/* B, T, C > 0 and B*T*C*esize fits in int64. */
inline pn_status check_sizes(int64_t B, int64_t T, int64_t C, int esize, int64_t *rows)
{
    int64_t r, n, bytes;
    if (B <= 0 || T <= 0 || C <= 0) return PN_ERR_SIZE;
    if (mul_ovf(B, T, &r) || mul_ovf(r, C, &n) || mul_ovf(n, esize, &bytes)) return PN_ERR_SIZE;
    *rows = r;
    return PN_OK;
}

/* Bytes of scratch for `narrays` arrays of partial sums (P x C each, in the
 * compute type); 0 for invalid sizes. */
inline size_t scratch_bytes_for(int64_t B, int64_t T, int64_t C, pn_dtype dtype, int narrays)
{
    int64_t rows, P, chunk, n, bytes;
    if (!valid_dtype(dtype)) return 0;
    if (check_sizes(B, T, C, dtype_size(dtype), &rows) != PN_OK) return 0;
    partition(rows, C, &P, &chunk);
    const int accsize = dtype == PN_FLOAT64 ? 8 : 4;
    if (mul_ovf(P, C, &n) || mul_ovf(n, (int64_t)accsize * narrays, &bytes)) return 0;
    return (size_t)bytes;
}

/* ------------------------------------------------------------------------ */
/* Index walks of the spatial kernels                                         */

/* Index i = o * inner + in stepped by a fixed stride without divisions
 * (after the two in init). */
struct Walk2 {
    int64_t o, in, inner, d_o, d_in;
    PN_HD void init(int64_t i, int64_t stride, int64_t inner_)
    {
        inner = inner_;
        o = i / inner;
        in = i - o * inner;
        d_o = stride / inner;
        d_in = stride - d_o * inner;
    }
    PN_HD void next()
    {
        o += d_o;
        in += d_in;
        if (in >= inner) { in -= inner; ++o; }
    }
};

/* The channel of element i of the whole N x C x S buffer, stepped by a fixed
 * stride: c = (i / inner) % C with inner = S (NCHW) or 1 (NHWC). */
struct ChanWalk {
    int64_t s, c, inner, C, d_s, d_c;
    PN_HD void init(int64_t i, int64_t stride, int64_t inner_, int64_t C_)
    {
        inner = inner_;
        C = C_;
        const int64_t r = i / inner;
        s = i - r * inner;
        c = r % C;
        const int64_t dr = stride / inner;
        d_s = stride - dr * inner;
        d_c = dr % C;
    }
    PN_HD void next()
    {
        s += d_s;
        int64_t carry = 0;
        if (s >= inner) { s -= inner; carry = 1; }
        c += d_c + carry;          /* d_c + carry <= C and c < C: one wrap at most */
        if (c >= C) c -= C;
    }
};

} /* namespace pn */

#endif /* PN_CUDA_LAUNCH_H */

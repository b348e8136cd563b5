/* test_launch.cpp - the CUDA library's launch geometry, partitions and index
 * walks (cuda_src/launch.h), and the argument checks that reject a call before
 * anything reaches the device, checked on the host: no GPU, no CUDA driver.
 *
 * Built with the host C++ compiler and run by ctest under the `cpu` label (CI
 * machines have nvcc but no GPU). Each check prints what failed and the test
 * exits non-zero if any did.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <initializer_list>
#include <vector>

#include "launch.h"
#include "pynorm_cuda.h"

using namespace pn;

static int failures = 0;

#define CHECK(cond, ...)                                            \
    do {                                                            \
        if (!(cond)) {                                              \
            if (failures < 50) {                                    \
                fprintf(stderr, "%s:%d: %s: ", __FILE__, __LINE__, #cond); \
                fprintf(stderr, __VA_ARGS__);                       \
                fputc('\n', stderr);                                \
            }                                                       \
            ++failures;                                             \
        }                                                           \
    } while (0)

/* The sizes a check walks: every C up to 2048, then every 7th and each
 * kernel threshold with its neighbours, up to 16384 (and beyond for the
 * streaming kind). */
static std::vector<int64_t> sizes_to(int64_t hi)
{
    std::vector<int64_t> v;
    for (int64_t C = 1; C <= hi; ++C) {
        bool edge = false;
        for (int64_t t : {256, 512, 768, 1024, 2048, 4096, 8192, 16384, 16385, 65536})
            if (C >= t - 1 && C <= t + 1) edge = true;
        if (C <= 2048 || C % 7 == 0 || edge) v.push_back(C);
    }
    return v;
}

/* Every column 0 <= c < C is held by exactly one (thread, element) of a
 * register plan, and every (thread, element) the kernel masks as c >= C lies
 * beyond the row: the sums and stores of the register kernels see each value
 * once. */
static void check_register_cover(const TokPlan &p, int64_t C, int esize, const char *what)
{
    const int V = vec_width(esize), tpr = plan_tpr(p);
    CHECK(p.E % V == 0, "%s C=%lld: E=%d is not a multiple of V=%d", what, (long long)C, p.E, V);
    CHECK((int64_t)p.E * tpr >= C, "%s C=%lld: %d threads x %d elements cannot hold the row", what, (long long)C, tpr,
          p.E);
    std::vector<int> seen((size_t)p.E * tpr, 0);
    int64_t held = 0;
    for (int tid = 0; tid < tpr; ++tid)
        for (int k = 0; k < p.E; ++k) {
            const int c = col_of_v(V, k, tid, tpr);
            CHECK(c >= 0 && c < p.E * tpr, "%s C=%lld: tid %d element %d maps to column %d", what, (long long)C, tid,
                  k, c);
            if (c < 0 || c >= p.E * tpr) continue;
            seen[(size_t)c]++;
            if (c < C) ++held;
        }
    for (int64_t c = 0; c < (int64_t)seen.size(); ++c)
        if (seen[(size_t)c] != 1) {
            CHECK(false, "%s C=%lld: column %lld held %d times", what, (long long)C, (long long)c, seen[(size_t)c]);
            break;
        }
    CHECK(held == C, "%s C=%lld: %lld columns held", what, (long long)C, (long long)held);
}

static void check_plans(void)
{
    const int esizes[] = {2, 4, 8};
    for (int esize : esizes) {
        for (int64_t C : sizes_to(70000)) {
            const TokPlan f = fwd_plan(C, esize), b = bwd_plan(C, esize);
            for (int dir = 0; dir < 2; ++dir) {
                const TokPlan &p = dir ? b : f;
                const char *what = dir ? "bwd_plan" : "fwd_plan";
                CHECK(p.threads >= 32 && p.threads <= 1024 && p.threads % 32 == 0,
                      "%s C=%lld esize=%d: %u threads", what, (long long)C, esize, p.threads);
                if (esize == 8) {
                    CHECK(p.kind == kTokStream && p.threads == f64_threads(C), "%s C=%lld: float64 must stream", what,
                          (long long)C);
                    continue;
                }
                const int64_t reg_max = dir ? kBwdRegMaxC : kRegMaxC;
                if (C <= kWarpMaxC) {
                    CHECK(p.kind == kTokWarp, "%s C=%lld esize=%d: expected the warp kernel", what, (long long)C,
                          esize);
                    CHECK(p.E == 8 || p.E == 16 || p.E == 24 || p.E == 32, "%s C=%lld: E=%d has no kernel", what,
                          (long long)C, p.E);
                    CHECK(p.threads == (unsigned)(32 * (dir ? kBwdWarpsPerBlock : kFwdWarpsPerBlock)),
                          "%s C=%lld: %u threads", what, (long long)C, p.threads);
                    CHECK(32 * (p.E - 8) < C, "%s C=%lld: E=%d where E-8 would do", what, (long long)C, p.E);
                } else if (C <= reg_max) {
                    CHECK(p.kind == kTokBlock, "%s C=%lld esize=%d: expected the block kernel", what, (long long)C,
                          esize);
                    CHECK(p.E == (dir ? kBwdBlockE : kFwdBlockE), "%s C=%lld: E=%d", what, (long long)C, p.E);
                    CHECK((int64_t)(p.threads - 32) * p.E < C, "%s C=%lld: %u threads where 32 fewer hold the row",
                          what, (long long)C, p.threads);
                } else {
                    CHECK(p.kind == kTokStream && p.threads == (unsigned)kStreamThreads,
                          "%s C=%lld esize=%d: expected the streaming kernel with %d threads", what, (long long)C,
                          esize, kStreamThreads);
                }
                if (p.kind != kTokStream && (C <= 2048 || C % 49 == 0 || C == reg_max || C == kWarpMaxC))
                    check_register_cover(p, C, esize, what);
            }
        }
    }
    /* float64 rows: 4 values a thread at least, 32..512 threads */
    for (int64_t C : sizes_to(70000)) {
        const unsigned t = f64_threads(C);
        CHECK(t >= 32 && t <= (unsigned)kStreamThreads && t % 32 == 0, "f64_threads(%lld) = %u", (long long)C, t);
        CHECK(t == 32 || (int64_t)(t - 32) * 4 < C, "f64_threads(%lld) = %u: more threads than values / 4",
              (long long)C, t);
    }
    for (int64_t C = 1; C <= 40; ++C)
        CHECK(shift_count(C) == (C < 16 ? C : 16), "shift_count(%lld) = %d", (long long)C, shift_count(C));
}

/* The backward's partition: P <= 256 contiguous runs of `chunk` rows, none
 * empty, covering the rows; the scratch size holds P rows of C partial sums
 * per array. */
static void check_partitions(void)
{
    std::vector<int64_t> rows_list;
    for (int64_t r = 1; r <= 3000; ++r) rows_list.push_back(r);
    for (int64_t r : std::initializer_list<int64_t>{4095, 4096, 4097, 65535, 65536, 1000003, (int64_t)1 << 31,
                                                  ((int64_t)1 << 40) + 7})
        rows_list.push_back(r);
    for (int64_t rows : rows_list)
        for (int64_t C : {1, 7, 1024, 1025, 8192, 16385}) {
            int64_t P = 0, chunk = 0;
            partition(rows, C, &P, &chunk);
            CHECK(P >= 1 && P <= kMaxPartitions, "partition(%lld, %lld): P = %lld", (long long)rows, (long long)C,
                  (long long)P);
            CHECK(chunk >= 1 && (P - 1) * chunk < rows && P * chunk >= rows,
                  "partition(%lld, %lld): P = %lld, chunk = %lld leaves a partition empty or a row out",
                  (long long)rows, (long long)C, (long long)P, (long long)chunk);
            if (C <= kWarpMaxC && rows >= kBwdWarpsPerBlock * kMaxPartitions)
                CHECK(chunk >= kBwdWarpsPerBlock, "partition(%lld, %lld): chunk %lld below a block's warps",
                      (long long)rows, (long long)C, (long long)chunk);
        }
    for (int64_t M : std::initializer_list<int64_t>{1, 2, 1023, 1024, 1025, 262143, 262144, 262145, 1000003,
                                                   ((int64_t)1 << 36) + 3}) {
        int64_t P = 0, chunk = 0;
        sp_partition(M, &P, &chunk);
        CHECK(P >= 1 && P <= kSpMaxChunks && (P - 1) * chunk < M && P * chunk >= M,
              "sp_partition(%lld): P = %lld, chunk = %lld", (long long)M, (long long)P, (long long)chunk);
        CHECK(P == 1 || 2 * chunk > kSpChunkMin, "sp_partition(%lld): chunk %lld", (long long)M, (long long)chunk);
    }
    /* scratch sizes: P x C values of the compute type per array */
    const pn_dtype dts[] = {PN_FLOAT32, PN_FLOAT16, PN_BFLOAT16, PN_FLOAT64};
    for (pn_dtype dt : dts)
        for (int64_t rows : {1, 9, 301, 4096, 1000003})
            for (int64_t C : {1, 768, 16385}) {
                int64_t P = 0, chunk = 0;
                partition(rows, C, &P, &chunk);
                const size_t want = (size_t)(P * C * (dt == PN_FLOAT64 ? 8 : 4) * 2);
                CHECK(scratch_bytes_for(rows, 1, C, dt, 2) == want, "scratch_bytes_for(%lld, %lld, dtype %d)",
                      (long long)rows, (long long)C, (int)dt);
                CHECK(pn_cuda_layernorm_backward_scratch_size(rows, 1, C, dt) == want,
                      "pn_cuda_layernorm_backward_scratch_size(%lld, %lld, dtype %d)", (long long)rows, (long long)C,
                      (int)dt);
            }
    CHECK(scratch_bytes_for(0, 1, 8, PN_FLOAT32, 2) == 0, "rows = 0 must give 0");
    CHECK(scratch_bytes_for(INT64_MAX / 2, 4, 8, PN_FLOAT32, 2) == 0, "an overflowing size must give 0");
}

/* row_off against the formula; the spatial walks against division. */
static void check_index_walks(void)
{
    for (int64_t T : {1, 2, 3, 7, 64})
        for (int64_t row = 0; row < 500; ++row) {
            const int64_t sb = 1000 + 3 * T, st = T == 1 ? 0 : 13;
            const int64_t want = T == 1 ? row * sb : (row / T) * sb + (row % T) * st;
            CHECK(row_off(row, T, sb, st) == want, "row_off(%lld, %lld)", (long long)row, (long long)T);
        }
    /* B x T x H rows (per-head views): row (b, t, k) at b*sb + t*st + k*sh, T
     * counting heads (T_user * H); H = 1 is the two-stride form */
    for (int64_t Tu : {1, 2, 5})
        for (int64_t H : {1, 2, 3, 8}) {
            const int64_t T = Tu * H, sb = 7919, st = -97, sh = 1031;
            for (int64_t b = 0, row = 0; b < 4; ++b)
                for (int64_t t = 0; t < Tu; ++t)
                    for (int64_t k = 0; k < H; ++k, ++row) {
                        const int64_t want = H == 1 ? row_off(row, T, sb, st) : b * sb + t * st + k * sh;
                        CHECK(row_off(row, T, H, sb, st, sh) == want, "row_off(%lld, T %lld, H %lld)", (long long)row,
                              (long long)T, (long long)H);
                    }
        }
    uint64_t seed = 12345;
    auto rnd = [&seed](int64_t n) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        return (int64_t)((seed >> 33) % (uint64_t)n);
    };
    for (int trial = 0; trial < 3000; ++trial) {
        const int64_t inner = 1 + rnd(trial < 1500 ? 40 : 5000);
        const int64_t C = 1 + rnd(300);
        const int64_t stride = 1 + rnd(trial % 3 == 0 ? 4096 : 600);
        const int64_t i0 = rnd(5000);
        Walk2 w;
        ChanWalk cw;
        w.init(i0, stride, inner);
        cw.init(i0, stride, inner, C);
        for (int64_t i = i0, n = 0; n < 200; i += stride, ++n, w.next(), cw.next()) {
            if (w.o != i / inner || w.in != i % inner) {
                CHECK(false, "Walk2(inner %lld, stride %lld) at %lld: (%lld, %lld)", (long long)inner,
                      (long long)stride, (long long)i, (long long)w.o, (long long)w.in);
                break;
            }
            if (cw.c != (i / inner) % C || cw.s != i % inner) {
                CHECK(false, "ChanWalk(inner %lld, C %lld, stride %lld) at %lld: c = %lld", (long long)inner,
                      (long long)C, (long long)stride, (long long)i, (long long)cw.c);
                break;
            }
        }
    }
    CHECK(elem_grid(1) == 1 && elem_grid(256) == 1 && elem_grid(257) == 2 && elem_grid(INT64_MAX / 2) == 65535,
          "elem_grid");
    CHECK(grid_for(kGridCap + 5) == (unsigned)kGridCap && grid_for(3) == 3, "grid_for");
    CHECK(round_up32(1) == 32 && round_up32(32) == 32 && round_up32(33) == 64, "round_up32");
}

/* Argument checks that return before anything is queued: these run without a
 * device (the library links the CUDA runtime statically and touches the
 * driver only to launch). */
static void check_shard_arguments(void)
{
    double parts[2 * 70] = {0}, mean[1], rstd[1];
    int64_t widths[PN_CUDA_MAX_SHARDS + 1];
    for (int i = 0; i <= PN_CUDA_MAX_SHARDS; ++i) widths[i] = 3;
    const int too_many = PN_CUDA_MAX_SHARDS + 1;
    CHECK(pn_cuda_layernorm_shard_combine(mean, rstd, parts, widths, too_many, 1, 1e-5, 0) == PN_ERR_SIZE,
          "layernorm combine: %d shards", too_many);
    CHECK(pn_cuda_rmsnorm_shard_combine(rstd, parts, widths, too_many, 1, 1e-5, 0) == PN_ERR_SIZE,
          "rmsnorm combine: %d shards", too_many);
    CHECK(pn_cuda_batchnorm_shard_combine(mean, rstd, NULL, NULL, parts, widths, too_many, 1, 1e-5, 0.1, 1, 0,
                                          PN_FLOAT32, 0) == PN_ERR_SIZE,
          "batchnorm combine: %d shards", too_many);
    CHECK(pn_cuda_layernorm_shard_combine(mean, rstd, parts, widths, 0, 1, 1e-5, 0) == PN_ERR_SIZE, "0 shards");
    CHECK(pn_cuda_layernorm_shard_combine(mean, rstd, parts, NULL, 2, 1, 1e-5, 0) == PN_ERR_NULL, "widths NULL");
    int64_t bad[2] = {3, 0};
    CHECK(pn_cuda_layernorm_shard_combine(mean, rstd, parts, bad, 2, 1, 1e-5, 0) == PN_ERR_SIZE, "a zero width");
    int64_t huge[2] = {INT64_MAX, 1};
    CHECK(pn_cuda_rmsnorm_shard_combine(rstd, parts, huge, 2, 1, 1e-5, 0) == PN_ERR_SIZE, "widths overflow");
    int64_t neg[2] = {5, -1};
    CHECK(pn_cuda_batchnorm_shard_combine(mean, rstd, NULL, NULL, parts, neg, 2, 1, 1e-5, 0.1, 1, 0, PN_FLOAT32, 0) ==
              PN_ERR_SIZE,
          "a negative count");
    CHECK(pn_cuda_layernorm_shard_combine(mean, rstd, parts, widths, 2, 1, -1.0, 0) == PN_ERR_EPS, "eps < 0");
}

int main(void)
{
    check_plans();
    check_partitions();
    check_index_walks();
    check_shard_arguments();
    if (failures) {
        fprintf(stderr, "test_launch: %d check(s) failed\n", failures);
        return 1;
    }
    printf("test_launch: all checks passed\n");
    return 0;
}

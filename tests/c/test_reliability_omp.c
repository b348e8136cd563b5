/* test_reliability_omp.c - pynorm called from the caller's own threads.
 *
 *   1. From inside the caller's `#pragma omp parallel` region, every thread
 *      calls all six token-norm functions on sizes large enough that the
 *      library opens its own parallel region. With OpenMP's default of one
 *      active level that inner region runs on the calling thread alone: the
 *      results are bit-identical to serial calls, nothing deadlocks, and the
 *      process does not grow more threads than the caller's team.
 *   2. The same with nested parallelism enabled by the caller
 *      (max-active-levels 2) and pn_set_num_threads(2): every call opens a
 *      team of its own; still bit-identical, still no deadlock.
 *   3. Plain POSIX threads (no OpenMP in the caller), each calling the
 *      functions in a loop while another thread changes pn_set_num_threads:
 *      bit-identical results (the thread count never changes bits).
 *   4. The caller's OpenMP settings (max threads, dynamic, max active
 *      levels) are what they were before.
 *
 * Run by ctest with a timeout (a deadlock fails the test rather than hanging
 * it), and by tests/run_reliability.sh under ThreadSanitizer (clang + libomp
 * with its TSan annotations, the archer tool).
 */
#define _GNU_SOURCE   /* /proc reads */
#include <omp.h>
#include <pthread.h>
#include <sched.h>

#include "testutil.h"

enum { OP_LN_FWD = 0, OP_LN_ADD, OP_LN_BWD, OP_RMS_FWD, OP_RMS_ADD, OP_RMS_BWD, OP_N };
static const char *op_names[OP_N] = {"layernorm_forward", "add_layernorm_forward", "layernorm_backward",
                                     "rmsnorm_forward", "add_rmsnorm_forward", "rmsnorm_backward"};

/* one problem: inputs shared by every thread, outputs per thread */
#define B_ 3
#define T_ 37
#define C_ 320    /* B*T*C = 35520 elements: above the library's threading threshold */
#define N_ ((size_t)B_ * T_ * C_)
#define ROWS_ (B_ * T_)

typedef struct {
    float *out, *h, *mean, *rstd, *dinp, *dw, *db;
} outs_t;

static float *x, *res, *w, *b, *dy, *smean, *srstd;   /* shared inputs */

static outs_t outs_new(void)
{
    outs_t o;
    o.out = (float *)tu_xmalloc(N_ * 4);
    o.h = (float *)tu_xmalloc(N_ * 4);
    o.dinp = (float *)tu_xmalloc(N_ * 4);
    o.mean = (float *)tu_xmalloc(ROWS_ * 4);
    o.rstd = (float *)tu_xmalloc(ROWS_ * 4);
    o.dw = (float *)tu_xmalloc(C_ * 4);
    o.db = (float *)tu_xmalloc(C_ * 4);
    return o;
}

static void outs_free(outs_t *o)
{
    free(o->out); free(o->h); free(o->dinp); free(o->mean); free(o->rstd); free(o->dw); free(o->db);
}

static void outs_clear(outs_t *o)
{
    memset(o->out, 0xA5, N_ * 4);
    memset(o->h, 0xA5, N_ * 4);
    memset(o->dinp, 0xA5, N_ * 4);
    memset(o->mean, 0xA5, ROWS_ * 4);
    memset(o->rstd, 0xA5, ROWS_ * 4);
    memset(o->dw, 0xA5, C_ * 4);
    memset(o->db, 0xA5, C_ * 4);
}

static pn_status call(int op, outs_t *o)
{
    switch (op) {
    case OP_LN_FWD:
        return pn_layernorm_forward(o->out, o->mean, o->rstd, x, w, b, B_, T_, C_, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL);
    case OP_LN_ADD:
        return pn_add_layernorm_forward(o->out, o->h, o->mean, o->rstd, x, res, w, b, B_, T_, C_, 1e-5, PN_FLOAT32,
                                        PN_FLOAT32, NULL);
    case OP_LN_BWD:
        return pn_layernorm_backward(o->dinp, o->dw, o->db, NULL, 0, dy, x, w, smean, srstd, B_, T_, C_, 0,
                                     PN_FLOAT32, PN_FLOAT32, NULL);
    case OP_RMS_FWD:
        return pn_rmsnorm_forward(o->out, o->rstd, x, w, B_, T_, C_, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL);
    case OP_RMS_ADD:
        return pn_add_rmsnorm_forward(o->out, o->h, o->rstd, x, res, w, B_, T_, C_, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL);
    default:
        return pn_rmsnorm_backward(o->dinp, o->dw, NULL, 0, dy, x, w, srstd, B_, T_, C_, 0, PN_FLOAT32, PN_FLOAT32,
                                   NULL);
    }
}

/* the outputs op writes, compared bytewise */
static int same(int op, const outs_t *a, const outs_t *e)
{
    int ok = 1;
    switch (op) {
    case OP_LN_ADD:
        ok &= memcmp(a->h, e->h, N_ * 4) == 0;
        /* fall through */
    case OP_LN_FWD:
        ok &= memcmp(a->out, e->out, N_ * 4) == 0 && memcmp(a->mean, e->mean, ROWS_ * 4) == 0 &&
              memcmp(a->rstd, e->rstd, ROWS_ * 4) == 0;
        break;
    case OP_RMS_ADD:
        ok &= memcmp(a->h, e->h, N_ * 4) == 0;
        /* fall through */
    case OP_RMS_FWD:
        ok &= memcmp(a->out, e->out, N_ * 4) == 0 && memcmp(a->rstd, e->rstd, ROWS_ * 4) == 0;
        break;
    case OP_LN_BWD:
        ok &= memcmp(a->db, e->db, C_ * 4) == 0;
        /* fall through */
    default:
        ok &= memcmp(a->dinp, e->dinp, N_ * 4) == 0 && memcmp(a->dw, e->dw, C_ * 4) == 0;
        break;
    }
    return ok;
}

static outs_t expected[OP_N];

static int largest_team = 1;

static int process_threads(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    int n = -1;
    if (!f) return -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "Threads: %d", &n) == 1) break;
    fclose(f);
    return n;
}

/* ---- 1 and 2: calls from inside the caller's parallel region ------------ */

static void from_parallel_region(int team, int nested, int lib_threads)
{
    int bad_status = 0, mismatch = 0, rounds = 3;
    int max_threads_seen = 0;
    outs_t per[8];
    int t;
    omp_set_max_active_levels(nested ? 2 : 1);
    pn_set_num_threads(lib_threads);
    for (t = 0; t < team; t++) per[t] = outs_new();
    if (team > largest_team) largest_team = team;   /* the runtime keeps its idle threads */
#pragma omp parallel num_threads(team) reduction(+ : bad_status, mismatch) reduction(max : max_threads_seen)
    {
        int me = omp_get_thread_num(), r, op;
        for (r = 0; r < rounds; r++)
            for (op = 0; op < OP_N; op++) {
                int k = (op + me + r) % OP_N;   /* threads run different ops at once */
                outs_clear(&per[me]);
                if (call(k, &per[me]) != PN_OK) bad_status++;
                if (!same(k, &per[me], &expected[k])) mismatch++;
                {
                    int n = process_threads();
                    if (n > max_threads_seen) max_threads_seen = n;
                }
            }
    }
    for (t = 0; t < team; t++) outs_free(&per[t]);
    tu_check(bad_status == 0 && mismatch == 0,
             "%d caller threads in an omp parallel region (max-active-levels %d, pn threads %d): "
             "%d calls, %d bad statuses, %d results differing from serial", team, nested ? 2 : 1, lib_threads,
             team * rounds * OP_N, bad_status, mismatch);
    if (!nested) {
        /* one active level: the library's inner regions are inactive and
         * start no threads; the caller's team (plus, at most, the runtime's
         * helper thread) is all there is */
        tu_check(max_threads_seen <= largest_team + 1,
                 "no oversubscription: at most %d threads in the process during the calls (team of %d, "
                 "largest team so far %d)", max_threads_seen, team, largest_team);
    } else {
        tu_check(1, "nested: at most %d threads in the process (team %d x library %d allowed)", max_threads_seen,
                 team, lib_threads);
    }
}

/* ---- 3: POSIX threads -------------------------------------------------- */

typedef struct {
    int id, bad, mismatch;
} worker_t;

static volatile int stop_flipping;
static long flips;   /* pn_set_num_threads calls made while the workers ran */

static void *worker(void *arg)
{
    worker_t *wk = (worker_t *)arg;
    outs_t o = outs_new();
    int r, op;
    for (r = 0; r < 4; r++)
        for (op = 0; op < OP_N; op++) {
            int k = (op + wk->id) % OP_N;
            outs_clear(&o);
            if (call(k, &o) != PN_OK) wk->bad++;
            if (!same(k, &o, &expected[k])) wk->mismatch++;
        }
    outs_free(&o);
    return NULL;
}

static void *flipper(void *arg)
{
    long i = 0;
    (void)arg;
    while (!__atomic_load_n(&stop_flipping, __ATOMIC_RELAXED)) {
        pn_set_num_threads((int)(i % 4));   /* 0 (default), 1, 2, 3 */
        i++;
        /* let the workers run: under valgrind, which runs one thread at a
         * time, a flipper that never yields took 90 s of a 1 s test */
        sched_yield();
    }
    flips = i;
    return NULL;
}

static void from_pthreads(int n)
{
    pthread_t th[8], fl;
    worker_t wk[8];
    int i, bad = 0, mismatch = 0;
    stop_flipping = 0;
    pthread_create(&fl, NULL, flipper, NULL);
    for (i = 0; i < n; i++) {
        wk[i].id = i; wk[i].bad = 0; wk[i].mismatch = 0;
        pthread_create(&th[i], NULL, worker, &wk[i]);
    }
    for (i = 0; i < n; i++) {
        pthread_join(th[i], NULL);
        bad += wk[i].bad;
        mismatch += wk[i].mismatch;
    }
    __atomic_store_n(&stop_flipping, 1, __ATOMIC_RELAXED);
    pthread_join(fl, NULL);
    pn_set_num_threads(0);
    tu_check(bad == 0 && mismatch == 0,
             "%d POSIX threads calling at once while another changes pn_set_num_threads (%ld times): "
             "%d bad statuses, %d results differing from serial", n, flips, bad, mismatch);
}

int main(void)
{
    tu_rng rng;
    size_t i;
    int op;
    const int max_threads0 = omp_get_max_threads(), dynamic0 = omp_get_dynamic();
    const int levels0 = omp_get_max_active_levels();

    printf("pynorm %s, isa %s, omp_get_max_threads %d\n", pn_version(), pn_isa(), max_threads0);
    rng.s = 77;
    x = (float *)tu_xmalloc(N_ * 4); res = (float *)tu_xmalloc(N_ * 4); dy = (float *)tu_xmalloc(N_ * 4);
    w = (float *)tu_xmalloc(C_ * 4); b = (float *)tu_xmalloc(C_ * 4);
    smean = (float *)tu_xmalloc(ROWS_ * 4); srstd = (float *)tu_xmalloc(ROWS_ * 4);
    for (i = 0; i < N_; i++) {
        x[i] = (float)(tu_normal(&rng) + 0.5);
        res[i] = (float)tu_normal(&rng);
        dy[i] = (float)tu_normal(&rng);
    }
    for (i = 0; i < C_; i++) {
        w[i] = (float)(1 + 0.1 * tu_normal(&rng));
        b[i] = (float)(0.1 * tu_normal(&rng));
    }

    /* serial results, one library thread */
    pn_set_num_threads(1);
    for (op = 0; op < OP_N; op++) expected[op] = outs_new();
    {
        outs_t tmp = outs_new();
        tu_check(pn_layernorm_forward(tmp.out, smean, srstd, x, w, b, B_, T_, C_, 1e-5, PN_FLOAT32, PN_FLOAT32,
                                      NULL) == PN_OK, "statistics for the backward");
        outs_free(&tmp);
    }
    for (op = 0; op < OP_N; op++) {
        outs_clear(&expected[op]);
        tu_check(call(op, &expected[op]) == PN_OK, "serial %s", op_names[op]);
    }

    from_parallel_region(4, 0, 0);
    from_parallel_region(3, 0, 2);
    from_parallel_region(2, 1, 2);
    from_parallel_region(3, 1, 0);
    omp_set_max_active_levels(levels0);
    pn_set_num_threads(0);
    from_pthreads(4);

    tu_check(omp_get_max_threads() == max_threads0 && omp_get_dynamic() == dynamic0 &&
                 omp_get_max_active_levels() == levels0,
             "caller's OpenMP settings unchanged: max threads %d (was %d), dynamic %d (was %d), "
             "max active levels %d (was %d)", omp_get_max_threads(), max_threads0, omp_get_dynamic(), dynamic0,
             omp_get_max_active_levels(), levels0);

    for (op = 0; op < OP_N; op++) outs_free(&expected[op]);
    free(x); free(res); free(dy); free(w); free(b); free(smean); free(srstd);
    return tu_summary();
}

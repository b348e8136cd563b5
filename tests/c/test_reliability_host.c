/* test_reliability_host.c - loading and calling pynorm leaves the host
 * process as it was.
 *
 * The program records the process state, dlopen()s libpynorm (path in argv[1])
 * and calls every token-norm function (valid calls of every dtype, threaded
 * sizes, and refused calls), pn_set_num_threads, pn_copy_bandwidth and the
 * buffer cache, then compares:
 *
 *   - the SSE control register (MXCSR) without its sticky exception flags:
 *     flush-to-zero, denormals-are-zero, rounding mode and exception masks
 *     (a library built with -ffast-math would set FTZ/DAZ at load time);
 *     also with the caller's own non-default setting (FTZ+DAZ on, rounding
 *     toward zero), which must survive the calls too;
 *   - the x87 control word and fegetround();
 *   - every signal's disposition (sigaction: handler, flags, mask) and the
 *     thread's signal mask;
 *   - the caller's OpenMP settings (omp_get_max_threads, dynamic, max active
 *     levels, schedule, thread limit) and every OMP_/GOMP_/KMP_ environment
 *     variable;
 *   - the standard output and error: nothing printed, by valid or refused
 *     calls (the library never prints).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <fenv.h>
#include <omp.h>
#include <signal.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PN_HAVE_MXCSR 1
#endif

#include "testutil.h"

extern char **environ;

/* the library's functions, through dlsym */
typedef pn_status (*ln_fwd_t)(void *, void *, void *, const void *, const void *, const void *, int64_t, int64_t,
                              int64_t, double, pn_dtype, pn_dtype, const pn_strides *);
typedef pn_status (*ln_add_t)(void *, void *, void *, void *, const void *, const void *, const void *,
                              const void *, int64_t, int64_t, int64_t, double, pn_dtype, pn_dtype,
                              const pn_strides *);
typedef pn_status (*ln_bwd_t)(void *, void *, void *, void *, size_t, const void *, const void *, const void *,
                              const void *, const void *, int64_t, int64_t, int64_t, int, pn_dtype, pn_dtype,
                              const pn_strides *);
typedef pn_status (*rms_fwd_t)(void *, void *, const void *, const void *, int64_t, int64_t, int64_t, double,
                               pn_dtype, pn_dtype, const pn_strides *);
typedef pn_status (*rms_add_t)(void *, void *, void *, const void *, const void *, const void *, int64_t, int64_t,
                               int64_t, double, pn_dtype, pn_dtype, const pn_strides *);
typedef pn_status (*rms_bwd_t)(void *, void *, void *, size_t, const void *, const void *, const void *,
                               const void *, int64_t, int64_t, int64_t, int, pn_dtype, pn_dtype,
                               const pn_strides *);

/* ---- the state we compare -------------------------------------------------- */

typedef struct {
    unsigned mxcsr;            /* control bits only */
    unsigned short x87cw;
    int round;
    struct sigaction act[65];
    sigset_t mask;
    int omp_max, omp_dyn, omp_levels, omp_limit, sched_chunk;
    omp_sched_t sched;
    char *env;                 /* OMP_/GOMP_/KMP_ variables, joined */
} state_t;

static unsigned get_mxcsr(void)
{
#ifdef PN_HAVE_MXCSR
    return _mm_getcsr() & ~0x3Fu;   /* drop the six sticky exception flags */
#else
    return 0;
#endif
}

static unsigned short get_x87(void)
{
#if defined(__x86_64__) || defined(__i386__)
    unsigned short cw;
    __asm__ __volatile__("fnstcw %0" : "=m"(cw));
    return cw;
#else
    return 0;
#endif
}

static char *omp_env(void)
{
    size_t n = 1, k;
    char **e, *s;
    for (e = environ; *e; e++)
        if (!strncmp(*e, "OMP_", 4) || !strncmp(*e, "GOMP_", 5) || !strncmp(*e, "KMP_", 4)) n += strlen(*e) + 1;
    s = (char *)tu_xmalloc(n);
    k = 0;
    for (e = environ; *e; e++)
        if (!strncmp(*e, "OMP_", 4) || !strncmp(*e, "GOMP_", 5) || !strncmp(*e, "KMP_", 4)) {
            memcpy(s + k, *e, strlen(*e));
            k += strlen(*e);
            s[k++] = ';';
        }
    s[k] = 0;
    return s;
}

static void record(state_t *s)
{
    int sig;
    s->mxcsr = get_mxcsr();
    s->x87cw = get_x87();
    s->round = fegetround();
    for (sig = 1; sig < 65; sig++) {
        memset(&s->act[sig], 0, sizeof s->act[sig]);
        sigaction(sig, NULL, &s->act[sig]);
    }
    sigprocmask(SIG_BLOCK, NULL, &s->mask);
    s->omp_max = omp_get_max_threads();
    s->omp_dyn = omp_get_dynamic();
    s->omp_levels = omp_get_max_active_levels();
    s->omp_limit = omp_get_thread_limit();
    omp_get_schedule(&s->sched, &s->sched_chunk);
    s->env = omp_env();
}

static void forget(state_t *s)
{
    free(s->env);
    s->env = NULL;
}

static int same_sigset(const sigset_t *a, const sigset_t *b)
{
    int sig;
    for (sig = 1; sig < 65; sig++)
        if (sigismember(a, sig) != sigismember(b, sig)) return 0;
    return 1;
}

static void compare(const char *when, const state_t *a, const state_t *b)
{
    int sig, bad_sigs = 0, first_bad = 0;
    tu_check(a->mxcsr == b->mxcsr, "%s: MXCSR control bits %#x (were %#x; FTZ=%d DAZ=%d)", when, b->mxcsr, a->mxcsr,
             (b->mxcsr >> 15) & 1, (b->mxcsr >> 6) & 1);
    tu_check(a->x87cw == b->x87cw && a->round == b->round, "%s: x87 control word %#x (was %#x), fegetround %d (was %d)",
             when, b->x87cw, a->x87cw, b->round, a->round);
    for (sig = 1; sig < 65; sig++) {
        const struct sigaction *x = &a->act[sig], *y = &b->act[sig];
        if (x->sa_handler != y->sa_handler || x->sa_flags != y->sa_flags || !same_sigset(&x->sa_mask, &y->sa_mask)) {
            if (!bad_sigs) first_bad = sig;
            bad_sigs++;
        }
    }
    tu_check(bad_sigs == 0, "%s: signal dispositions of signals 1..64 unchanged (%d changed, first %d)", when,
             bad_sigs, first_bad);
    tu_check(same_sigset(&a->mask, &b->mask), "%s: the thread's signal mask unchanged", when);
    tu_check(a->omp_max == b->omp_max && a->omp_dyn == b->omp_dyn && a->omp_levels == b->omp_levels &&
                 a->omp_limit == b->omp_limit && a->sched == b->sched && a->sched_chunk == b->sched_chunk,
             "%s: OpenMP settings unchanged (max threads %d, dynamic %d, max active levels %d, thread limit %d, "
             "schedule %d/%d)", when, b->omp_max, b->omp_dyn, b->omp_levels, b->omp_limit, (int)b->sched,
             b->sched_chunk);
    tu_check(strcmp(a->env, b->env) == 0, "%s: OMP_/GOMP_/KMP_ environment unchanged (\"%s\")", when, b->env);
}

/* ---- the calls --------------------------------------------------------------- */

static ln_fwd_t ln_fwd;
static ln_add_t ln_add;
static ln_bwd_t ln_bwd;
static rms_fwd_t rms_fwd;
static rms_add_t rms_add;
static rms_bwd_t rms_bwd;
static void (*set_threads)(int);
static pn_status (*copy_bw)(double *, int64_t, int);
static void *(*buf_alloc)(size_t);
static void (*buf_free)(void *, size_t);
static void (*buf_trim)(void);

/* Every op in every dtype on sizes that thread, values with denormals and
 * NaN/Inf, then a handful of refused calls. Returns the number of statuses
 * that were not what was expected. */
static int exercise(void)
{
    static const pn_dtype dts[4] = {PN_FLOAT32, PN_FLOAT16, PN_BFLOAT16, PN_FLOAT64};
    const int64_t B = 4, T = 33, C = 300;   /* 39600 elements: threaded */
    const size_t n = (size_t)(B * T * C);
    unsigned char *x = tu_xmalloc(n * 8), *r = tu_xmalloc(n * 8), *y = tu_xmalloc(n * 8), *h = tu_xmalloc(n * 8);
    unsigned char *dx = tu_xmalloc(n * 8), *w = tu_xmalloc(C * 8), *bb = tu_xmalloc(C * 8), *dw = tu_xmalloc(C * 8);
    unsigned char *db = tu_xmalloc(C * 8), *mean = tu_xmalloc(B * T * 8), *rstd = tu_xmalloc(B * T * 8);
    int bad = 0, d, t;
    size_t i;
    tu_rng rng;
    rng.s = 5;
    for (d = 0; d < 4; d++) {
        pn_dtype dt = dts[d];
        for (i = 0; i < n; i++) {
            double v = tu_normal(&rng);
            if (i % 97 == 0) v = 1e-40;            /* float32 denormal */
            if (i % 1013 == 0) v = 1e-310;         /* float64 denormal */
            if (i == 5000) v = NAN;
            if (i == 7000) v = INFINITY;
            tu_store(x, dt, (int64_t)i, v);
            tu_store(r, dt, (int64_t)i, tu_normal(&rng) * 1e-3);
        }
        for (i = 0; i < (size_t)C; i++) {
            tu_store(w, dt, (int64_t)i, 1 + 0.1 * tu_normal(&rng));
            tu_store(bb, dt, (int64_t)i, 0.1 * tu_normal(&rng));
        }
        for (t = 0; t < 3; t++) {
            set_threads(t);   /* 0 (default), 1, 2 */
            bad += ln_fwd(y, mean, rstd, x, w, bb, B, T, C, 1e-5, dt, dt, NULL) != PN_OK;
            bad += ln_add(y, h, mean, rstd, x, r, w, bb, B, T, C, 1e-5, dt, dt, NULL) != PN_OK;
            bad += ln_bwd(dx, dw, db, NULL, 0, r, x, w, mean, rstd, B, T, C, 0, dt, dt, NULL) != PN_OK;
            bad += rms_fwd(y, rstd, x, w, B, T, C, 1e-6, dt, dt, NULL) != PN_OK;
            bad += rms_add(y, h, rstd, x, r, w, B, T, C, 0.0, dt, dt, NULL) != PN_OK;
            bad += rms_bwd(dx, dw, NULL, 0, r, x, w, rstd, B, T, C, PN_ACCUMULATE, dt, dt, NULL) != PN_OK;
        }
        /* refused calls */
        bad += ln_fwd(y, mean, rstd, NULL, w, bb, B, T, C, 1e-5, dt, dt, NULL) != PN_ERR_NULL;
        bad += ln_fwd(y, mean, rstd, x, w, bb, B, T, C, -1.0, dt, dt, NULL) != PN_ERR_EPS;
        bad += rms_fwd(x, rstd, x, w, B, T, 0, 1e-6, dt, dt, NULL) != PN_ERR_SIZE;
        bad += rms_bwd(dx, dw, NULL, 0, r, x, w, rstd, B, T, C, 7, dt, dt, NULL) != PN_ERR_ARG;
        bad += ln_bwd(dx, dw, db, dw, 1, r, x, w, mean, rstd, B, T, C, 0, dt, dt, NULL) != PN_ERR_SCRATCH;
        bad += rms_add(y, y, rstd, x, r, w, B, T, C, 0.0, dt, dt, NULL) != PN_ERR_ALIAS;
        bad += ln_fwd(y, mean, rstd, x, w, bb, B, T, C, 1e-5, dt, (pn_dtype)17, NULL) != PN_ERR_DTYPE;
    }
    set_threads(3);
    {
        double g = 0;
        void *p;
        bad += copy_bw(&g, 1 << 20, 2) != PN_OK;
        p = buf_alloc(3 << 20);
        if (p) {
            memset(p, 0, 3 << 20);
            buf_free(p, 3 << 20);
        }
        buf_trim();
    }
    set_threads(0);
    free(x); free(r); free(y); free(h); free(dx); free(w); free(bb); free(dw); free(db); free(mean); free(rstd);
    return bad;
}

/* Runs exercise() with stdout/stderr redirected to a temporary file; returns
 * the bytes written there. */
static long exercise_silently(int *bad)
{
    char path[] = "/tmp/pn_host_XXXXXX";
    int fd = mkstemp(path), out, err;
    long size;
    if (fd < 0) { *bad = exercise(); return 0; }
    fflush(stdout);
    fflush(stderr);
    out = dup(1);
    err = dup(2);
    dup2(fd, 1);
    dup2(fd, 2);
    *bad = exercise();
    fflush(stdout);
    fflush(stderr);
    dup2(out, 1);
    dup2(err, 2);
    close(out);
    close(err);
    size = (long)lseek(fd, 0, SEEK_END);
    close(fd);
    unlink(path);
    return size;
}

#define LOAD(var, name)                                                                                 \
    do {                                                                                                \
        *(void **)(&var) = dlsym(lib, name);                                                            \
        if (!var) { tu_check(0, "dlsym(%s)", name); return tu_summary(); }                              \
    } while (0)

int main(int argc, char **argv)
{
    state_t before, after;
    void *lib;
    int bad;
    long printed;
    if (argc < 2) {
        fprintf(stderr, "usage: %s path/to/libpynorm.so\n", argv[0]);
        return 2;
    }
    record(&before);
    lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        tu_check(0, "dlopen(%s): %s", argv[1], dlerror());
        return tu_summary();
    }
    record(&after);
    compare("after dlopen", &before, &after);
    LOAD(ln_fwd, "pn_layernorm_forward");
    LOAD(ln_add, "pn_add_layernorm_forward");
    LOAD(ln_bwd, "pn_layernorm_backward");
    LOAD(rms_fwd, "pn_rmsnorm_forward");
    LOAD(rms_add, "pn_add_rmsnorm_forward");
    LOAD(rms_bwd, "pn_rmsnorm_backward");
    LOAD(set_threads, "pn_set_num_threads");
    LOAD(copy_bw, "pn_copy_bandwidth");
    LOAD(buf_alloc, "pn_buffer_alloc");
    LOAD(buf_free, "pn_buffer_free");
    LOAD(buf_trim, "pn_buffer_trim");

    printed = exercise_silently(&bad);
    tu_check(bad == 0, "every call returned the expected status (%d did not)", bad);
    tu_check(printed == 0, "nothing printed to stdout/stderr by the calls (%ld bytes)", printed);
    forget(&after);
    record(&after);
    compare("after the calls", &before, &after);

#ifdef PN_HAVE_MXCSR
    {
        /* the caller's own setting: FTZ + DAZ on, round toward zero */
        unsigned saved = _mm_getcsr();
        _mm_setcsr((saved | 0x8040u | 0x6000u) & ~0x3Fu);
        forget(&before);
        forget(&after);
        record(&before);
        printed = exercise_silently(&bad);
        record(&after);
        compare("caller with FTZ+DAZ and round-toward-zero, after the calls", &before, &after);
        _mm_setcsr(saved);
    }
#endif
    forget(&before);
    forget(&after);
    dlclose(lib);
    return tu_summary();
}

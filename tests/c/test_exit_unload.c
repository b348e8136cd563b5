/* test_exit_unload.c - a host that dlopen()s libpynorm, calls it on two
 * threads and dlclose()s it keeps running, and exits cleanly.
 *
 * After a threaded call, OpenMP's worker threads stay alive between parallel
 * regions, waiting inside the OpenMP runtime (libgomp) that libpynorm brought
 * into the process: spinning with OMP_WAIT_POLICY=active, spinning and then
 * sleeping by default, sleeping with passive. If dlclose() unmapped libpynorm
 * and with it that runtime, a waiting thread would fetch its next instruction
 * from an unmapped page: SIGSEGV, right away or at exit. The library is
 * therefore never unloaded (linked with -z nodelete), and neither are the
 * libraries it depends on.
 *
 * Each round: dlopen (argv[1]), one LayerNorm forward of 512 x 1024 float32
 * rows on 2 threads (results checked), dlclose, 50 ms of sleep during which a
 * worker left in unmapped code would fault; then, where /proc/self/maps
 * exists, a check that every file the dlopen mapped is still mapped. Three
 * rounds, then exit.
 *
 * This program links neither libpynorm nor an OpenMP runtime, so nothing but
 * the dlopen holds them. ctest runs it with OMP_WAIT_POLICY active and passive.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <time.h>

#include "testutil.h"

#define ROUNDS 3
#define ROWS 512
#define COLS 1024
#define MAX_FILES 512

typedef pn_status (*ln_fwd_t)(void *, void *, void *, const void *, const void *, const void *, int64_t, int64_t,
                              int64_t, double, pn_dtype, pn_dtype, const pn_strides *);
typedef void (*set_threads_t)(int);

/* ---- the files mapped into this process (/proc/self/maps) ------------------ */

typedef struct {
    int n;
    char *path[MAX_FILES];
} files_t;

/* Returns 0 where the system has no /proc/self/maps. */
static int mapped_files(files_t *f)
{
    char line[4096];
    FILE *maps = fopen("/proc/self/maps", "r");
    f->n = 0;
    if (!maps) return 0;
    while (fgets(line, sizeof line, maps)) {
        char *p = strchr(line, '/');   /* the path field, the only one holding '/' */
        int i, seen = 0;
        if (!p) continue;
        p[strcspn(p, "\n")] = '\0';
        for (i = 0; i < f->n && !seen; i++) seen = strcmp(f->path[i], p) == 0;
        if (seen || f->n == MAX_FILES) continue;
        f->path[f->n] = tu_xmalloc(strlen(p) + 1);
        strcpy(f->path[f->n++], p);
    }
    fclose(maps);
    return 1;
}

static int has_file(const files_t *f, const char *path)
{
    int i;
    for (i = 0; i < f->n; i++)
        if (strcmp(f->path[i], path) == 0) return 1;
    return 0;
}

static void forget(files_t *f)
{
    while (f->n > 0) free(f->path[--f->n]);
}

/* ---- one round -------------------------------------------------------------- */

static void round_trip(const char *libpath, int round, const float *x, float *y)
{
    files_t before, loaded, after;
    int have_maps, i, gone = 0, new_files = 0, omp_runtime = 0;
    struct timespec pause = {0, 50 * 1000 * 1000};
    ln_fwd_t ln_fwd;
    set_threads_t set_threads;
    pn_status st;
    double worst = 0.0;
    void *lib;

    have_maps = mapped_files(&before);
    lib = dlopen(libpath, RTLD_NOW | RTLD_LOCAL);
    if (!tu_check(lib != NULL, "round %d: dlopen(%s)%s%s", round, libpath, lib ? "" : ": ", lib ? "" : dlerror())) {
        forget(&before);
        return;
    }
    mapped_files(&loaded);
    *(void **)(&ln_fwd) = dlsym(lib, "pn_layernorm_forward");
    *(void **)(&set_threads) = dlsym(lib, "pn_set_num_threads");
    if (tu_check(ln_fwd && set_threads, "round %d: dlsym pn_layernorm_forward, pn_set_num_threads", round)) {
        set_threads(2);
        memset(y, 0, sizeof(float) * ROWS * COLS);
        st = ln_fwd(y, NULL, NULL, x, NULL, NULL, ROWS, 1, COLS, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL);
        /* every row of x is 0, 1, ..., COLS-1 shifted by its row index: y is
         * the same standardized ramp on every row */
        for (i = 0; i < ROWS * COLS; i++) {
            double mean = (COLS - 1) / 2.0, sd = sqrt(((double)COLS * COLS - 1) / 12.0);
            double ref = ((i % COLS) - mean) / sd, err = fabs(y[i] - ref);
            if (!(err <= worst)) worst = err;   /* NaN counts */
        }
        tu_check(st == PN_OK && worst < 1e-4, "round %d: threaded LayerNorm forward (status %d, max error %.3g)",
                 round, (int)st, worst);
    }
    tu_check(dlclose(lib) == 0, "round %d: dlclose", round);
    nanosleep(&pause, NULL);   /* the workers keep waiting meanwhile; a fault here kills the test */
    tu_check(1, "round %d: still running 50 ms after dlclose", round);

    if (have_maps) {
        mapped_files(&after);
        for (i = 0; i < loaded.n; i++) {
            if (has_file(&before, loaded.path[i])) continue;
            new_files++;
            if (strstr(loaded.path[i], "omp")) omp_runtime = 1;
            if (!has_file(&after, loaded.path[i])) {
                printf("     unmapped by dlclose: %s\n", loaded.path[i]);
                gone++;
            }
        }
        if (round == 1) {
            /* the first dlopen brings the library and its OpenMP runtime in */
            tu_check(new_files > 0 && omp_runtime,
                     "round 1: dlopen mapped the library and an OpenMP runtime (%d new files)", new_files);
        }
        tu_check(gone == 0, "round %d: every file dlopen mapped is still mapped after dlclose (%d unmapped)",
                 round, gone);
        forget(&after);
    }
    forget(&loaded);
    forget(&before);
}

int main(int argc, char **argv)
{
    const char *policy = getenv("OMP_WAIT_POLICY");
    float *x, *y;
    int i;
    if (argc < 2) {
        fprintf(stderr, "usage: %s path/to/libpynorm.so\n", argv[0]);
        return 2;
    }
    printf("OMP_WAIT_POLICY=%s\n", policy ? policy : "(unset)");
    x = tu_xmalloc(sizeof(float) * ROWS * COLS);
    y = tu_xmalloc(sizeof(float) * ROWS * COLS);
    for (i = 0; i < ROWS * COLS; i++) x[i] = (float)(i % COLS + i / COLS);
    for (i = 1; i <= ROUNDS; i++) round_trip(argv[1], i, x, y);
    free(x);
    free(y);
    return tu_summary();
}

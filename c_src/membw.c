/* membw.c - a STREAM-style memory bandwidth probe.
 *
 * pn_copy_bandwidth() measures what a plain copy loop a[i] = b[i] reaches on
 * this machine with the library's threads, so that the benchmarks can say
 * what fraction of the attainable bandwidth a kernel uses. Like STREAM's Copy
 * it counts the bytes read plus the bytes written (2 * bytes per copy) and
 * uses ordinary stores, the kind the norm kernels use too.
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200112L   /* clock_gettime, posix_memalign */
#endif

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "pynorm.h"
#include "common.h"

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Fill both buffers with the same static partition as the copy, so that each
 * thread's pages are first touched (and placed) by the thread that copies them. */
static void first_touch(double *a, double *b, int64_t n, int nthreads)
{
    int64_t i;
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i = 0; i < n; i++) {
        a[i] = 0.0;
        b[i] = (double)(i & 1023);
    }
}

/* One timed copy; returns its duration in seconds. */
static double timed_copy(double *restrict a, const double *restrict b, int64_t n, int nthreads)
{
    int64_t i;
    double t0 = now_seconds();
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i = 0; i < n; i++) {
        a[i] = b[i];
    }
    return now_seconds() - t0;
}

pn_status pn_copy_bandwidth(double *gbps, int64_t bytes, int repeats)
{
    int64_t n, r;
    double *a = NULL, *b = NULL;
    double best = 0.0;
    volatile double sink;
    int nthreads;

    if (gbps == NULL) return PN_ERR_NULL;
    if (bytes < 4096 || (uint64_t)bytes > (uint64_t)SIZE_MAX) return PN_ERR_SIZE;
    if (repeats < 1) return PN_ERR_ARG;

    n = bytes / (int64_t)sizeof(double);
    if (posix_memalign((void **)&a, 64, (size_t)n * sizeof(double)) != 0) return PN_ERR_ALLOC;
    if (posix_memalign((void **)&b, 64, (size_t)n * sizeof(double)) != 0) {
        free(a);
        return PN_ERR_ALLOC;
    }

    nthreads = pn_threads();
    if (nthreads < 1) nthreads = 1;
    first_touch(a, b, n, nthreads);

    for (r = 0; r < repeats; r++) {
        double t = timed_copy(a, b, n, nthreads);
        if (r == 0 || t < best) best = t;
    }
    sink = a[n - 1];   /* the copies are used: keep the compiler from dropping them */
    (void)sink;

    free(a);
    free(b);
    if (best <= 0.0) best = 1e-9;   /* a clock too coarse to see the copy */
    *gbps = 2.0 * (double)n * (double)sizeof(double) / best / 1e9;
    return PN_OK;
}

/* runtime.c - the library's settings and facts: version, status strings, the
 * instruction set picked for this CPU, thread count, backward scratch, and the
 * output-buffer cache. */
#define _DEFAULT_SOURCE   /* posix_memalign, madvise */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "common.h"

#define PN_STR_(x) #x
#define PN_STR(x) PN_STR_(x)

const char *pn_version(void) {
    return PN_STR(PYNORM_VERSION_MAJOR) "." PN_STR(PYNORM_VERSION_MINOR) "." PN_STR(PYNORM_VERSION_PATCH);
}

const char *pn_status_string(pn_status status) {
    switch (status) {
    case PN_OK: return "ok";
    case PN_ERR_NULL: return "a required pointer is NULL";
    case PN_ERR_SIZE: return "a size is not positive, or a byte count overflows";
    case PN_ERR_DTYPE: return "unsupported dtype, or weight dtype neither the input's nor float32";
    case PN_ERR_EPS: return "eps must be finite and >= 0";
    case PN_ERR_STRIDE: return "output strides make rows overlap";
    case PN_ERR_ALIAS: return "an output overlaps an input or another output";
    case PN_ERR_SCRATCH: return "scratch buffer smaller than the *_scratch_size() query";
    case PN_ERR_ALLOC: return "out of memory for working buffers";
    case PN_ERR_GROUPS: return "num_groups must divide the channel count";
    case PN_ERR_ARG: return "an argument is out of range";
    }
    return "unknown pn_status code";
}

/* ---- instruction set ---------------------------------------------------- */
static int isa_cached = -1;   /* read and written with atomic builtins */

static int detect_isa(void) {
    int best = PN_ISA_GENERIC;
#if defined(PN_X86_VARIANTS) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = PN_ISA_AVX2;
    if (best == PN_ISA_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        best = PN_ISA_AVX512;
#endif
    /* PYNORM_ISA may only lower the choice: a higher one could crash. */
    const char *env = getenv("PYNORM_ISA");
    if (env) {
        int want = !strcmp(env, "generic") ? PN_ISA_GENERIC : !strcmp(env, "avx2") ? PN_ISA_AVX2
                 : !strcmp(env, "avx512") ? PN_ISA_AVX512 : best;
        if (want < best) best = want;
    }
    return best;
}

int pn_isa_index(void) {
    int isa = __atomic_load_n(&isa_cached, __ATOMIC_RELAXED);
    if (isa < 0) {   /* every thread computes the same value: a race here is harmless */
        isa = detect_isa();
        __atomic_store_n(&isa_cached, isa, __ATOMIC_RELAXED);
    }
    return isa;
}

const char *pn_isa(void) {
    static const char *names[3] = {"generic", "avx2", "avx512"};
    return names[pn_isa_index()];
}

/* ---- threads -------------------------------------------------------------- */
static int num_threads_setting = 0;

void pn_set_num_threads(int n) { __atomic_store_n(&num_threads_setting, n > 0 ? n : 0, __ATOMIC_RELAXED); }
int pn_get_num_threads(void) { return __atomic_load_n(&num_threads_setting, __ATOMIC_RELAXED); }

int pn_threads(void) {
    int n = pn_get_num_threads();
    if (n > 0) return n;
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* ---- streaming threshold -------------------------------------------------- */
/* Outputs larger than the last-level cache that a core shares go to memory
 * with non-temporal stores; smaller ones are stored normally: they, and the
 * input, may still be in the cache when the caller reads them (measured: RMSNorm
 * at 24 MiB in and out runs 1.5x faster with ordinary stores on a 32 MiB L3,
 * while at 64 MiB the two kinds of store are even). Linux reports the cache
 * of core 0 in sysfs; elsewhere, or if unreadable, 32 MiB. Clamped to
 * [8, 64] MiB. PYNORM_STREAM_MIN_BYTES=n sets it (tests use it to reach
 * both kinds of store with small arrays). */
static int64_t stream_min_cached = 0;   /* read and written with atomic builtins */

static int64_t last_level_cache_bytes(void) {
    int64_t best = 0;
#ifdef __linux__
    for (int k = 0; k < 8; k++) {
        char path[96], unit = 0;
        long long size = 0;
        int level = 0;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/level", k);
        FILE *f = fopen(path, "r");
        if (!f) break;
        int ok = fscanf(f, "%d", &level) == 1;
        fclose(f);
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", k);
        if (!ok || !(f = fopen(path, "r"))) continue;
        ok = fscanf(f, "%lld%c", &size, &unit) >= 1;
        fclose(f);
        if (!ok || size <= 0 || level < 2) continue;
        if (unit == 'K') size <<= 10;
        else if (unit == 'M') size <<= 20;
        if (size > best) best = size;
    }
#endif
    return best > 0 ? best : (int64_t)32 << 20;
}

int64_t pn_stream_min_bytes(void) {
    int64_t v = __atomic_load_n(&stream_min_cached, __ATOMIC_RELAXED);
    if (v == 0) {   /* every thread computes the same value: a race here is harmless */
        const char *env = getenv("PYNORM_STREAM_MIN_BYTES");
        char *end = NULL;
        const long long set = env ? strtoll(env, &end, 10) : 0;
        if (env && end != env && *end == 0 && set > 0) {
            v = (int64_t)set;
        } else {
            v = last_level_cache_bytes();
            if (v < ((int64_t)8 << 20)) v = (int64_t)8 << 20;
            if (v > ((int64_t)64 << 20)) v = (int64_t)64 << 20;
            v += 1;   /* larger than the cache: an output of exactly its size is not streamed */
        }
        __atomic_store_n(&stream_min_cached, v, __ATOMIC_RELAXED);
    }
    return v;
}

/* ---- backward scratch -------------------------------------------------------- */
size_t pn_token_scratch_size(int64_t B, int64_t T, int64_t C, pn_dtype dtype, int nparam) {
    if (pn_check_sizes(B, T, C, dtype) != PN_OK) return 0;
    const size_t rs = dtype == PN_FLOAT64 ? 8 : 4;
    const size_t cpad = (size_t)((C + 15) & ~(int64_t)15);
    return (size_t)pn_num_chunks(B * T) * (size_t)nparam * cpad * rs + 64;
}

pn_status pn_run_backward(const pn_token_kernel table[3][2], pn_token_args *a, int nparam) {
    void *own = NULL;
    if ((a->dweight || a->dbias) && !a->scratch) {
        own = malloc(pn_token_scratch_size(a->B, a->T, a->C, a->dtype, nparam));
        if (!own) return PN_ERR_ALLOC;
        a->scratch = own;
    }
    pn_status st = pn_run(table, a);
    free(own);
    return st;
}

/* ---- output buffers ------------------------------------------------------------
 * A fresh multi-megabyte buffer costs a page fault per 4 KiB page the first
 * time it is written, often more than the kernel's own work. Freed buffers of
 * at least PN_CACHE_MIN bytes wait here (at most PN_CACHE_SLOTS of them, and
 * PN_CACHE_MAX bytes in all) for the next request of a size they can hold. */
#define PN_CACHE_SLOTS 8
#define PN_CACHE_MIN ((size_t)1 << 20)
#define PN_CACHE_MAX ((size_t)1 << 30)
#define PN_HUGE_PAGE ((size_t)2 << 20)

static struct { void *ptr; size_t bytes; } cache[PN_CACHE_SLOTS];
static size_t cache_bytes = 0;
static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;

/* Big buffers are rounded to whole huge pages so the cache can reuse them for
 * nearby sizes; transparent huge pages cut the page faults of the first use. */
static size_t rounded_size(size_t bytes) {
    if (bytes < PN_CACHE_MIN) return bytes;
    return (bytes + PN_HUGE_PAGE - 1) & ~(PN_HUGE_PAGE - 1);
}

void *pn_buffer_alloc(size_t bytes) {
    void *p = NULL;
    size_t size = rounded_size(bytes ? bytes : 1);
    if (size < bytes) return NULL;   /* rounding overflowed */
    if (size >= PN_CACHE_MIN) {
        pthread_mutex_lock(&cache_lock);
        int best = -1;
        for (int i = 0; i < PN_CACHE_SLOTS; i++)   /* a cached buffer of the same rounded size */
            if (cache[i].ptr && cache[i].bytes == size) { best = i; break; }
        if (best >= 0) {
            p = cache[best].ptr;
            cache[best].ptr = NULL;
            cache_bytes -= cache[best].bytes;
        }
        pthread_mutex_unlock(&cache_lock);
        if (p) return p;
    }
    size_t align = size >= PN_CACHE_MIN ? PN_HUGE_PAGE : 64;
    if (posix_memalign(&p, align, size) != 0) return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (size >= PN_CACHE_MIN) madvise(p, size, MADV_HUGEPAGE);
#endif
    return p;
}

void pn_buffer_free(void *ptr, size_t bytes) {
    if (!ptr) return;
    size_t size = rounded_size(bytes ? bytes : 1);
    if (size >= PN_CACHE_MIN && size <= PN_CACHE_MAX / 4) {
        pthread_mutex_lock(&cache_lock);
        for (int i = 0; i < PN_CACHE_SLOTS; i++)
            if (!cache[i].ptr && cache_bytes + size <= PN_CACHE_MAX) {
                cache[i].ptr = ptr;
                cache[i].bytes = size;
                cache_bytes += size;
                ptr = NULL;
                break;
            }
        pthread_mutex_unlock(&cache_lock);
    }
    free(ptr);
}

void pn_buffer_trim(void) {
    pthread_mutex_lock(&cache_lock);
    for (int i = 0; i < PN_CACHE_SLOTS; i++) {
        free(cache[i].ptr);
        cache[i].ptr = NULL;
    }
    cache_bytes = 0;
    pthread_mutex_unlock(&cache_lock);
}

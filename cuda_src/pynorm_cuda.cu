/* pynorm_cuda.cu - library facts of libpynorm_cuda: version, status strings,
 * the CUDA error behind the last launch failure, device count. */
#include <cuda_runtime.h>

#include "pynorm_cuda.h"

#define PN_STR2(x) #x
#define PN_STR(x) PN_STR2(x)

/* The CUDA error of the last PN_CUDA_ERR_LAUNCH returned on this thread. */
static thread_local int pn_cuda_last_error_value = 0;

void pn_cuda_set_last_error_(int err) { pn_cuda_last_error_value = err; }

extern "C" {

const char *pn_cuda_version(void)
{
    return PN_STR(PYNORM_VERSION_MAJOR) "." PN_STR(PYNORM_VERSION_MINOR) "." PN_STR(PYNORM_VERSION_PATCH);
}

const char *pn_cuda_status_string(int status)
{
    switch (status) {
    case PN_OK: return "ok";
    case PN_ERR_NULL: return "a required pointer is NULL";
    case PN_ERR_SIZE: return "a size is <= 0, or a byte count overflows int64";
    case PN_ERR_DTYPE: return "unknown dtype, or a weight dtype that is not allowed";
    case PN_ERR_EPS: return "eps is negative, NaN or infinite";
    case PN_ERR_STRIDE: return "output rows would overlap each other";
    case PN_ERR_ALIAS: return "an output overlaps an input or another output";
    case PN_ERR_SCRATCH: return "the scratch buffer is missing, smaller than needed or not 16-byte aligned";
    case PN_ERR_ALLOC: return "the library could not allocate its working memory";
    case PN_ERR_GROUPS: return "num_groups does not divide C";
    case PN_ERR_ARG: return "an argument is out of range (flags, or a pointer not aligned to its element size)";
    case PN_CUDA_ERR_LAUNCH: return "a CUDA kernel launch failed (no device, no usable driver, or an earlier CUDA error)";
    default: return "unknown status";
    }
}

int pn_cuda_last_error(void) { return pn_cuda_last_error_value; }

const char *pn_cuda_last_error_string(void)
{
    if (pn_cuda_last_error_value == 0) return "no error";
    return cudaGetErrorString((cudaError_t)pn_cuda_last_error_value);
}

int pn_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();   /* do not leave the failure for the caller's next check */
        return 0;
    }
    return n;
}

} /* extern "C" */

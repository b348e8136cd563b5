// pynorm's LayerNorm, RMSNorm, GroupNorm and BatchNorm as C++ torch operators (namespace pynorm_ext).
//
// The modules' per-call cost at small sizes is the glue around the kernels, not
// the kernels: a Python autograd.Function alone costs more than a one-row norm.
// Here the whole call (argument checks, outputs, the C call, the autograd node)
// is C++, dispatched by torch like its own operators:
//
//   layer_norm(x, w?, b?, eps) -> y            CPU: no statistics; Autograd: the node below
//   layer_norm_fwd(x, w?, b?, eps) -> (y, st)  st = [mean; rstd], 2 x rows (float32; float64 for float64)
//   layer_norm_bwd(dy, x, w?, st, mask) -> (dx, dw, db)   undefined where mask is false
//   rms_norm(x, w?, eps) -> y
//   rms_norm_fwd(x, w?, eps) -> (y, rstd)
//   rms_norm_bwd(dy, x, w?, rstd, mask) -> (dx, dw)
//   group_norm(x, G, w?, b?, eps) -> y         and its _fwd/_bwd, st 2 x N*G (InstanceNorm: G = C)
//   batch_norm(x, w?, b?, running_mean(a!)?, running_var(b!)?, training, momentum,
//              num_batches_tracked?, eps) -> y  and its _fwd/_bwd, st 2 x C; the running
//              statistics updated in place in training (a mutating schema: torch.compile
//              functionalizes it)
//   instance_norm(x, w?, b?, running_mean(a!)?, running_var(b!)?, momentum, eps) -> y
//              InstanceNorm in training with running statistics (updated in place); its
//              _fwd returns (y, st), st 2 x N*C; the backward is group_norm_bwd with G = C
//
// Every operator has a CPU and a Meta kernel (fake tensors and torch.compile use the
// Meta ones); layer_norm, rms_norm, group_norm, batch_norm and instance_norm have an Autograd kernel
// that records a backward Node (below). Token
// norms: rows are the last axis (C = x.size(-1)); group_norm: (N, C, *spatial) read as
// NCHW-contiguous; weight and bias hold C values.
//
// libpynorm is not linked: Python hands over the addresses of the functions of the
// library it loaded (pynorm_ext::bind), so both use one copy of the library (one
// buffer cache, one thread setting) wherever it was found, and the built file does
// not depend on where the library lies.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/FuncTorchTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "pynorm.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- the library's functions, bound at load time -------------------------------------------

struct Lib {
    decltype(&pn_layernorm_forward) ln_fwd = nullptr;
    decltype(&pn_layernorm_backward) ln_bwd = nullptr;
    decltype(&pn_rmsnorm_forward) rms_fwd = nullptr;
    decltype(&pn_rmsnorm_backward) rms_bwd = nullptr;
    decltype(&pn_buffer_alloc) buf_alloc = nullptr;
    decltype(&pn_buffer_free) buf_free = nullptr;
    decltype(&pn_status_string) status_string = nullptr;
    decltype(&pn_groupnorm_forward) gn_fwd = nullptr;
    decltype(&pn_groupnorm_backward) gn_bwd = nullptr;
    decltype(&pn_batchnorm_forward) bn_fwd = nullptr;
    decltype(&pn_batchnorm_backward) bn_bwd = nullptr;
};
Lib lib;
std::atomic<bool> bound{false};

template <class F>
void set(F &slot, int64_t address) {
    TORCH_CHECK_VALUE(address != 0, "pynorm_ext::bind: a function address is 0");
    slot = reinterpret_cast<F>(static_cast<uintptr_t>(address));
}

// The addresses in the order of _ext._BOUND_FUNCTIONS.
void bind(at::IntArrayRef a) {
    TORCH_CHECK_VALUE(a.size() == 11, "pynorm_ext::bind: expected 11 function addresses, got ", a.size());
    set(lib.ln_fwd, a[0]); set(lib.ln_bwd, a[1]); set(lib.rms_fwd, a[2]); set(lib.rms_bwd, a[3]);
    set(lib.buf_alloc, a[4]); set(lib.buf_free, a[5]); set(lib.status_string, a[6]);
    set(lib.gn_fwd, a[7]); set(lib.gn_bwd, a[8]); set(lib.bn_fwd, a[9]); set(lib.bn_bwd, a[10]);
    bound.store(true, std::memory_order_release);
}

void check_bound() {
    TORCH_CHECK(bound.load(std::memory_order_acquire),
                "pynorm_ext: the operators are not bound to libpynorm (load them through pynorm.torch)");
}

void check_status(pn_status status, const char *op) {
    if (status != PN_OK) TORCH_CHECK_VALUE(false, "pynorm.torch ", op, ": ", lib.status_string(status));
}

// ---- arguments -------------------------------------------------------------------------------

pn_dtype code(at::ScalarType t) {
    switch (t) {
        case at::kFloat: return PN_FLOAT32;
        case at::kHalf: return PN_FLOAT16;
        case at::kBFloat16: return PN_BFLOAT16;
        case at::kDouble: return PN_FLOAT64;
        default: TORCH_CHECK_TYPE(false, "pynorm.torch: input must be float32, float16, bfloat16 or float64, got ", t);
    }
}

at::ScalarType stats_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_input(const Tensor &x, const char *op) {
    TORCH_CHECK_VALUE(x.dim() >= 1, "pynorm.torch ", op, ": input must have at least one axis");
    code(x.scalar_type());
}

// The parameters as the kernels read them: contiguous, C values, one dtype that is
// the input's or float32 (another dtype is cast to the input's, as the general path).
struct Params {
    Tensor w, b;
    pn_dtype wdt;
};

Tensor param(const OptTensor &p, const char *name, const Tensor &x, int64_t C, at::ScalarType want,
             const char *op) {
    if (!p.has_value() || !p->defined()) return Tensor();
    const Tensor &t = *p;
    TORCH_CHECK_VALUE(t.device() == x.device(), "pynorm.torch ", op, ": ", name, " is on ", t.device(),
                      ", input on ", x.device());
    TORCH_CHECK_VALUE(t.numel() == C, "pynorm.torch ", op, ": ", name, " must hold ", C,
                      " values (the input's last axis), got shape ", t.sizes());
    Tensor r = t.scalar_type() == want ? t : t.to(want);
    return r.contiguous();
}

Params params(const OptTensor &w, const OptTensor &b, const Tensor &x, int64_t C, const char *op) {
    at::ScalarType want = x.scalar_type();
    const OptTensor &first = (w.has_value() && w->defined()) ? w : b;
    if (first.has_value() && first->defined() && first->scalar_type() == at::kFloat) want = at::kFloat;
    Params p{param(w, "weight", x, C, want, op), param(b, "bias", x, C, want, op), code(want)};
    return p;
}

const void *ptr(const Tensor &t) { return t.defined() ? t.data_ptr() : nullptr; }
void *mptr(const Tensor &t) { return t.defined() ? t.data_ptr() : nullptr; }

// A dense CPU tensor, allocated without a trip through the dispatcher (at::empty's
// costs about as much as a one-row norm's kernel; torch.compile's generated code
// allocates the same way). The CPU kernels only run on CPU tensors.
Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) { return Tensor(at::detail::empty_cpu(sizes, dtype)); }

// A dense output shaped as x: large ones from the library's buffer cache (fresh large
// allocations pay a page fault per 4 KiB on first touch), as the Python path.
constexpr int64_t kCachedAllocMin = 1 << 20;

Tensor out_like(const Tensor &x) {
    int64_t bytes = x.numel() * static_cast<int64_t>(x.element_size());
    if (bytes >= kCachedAllocMin) {
        void *p = lib.buf_alloc(static_cast<size_t>(bytes));
        TORCH_CHECK(p != nullptr, "pynorm.torch: cannot allocate ", bytes, " bytes");
        auto n = static_cast<size_t>(bytes);
        return at::from_blob(p, x.sizes(), [n](void *q) { lib.buf_free(q, n); }, x.options());
    }
    return empty(x.sizes(), x.scalar_type());
}

// Statistics saved by a forward for its backward: one tensor [mean; rstd] of 2 x k
// (float32; float64 for float64 input), or none when the caller wants no statistics.
struct Stats {
    Tensor t;
    void *mean = nullptr, *rstd = nullptr;
};

Stats stats_out(const Tensor &x, int64_t k, bool wanted) {
    if (!wanted) return {};
    Tensor t = empty({2, k}, stats_type(x.scalar_type()));
    char *p = static_cast<char *>(t.data_ptr());
    return {t, p, p + k * t.element_size()};
}

// A backward's checks on what the forward handed over: grad_out shaped and typed as
// the input, the statistics the forward's (k values each, contiguous, its dtype).
void check_saved(const Tensor &dy, const Tensor &x, const Tensor &st, int64_t count, const char *op,
                 const char *what) {
    TORCH_CHECK_VALUE(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "pynorm.torch ", op,
                      ": grad_out must be shaped and typed as input");
    TORCH_CHECK_VALUE(st.numel() == count && st.scalar_type() == stats_type(x.scalar_type()) && st.is_contiguous(),
                      "pynorm.torch ", op, ": ", what);
}

const char *at_row(const Tensor &st, int64_t k) {
    return static_cast<const char *>(st.data_ptr()) + k * st.element_size();
}

// A backward's outputs: dx shaped as x; dweight and dbias of C values in the
// parameters' dtype, only with a weight (the kernels read the bias's dtype as the
// weight's), zeros for an empty input.
struct Grads {
    Tensor dx, dw, db;
    bool any() const { return dx.defined() || dw.defined() || db.defined(); }
};

Grads grads_out(const Tensor &x, const Tensor &w, int64_t C, bool gx, bool gw, bool gb) {
    bool has_w = w.defined();
    Grads g{gx ? out_like(x) : Tensor(), gw && has_w ? empty({C}, w.scalar_type()) : Tensor(),
            gb && has_w ? empty({C}, w.scalar_type()) : Tensor()};
    if (x.numel() == 0) {
        if (g.dw.defined()) g.dw.zero_();
        if (g.db.defined()) g.db.zero_();
    }
    return g;
}

// ---- CPU kernels -------------------------------------------------------------------------------
// Token norms (LayerNorm, RMSNorm): rows are the last axis.

struct Rows {
    Tensor x;
    int64_t C, rows;
};

Rows token_rows(const Tensor &x_, const char *op) {
    check_bound();
    check_input(x_, op);
    Tensor x = x_.contiguous();
    int64_t C = x.size(-1);
    return {x, C, C ? x.numel() / C : 0};
}

std::tuple<Tensor, Tensor> ln_fwd_impl(const Tensor &x_, const OptTensor &w, const OptTensor &b, double eps,
                                       bool stats) {
    auto [x, C, rows] = token_rows(x_, "layer_norm");
    Params p = params(w, b, x, C, "layer_norm");
    Tensor y = out_like(x);
    Stats st = stats_out(x, rows, stats);
    if (x.numel() == 0) return {y, st.t};
    check_status(lib.ln_fwd(y.data_ptr(), st.mean, st.rstd, x.data_ptr(), ptr(p.w), ptr(p.b), 1, rows, C, eps,
                            code(x.scalar_type()), p.wdt, nullptr),
                 "layer_norm");
    return {y, st.t};
}

Tensor layer_norm_cpu(const Tensor &x, const OptTensor &w, const OptTensor &b, double eps) {
    return std::get<0>(ln_fwd_impl(x, w, b, eps, false));
}

std::tuple<Tensor, Tensor> layer_norm_fwd_cpu(const Tensor &x, const OptTensor &w, const OptTensor &b,
                                              double eps) {
    return ln_fwd_impl(x, w, b, eps, true);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cpu(const Tensor &dy_, const Tensor &x_, const OptTensor &w,
                                                      const Tensor &st, std::array<bool, 3> mask) {
    auto [x, C, rows] = token_rows(x_, "layer_norm_backward");
    Tensor dy = dy_.contiguous();
    check_saved(dy, x, st, 2 * rows, "layer_norm_backward", "stats must be the forward's (2 x rows)");
    Params p = params(w, OptTensor(), x, C, "layer_norm_backward");
    Grads g = grads_out(x, p.w, C, mask[0], mask[1], mask[2]);
    if (x.numel() && g.any())
        check_status(lib.ln_bwd(mptr(g.dx), mptr(g.dw), mptr(g.db), nullptr, 0, dy.data_ptr(), x.data_ptr(),
                                ptr(p.w), st.data_ptr(), at_row(st, rows), 1, rows, C, 0, code(x.scalar_type()),
                                p.wdt, nullptr),
                     "layer_norm_backward");
    return {g.dx, g.dw, g.db};
}

std::tuple<Tensor, Tensor> rms_fwd_impl(const Tensor &x_, const OptTensor &w, double eps, bool stats) {
    auto [x, C, rows] = token_rows(x_, "rms_norm");
    Params p = params(w, OptTensor(), x, C, "rms_norm");
    Tensor y = out_like(x);
    Tensor rstd = stats ? empty({rows}, stats_type(x.scalar_type())) : Tensor();
    if (x.numel() == 0) return {y, rstd};
    check_status(lib.rms_fwd(y.data_ptr(), mptr(rstd), x.data_ptr(), ptr(p.w), 1, rows, C, eps,
                             code(x.scalar_type()), p.wdt, nullptr),
                 "rms_norm");
    return {y, rstd};
}

Tensor rms_norm_cpu(const Tensor &x, const OptTensor &w, double eps) {
    return std::get<0>(rms_fwd_impl(x, w, eps, false));
}

std::tuple<Tensor, Tensor> rms_norm_fwd_cpu(const Tensor &x, const OptTensor &w, double eps) {
    return rms_fwd_impl(x, w, eps, true);
}

std::tuple<Tensor, Tensor> rms_norm_bwd_cpu(const Tensor &dy_, const Tensor &x_, const OptTensor &w,
                                            const Tensor &rstd, std::array<bool, 2> mask) {
    auto [x, C, rows] = token_rows(x_, "rms_norm_backward");
    Tensor dy = dy_.contiguous();
    check_saved(dy, x, rstd, rows, "rms_norm_backward", "rstd must be the forward's (one per row)");
    Params p = params(w, OptTensor(), x, C, "rms_norm_backward");
    Grads g = grads_out(x, p.w, C, mask[0], mask[1], false);
    if (x.numel() && g.any())
        check_status(lib.rms_bwd(mptr(g.dx), mptr(g.dw), nullptr, 0, dy.data_ptr(), x.data_ptr(), ptr(p.w),
                                 rstd.data_ptr(), 1, rows, C, 0, code(x.scalar_type()), p.wdt, nullptr),
                     "rms_norm_backward");
    return {g.dx, g.dw};
}

// GroupNorm (InstanceNorm: G = C) on (N, C, *spatial), read as NCHW-contiguous.
struct Spatial {
    int64_t N, C, S;
};

Spatial spatial_sizes(const Tensor &x, int64_t G, const char *op) {
    TORCH_CHECK_VALUE(x.dim() >= 2, "pynorm.torch ", op, ": input must have at least 2 axes (N, C, ...), got ",
                      x.dim());
    code(x.scalar_type());
    int64_t N = x.size(0), C = x.size(1);
    TORCH_CHECK_VALUE(G > 0 && C % G == 0, "pynorm.torch ", op, ": num_groups (", G,
                      ") must be positive and divide the number of channels (", C, ")");
    return {N, C, N * C ? x.numel() / (N * C) : 0};
}

std::tuple<Tensor, Tensor> gn_fwd_impl(const Tensor &x_, int64_t G, const OptTensor &w, const OptTensor &b,
                                       double eps, bool stats) {
    check_bound();
    Spatial sz = spatial_sizes(x_, G, "group_norm");
    Tensor x = x_.contiguous();
    Params p = params(w, b, x, sz.C, "group_norm");
    Tensor y = out_like(x);
    Stats st = stats_out(x, sz.N * G, stats);
    if (x.numel() == 0) return {y, st.t};
    check_status(lib.gn_fwd(y.data_ptr(), st.mean, st.rstd, x.data_ptr(), ptr(p.w), ptr(p.b), sz.N, sz.C, sz.S, G,
                            eps, PN_NCHW, code(x.scalar_type()), p.wdt),
                 "group_norm");
    return {y, st.t};
}

Tensor group_norm_cpu(const Tensor &x, int64_t G, const OptTensor &w, const OptTensor &b, double eps) {
    return std::get<0>(gn_fwd_impl(x, G, w, b, eps, false));
}

std::tuple<Tensor, Tensor> group_norm_fwd_cpu(const Tensor &x, int64_t G, const OptTensor &w, const OptTensor &b,
                                              double eps) {
    return gn_fwd_impl(x, G, w, b, eps, true);
}

std::tuple<Tensor, Tensor, Tensor> group_norm_bwd_cpu(const Tensor &dy_, const Tensor &x_, int64_t G,
                                                      const OptTensor &w, const Tensor &st,
                                                      std::array<bool, 3> mask) {
    check_bound();
    Spatial sz = spatial_sizes(x_, G, "group_norm_backward");
    Tensor x = x_.contiguous(), dy = dy_.contiguous();
    int64_t k = sz.N * G;
    check_saved(dy, x, st, 2 * k, "group_norm_backward", "stats must be the forward's (2 x N*num_groups)");
    Params p = params(w, OptTensor(), x, sz.C, "group_norm_backward");
    Grads g = grads_out(x, p.w, sz.C, mask[0], mask[1], mask[2]);
    if (x.numel() && g.any())
        check_status(lib.gn_bwd(mptr(g.dx), mptr(g.dw), mptr(g.db), nullptr, 0, dy.data_ptr(), x.data_ptr(),
                                ptr(p.w), st.data_ptr(), at_row(st, k), sz.N, sz.C, sz.S, G, 0, PN_NCHW,
                                code(x.scalar_type()), p.wdt),
                     "group_norm_backward");
    return {g.dx, g.dw, g.db};
}

// BatchNorm on (N, C, *spatial), NCHW-contiguous: statistics per channel. In training
// the batch statistics normalize x and the running statistics given (either may be
// absent) are updated in place: momentum, or with num_batches_tracked (the count
// including this batch, as the module keeps it) the cumulative average; in eval the
// running statistics (both required) normalize x. stats: [mean; rstd] of C each.

// The running statistics as the kernel updates them in place: C contiguous values of
// the input's dtype or float32, both of one dtype.
struct Running {
    void *mean = nullptr, *var = nullptr;
    pn_dtype dt;
};

void *running_ptr(const OptTensor &r, const char *name, const Tensor &x, int64_t C, at::ScalarType &dtype) {
    if (!r.has_value() || !r->defined()) return nullptr;
    const Tensor &t = *r;
    TORCH_CHECK_VALUE(t.device() == x.device() && t.numel() == C && t.is_contiguous(), "pynorm.torch batch_norm: ",
                      name, " must be a contiguous tensor of ", C, " values (the channels) on ", x.device(),
                      ", got shape ", t.sizes(), " on ", t.device());
    TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat,
                      "pynorm.torch batch_norm: ", name, " must be float32 or the input's dtype (", x.scalar_type(),
                      "), got ", t.scalar_type());
    TORCH_CHECK_VALUE(dtype == at::ScalarType::Undefined || dtype == t.scalar_type(),
                      "pynorm.torch batch_norm: running_mean and running_var must have one dtype");
    dtype = t.scalar_type();
    return t.data_ptr();
}

Running running(const OptTensor &rm, const OptTensor &rv, const Tensor &x, int64_t C, bool training) {
    at::ScalarType dt = at::ScalarType::Undefined;
    Running r;
    r.mean = running_ptr(rm, "running_mean", x, C, dt);
    r.var = running_ptr(rv, "running_var", x, C, dt);
    TORCH_CHECK_VALUE(training || (r.mean && r.var),
                      "pynorm.torch batch_norm: running_mean and running_var are required when not training");
    r.dt = code(dt == at::ScalarType::Undefined ? x.scalar_type() : dt);
    return r;
}

std::tuple<Tensor, Tensor> bn_fwd_impl(const Tensor &x_, const OptTensor &w, const OptTensor &b,
                                       const OptTensor &rm, const OptTensor &rv, bool training, double momentum,
                                       const OptTensor &nbt, double eps, bool stats) {
    check_bound();
    Spatial sz = spatial_sizes(x_, 1, "batch_norm");
    Tensor x = x_.contiguous();
    Params p = params(w, b, x, sz.C, "batch_norm");
    Running r = running(rm, rv, x, sz.C, training);
    int flags = training ? PN_BN_TRAINING : 0;
    int64_t count = 0;
    if (training && nbt.has_value() && nbt->defined()) {          // momentum=None: cumulative
        TORCH_CHECK_VALUE(nbt->numel() == 1, "pynorm.torch batch_norm: num_batches_tracked must hold one value");
        flags |= PN_BN_CUMULATIVE;
        count = nbt->item<int64_t>();
        momentum = 0.0;
    }
    TORCH_CHECK_VALUE(!training || sz.N * sz.S != 1, "pynorm.torch batch_norm: expected more than 1 value per "
                      "channel when training, got input of size ", x.sizes());
    Tensor y = out_like(x);
    Stats st = stats_out(x, sz.C, stats);
    if (x.numel() == 0) return {y, st.t};
    check_status(lib.bn_fwd(y.data_ptr(), st.mean, st.rstd, r.mean, r.var, x.data_ptr(), ptr(p.w), ptr(p.b), sz.N,
                            sz.C, sz.S, eps, momentum, count, flags, PN_NCHW, code(x.scalar_type()), p.wdt, r.dt),
                 "batch_norm");
    return {y, st.t};
}

Tensor batch_norm_cpu(const Tensor &x, const OptTensor &w, const OptTensor &b, const OptTensor &rm,
                      const OptTensor &rv, bool training, double momentum, const OptTensor &nbt, double eps) {
    return std::get<0>(bn_fwd_impl(x, w, b, rm, rv, training, momentum, nbt, eps, false));
}

std::tuple<Tensor, Tensor> batch_norm_fwd_cpu(const Tensor &x, const OptTensor &w, const OptTensor &b,
                                              const OptTensor &rm, const OptTensor &rv, bool training,
                                              double momentum, const OptTensor &nbt, double eps) {
    return bn_fwd_impl(x, w, b, rm, rv, training, momentum, nbt, eps, true);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_bwd_cpu(const Tensor &dy_, const Tensor &x_, const OptTensor &w,
                                                      const Tensor &st, bool training, std::array<bool, 3> mask) {
    check_bound();
    Spatial sz = spatial_sizes(x_, 1, "batch_norm_backward");
    Tensor x = x_.contiguous(), dy = dy_.contiguous();
    check_saved(dy, x, st, 2 * sz.C, "batch_norm_backward", "stats must be the forward's (2 x C)");
    Params p = params(w, OptTensor(), x, sz.C, "batch_norm_backward");
    Grads g = grads_out(x, p.w, sz.C, mask[0], mask[1], mask[2]);
    if (x.numel() && g.any())
        check_status(lib.bn_bwd(mptr(g.dx), mptr(g.dw), mptr(g.db), nullptr, 0, dy.data_ptr(), x.data_ptr(),
                                ptr(p.w), st.data_ptr(), at_row(st, sz.C), sz.N, sz.C, sz.S,
                                training ? PN_BN_TRAINING : 0, PN_NCHW, code(x.scalar_type()), p.wdt),
                     "batch_norm_backward");
    return {g.dx, g.dw, g.db};
}

// InstanceNorm with running statistics, in training (the input's statistics): GroupNorm
// with one group per channel, then running_mean and running_var (either may be absent)
// updated in place as the Python path does, with the same torch operations (the same
// bits): the batch average of the per-instance mean and of the unbiased variance, by
// momentum. In eval the module uses batch_norm (the running statistics normalize).
// stats: [mean; rstd] of N*C each, as group_norm's with G = C.

void check_instance_running(const OptTensor &r, const char *name, const Tensor &x, int64_t C,
                            at::ScalarType &dtype) {
    if (!r.has_value() || !r->defined()) return;
    const Tensor &t = *r;
    TORCH_CHECK_VALUE(t.device() == x.device() && t.numel() == C && t.is_contiguous(), "pynorm.torch instance_norm: ",
                      name, " must be a contiguous tensor of ", C, " values (the channels) on ", x.device(),
                      ", got shape ", t.sizes(), " on ", t.device());
    TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat,
                      "pynorm.torch instance_norm: ", name, " must be float32 or the input's dtype (",
                      x.scalar_type(), "), got ", t.scalar_type());
    TORCH_CHECK_VALUE(dtype == at::ScalarType::Undefined || dtype == t.scalar_type(),
                      "pynorm.torch instance_norm: running_mean and running_var must have one dtype");
    dtype = t.scalar_type();
}

// A float as Python hands it to t.mul_(v): a wrapped-number tensor (mul_(Scalar) rounds
// v to a bfloat16 or float16 t's dtype first, and gives other bits).
Tensor python_number(double v) {
    Tensor t = at::scalar_tensor(v, at::TensorOptions().dtype(at::kDouble));
    t.unsafeGetTensorImpl()->set_wrapped_number(true);
    return t;
}

std::tuple<Tensor, Tensor> in_fwd_impl(const Tensor &x_, const OptTensor &w, const OptTensor &b,
                                       const OptTensor &rm, const OptTensor &rv, double momentum, double eps) {
    check_bound();
    Spatial sz = spatial_sizes(x_, 1, "instance_norm");
    TORCH_CHECK_VALUE(sz.S > 1, "pynorm.torch instance_norm: expected more than 1 spatial element when training, "
                      "got input of size ", x_.sizes());
    at::ScalarType rdt = at::ScalarType::Undefined;
    check_instance_running(rm, "running_mean", x_, sz.C, rdt);
    check_instance_running(rv, "running_var", x_, sz.C, rdt);
    // the statistics are needed for the running ones even when the caller wants none
    auto [y, st] = gn_fwd_impl(x_, sz.C, w, b, eps, true);
    if (x_.numel() == 0) st.fill_(std::numeric_limits<double>::quiet_NaN());   // as the Python path's
    if (rm.has_value() && rm->defined()) {
        Tensor mean = st[0].view({sz.N, sz.C});
        rm->mul_(python_number(1 - momentum)).add_(mean.mean(0).to(rm->scalar_type()), momentum);
    }
    if (rv.has_value() && rv->defined()) {
        Tensor var = x_.reshape({sz.N, sz.C, -1}).to(st.scalar_type()).var(-1, /*unbiased=*/true).mean(0);
        rv->mul_(python_number(1 - momentum)).add_(var.to(rv->scalar_type()), momentum);
    }
    return {y, st};
}

Tensor instance_norm_cpu(const Tensor &x, const OptTensor &w, const OptTensor &b, const OptTensor &rm,
                         const OptTensor &rv, double momentum, double eps) {
    return std::get<0>(in_fwd_impl(x, w, b, rm, rv, momentum, eps));
}

std::tuple<Tensor, Tensor> instance_norm_fwd_cpu(const Tensor &x, const OptTensor &w, const OptTensor &b,
                                                 const OptTensor &rm, const OptTensor &rv, double momentum,
                                                 double eps) {
    return in_fwd_impl(x, w, b, rm, rv, momentum, eps);
}

// ---- Meta kernels (shapes and dtypes only) -----------------------------------------------------

at::ScalarType meta_wtype(const OptTensor &w, const OptTensor &b, const Tensor &x) {
    const OptTensor &first = (w.has_value() && w->defined()) ? w : b;
    if (first.has_value() && first->defined() && first->scalar_type() == at::kFloat) return at::kFloat;
    return x.scalar_type();
}

c10::SymInt meta_rows(const Tensor &x) {
    check_input(x, "norm");
    c10::SymInt C = x.sym_size(-1);
    return C == 0 ? c10::SymInt(0) : x.sym_numel() / C;
}

void meta_spatial(const Tensor &x, const char *op) {
    TORCH_CHECK_VALUE(x.dim() >= 2, "pynorm.torch ", op, ": input must have at least 2 axes (N, C, ...)");
    check_input(x, op);
}

Tensor dense_like(const Tensor &x) { return at::empty_symint(x.sym_sizes(), x.options()); }

Tensor stats_meta(const Tensor &x, c10::SymInt k) {
    return at::empty_symint({c10::SymInt(2), std::move(k)}, x.options().dtype(stats_type(x.scalar_type())));
}

// The backward's (dx, dweight, dbias) as grads_out makes them; C the channel count.
std::tuple<Tensor, Tensor, Tensor> grads_meta(const Tensor &x, const OptTensor &w, const c10::SymInt &C, bool gx,
                                              bool gw, bool gb) {
    bool has_w = w.has_value() && w->defined();
    at::TensorOptions wo = x.options().dtype(meta_wtype(w, OptTensor(), x));
    return {gx ? dense_like(x) : Tensor(), gw && has_w ? at::empty_symint({C}, wo) : Tensor(),
            gb && has_w ? at::empty_symint({C}, wo) : Tensor()};
}

Tensor layer_norm_meta(const Tensor &x, const OptTensor &, const OptTensor &, double) {
    meta_rows(x);
    return dense_like(x);
}

std::tuple<Tensor, Tensor> layer_norm_fwd_meta(const Tensor &x, const OptTensor &, const OptTensor &, double) {
    return {dense_like(x), stats_meta(x, meta_rows(x))};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_meta(const Tensor &, const Tensor &x, const OptTensor &w,
                                                       const Tensor &, std::array<bool, 3> mask) {
    meta_rows(x);
    return grads_meta(x, w, x.sym_size(-1), mask[0], mask[1], mask[2]);
}

Tensor rms_norm_meta(const Tensor &x, const OptTensor &, double) {
    meta_rows(x);
    return dense_like(x);
}

std::tuple<Tensor, Tensor> rms_norm_fwd_meta(const Tensor &x, const OptTensor &, double) {
    c10::SymInt rows = meta_rows(x);
    return {dense_like(x), at::empty_symint({rows}, x.options().dtype(stats_type(x.scalar_type())))};
}

std::tuple<Tensor, Tensor> rms_norm_bwd_meta(const Tensor &, const Tensor &x, const OptTensor &w, const Tensor &,
                                             std::array<bool, 2> mask) {
    meta_rows(x);
    auto g = grads_meta(x, w, x.sym_size(-1), mask[0], mask[1], false);
    return {std::get<0>(g), std::get<1>(g)};
}

Tensor group_norm_meta(const Tensor &x, int64_t, const OptTensor &, const OptTensor &, double) {
    meta_spatial(x, "group_norm");
    return dense_like(x);
}

std::tuple<Tensor, Tensor> group_norm_fwd_meta(const Tensor &x, int64_t G, const OptTensor &, const OptTensor &,
                                               double) {
    meta_spatial(x, "group_norm");
    return {dense_like(x), stats_meta(x, x.sym_size(0) * G)};
}

std::tuple<Tensor, Tensor, Tensor> group_norm_bwd_meta(const Tensor &, const Tensor &x, int64_t, const OptTensor &w,
                                                       const Tensor &, std::array<bool, 3> mask) {
    check_input(x, "group_norm_backward");
    return grads_meta(x, w, x.sym_size(1), mask[0], mask[1], mask[2]);
}

// The running statistics are mutated by the CPU kernel only: fake tensors need no update.
Tensor batch_norm_meta(const Tensor &x, const OptTensor &, const OptTensor &, const OptTensor &, const OptTensor &,
                       bool, double, const OptTensor &, double) {
    meta_spatial(x, "batch_norm");
    return dense_like(x);
}

std::tuple<Tensor, Tensor> batch_norm_fwd_meta(const Tensor &x, const OptTensor &, const OptTensor &,
                                               const OptTensor &, const OptTensor &, bool, double, const OptTensor &,
                                               double) {
    meta_spatial(x, "batch_norm");
    return {dense_like(x), stats_meta(x, x.sym_size(1))};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_bwd_meta(const Tensor &, const Tensor &x, const OptTensor &w,
                                                       const Tensor &, bool, std::array<bool, 3> mask) {
    meta_spatial(x, "batch_norm_backward");
    return grads_meta(x, w, x.sym_size(1), mask[0], mask[1], mask[2]);
}

Tensor instance_norm_meta(const Tensor &x, const OptTensor &, const OptTensor &, const OptTensor &,
                          const OptTensor &, double, double) {
    meta_spatial(x, "instance_norm");
    return dense_like(x);
}

std::tuple<Tensor, Tensor> instance_norm_fwd_meta(const Tensor &x, const OptTensor &, const OptTensor &,
                                                  const OptTensor &, const OptTensor &, double, double) {
    meta_spatial(x, "instance_norm");
    return {dense_like(x), stats_meta(x, x.sym_size(0) * x.sym_size(1))};
}

// ---- autograd ----------------------------------------------------------------------------------

bool wants_grad(const Tensor &x, const OptTensor &w, const OptTensor &b) {
    if (!c10::GradMode::is_enabled()) return false;
    return x.requires_grad() || (w.has_value() && w->defined() && w->requires_grad()) ||
           (b.has_value() && b->defined() && b->requires_grad());
}

// The backward kernels compute dbias only with a weight: a bias that wants a gradient
// without a weight is refused rather than left without one.
void check_bias_grad(const OptTensor &w, const OptTensor &b, const char *op) {
    TORCH_CHECK_VALUE(!(b.has_value() && b->defined() && b->requires_grad()) || (w.has_value() && w->defined()),
                      "pynorm.torch ", op, ": a bias needs a weight to get a gradient");
}

// The typed handle of operator pynorm_ext::<name> whose CPU kernel is Sig.
template <class Sig>
c10::TypedOperatorHandle<Sig> find_op(const char *name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
#define PYNORM_OP(name, kernel)                                                  \
    ([]() -> const c10::TypedOperatorHandle<decltype(kernel)> & {                \
        static const auto op = find_op<decltype(kernel)>("pynorm_ext::" name);   \
        return op;                                                               \
    }())

// Calls op below autograd (the kernel below the Autograd key: no boxed autograd
// fallback for an operator without a formula).
template <class Sig, class... Args>
auto below_autograd(const c10::TypedOperatorHandle<Sig> &op, const Args &...args) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(args...);
}

Tensor or_undefined(const OptTensor &t) { return t.has_value() ? *t : Tensor(); }

// First-order only, as the Python path: with create_graph=True the gradients are
// returned through this node, whose backward raises (a double backward must not treat
// them as constants).
struct FirstOrderOnly : public torch::autograd::Function<FirstOrderOnly> {
    static Tensor forward(AutogradContext *, const Tensor &grad, const Tensor &dy, const Tensor &x,
                          const Tensor &w) {
        return grad.clone();
    }
    static variable_list backward(AutogradContext *, variable_list) {
        TORCH_CHECK(false, "pynorm.torch: the norms' backward is not differentiable (no double backward)");
    }
};

variable_list first_order(variable_list grads, const Tensor &dy, const Tensor &x, const Tensor &w) {
    if (c10::GradMode::is_enabled())
        for (auto &g : grads)
            if (g.defined()) g = FirstOrderOnly::apply(g, dy, x, w);
    return grads;
}

// The backward nodes. Each is a plain autograd Node, as torch's own operators record
// (not torch::autograd::Function<T>, whose generic apply costs about 2 us more per
// forward at one row: the per-input VariableInfo, _wrap_outputs, the context's
// maps). Its edges are the forward's x, weight, bias (RMSNorm: x, weight), an absent
// one an invalid edge; it keeps x, the weight and the statistics as SavedVariables
// (an in-place change to them before the backward raises, as for torch's norms).
struct NormBackward : public torch::autograd::Node {
    torch::autograd::SavedVariable x_, w_, st_;
    const char *name_ = "";

    void release_variables() override {
        x_.reset_data();
        w_.reset_data();
        st_.reset_data();
    }
    std::string name() const override { return name_; }
    std::array<bool, 3> mask() const {
        return {task_should_compute_output(0), num_outputs() > 1 && task_should_compute_output(1),
                num_outputs() > 2 && task_should_compute_output(2)};
    }
};

struct LayerNormBackward : public NormBackward {
    variable_list apply(variable_list &&grads) override {
        if (!grads[0].defined()) return variable_list(num_outputs());     // a zero gradient
        Tensor x = x_.unpack(), w = w_.unpack(), st = st_.unpack();
        auto [dx, dw, db] = below_autograd(PYNORM_OP("layer_norm_bwd", layer_norm_bwd_cpu), grads[0], x,
                                           OptTensor(w), st, mask());
        return first_order({dx, dw, db}, grads[0], x, w);
    }
};

struct RMSNormBackward : public NormBackward {
    variable_list apply(variable_list &&grads) override {
        if (!grads[0].defined()) return variable_list(num_outputs());     // a zero gradient
        Tensor x = x_.unpack(), w = w_.unpack(), st = st_.unpack();
        auto m = mask();
        auto [dx, dw] = below_autograd(PYNORM_OP("rms_norm_bwd", rms_norm_bwd_cpu), grads[0], x, OptTensor(w), st,
                                       std::array<bool, 2>{m[0], m[1]});
        return first_order({dx, dw}, grads[0], x, w);
    }
};

// GroupNorm's, and InstanceNorm's with G = C
struct GroupNormBackward : public NormBackward {
    int64_t G = 1;
    variable_list apply(variable_list &&grads) override {
        if (!grads[0].defined()) return variable_list(num_outputs());     // a zero gradient
        Tensor x = x_.unpack(), w = w_.unpack(), st = st_.unpack();
        auto [dx, dw, db] = below_autograd(PYNORM_OP("group_norm_bwd", group_norm_bwd_cpu), grads[0], x, G,
                                           OptTensor(w), st, mask());
        return first_order({dx, dw, db}, grads[0], x, w);
    }
};

struct BatchNormBackward : public NormBackward {
    bool training = true;
    variable_list apply(variable_list &&grads) override {
        if (!grads[0].defined()) return variable_list(num_outputs());     // a zero gradient
        Tensor x = x_.unpack(), w = w_.unpack(), st = st_.unpack();
        auto [dx, dw, db] = below_autograd(PYNORM_OP("batch_norm_bwd", batch_norm_bwd_cpu), grads[0], x,
                                           OptTensor(w), st, training, mask());
        return first_order({dx, dw, db}, grads[0], x, w);
    }
};

// Forward-mode AD has no formula here: refused, as torch::autograd::Function refuses
// it, rather than a tangent silently dropped.
void check_no_forward_grad(const Tensor &x, const OptTensor &w, const OptTensor &b, const char *op) {
    TORCH_CHECK_NOT_IMPLEMENTED(!x._fw_grad(0).defined() && !torch::autograd::isFwGradDefined(w) &&
                                    !torch::autograd::isFwGradDefined(b),
                                "pynorm.torch ", op, ": forward-mode AD is not supported");
}

// Records y's history: node N (its extra fields set by the caller) with x, w, b as
// edges (b absent: two edges, RMSNorm's), saving x, w and the statistics st.
template <class N>
c10::intrusive_ptr<N> record(const char *name, const Tensor &y, const Tensor &x, const OptTensor &w,
                             const OptTensor *b, const Tensor &st) {
    if (const auto &functorch_tls = at::functorch::functorchTLSAccessor())
        functorch_tls->checkSupportsCppAutogradFunction();   // as torch::autograd::Function
    auto node = c10::make_intrusive<N>();
    node->name_ = name;
    Tensor wt = or_undefined(w);
    node->set_next_edges(b ? torch::autograd::collect_next_edges(x, wt, or_undefined(*b))
                           : torch::autograd::collect_next_edges(x, wt));
    node->x_ = torch::autograd::SavedVariable(x, false);
    node->w_ = torch::autograd::SavedVariable(wt, false);
    node->st_ = torch::autograd::SavedVariable(st, false);
    torch::autograd::set_history(y, node);
    return node;
}

// The Autograd kernels: a node only when a gradient is wanted, else straight below.
Tensor layer_norm_autograd(const Tensor &x, const OptTensor &w, const OptTensor &b, double eps) {
    check_no_forward_grad(x, w, b, "layer_norm");
    if (!wants_grad(x, w, b)) return below_autograd(PYNORM_OP("layer_norm", layer_norm_cpu), x, w, b, eps);
    check_bias_grad(w, b, "layer_norm");
    auto [y, st] = below_autograd(PYNORM_OP("layer_norm_fwd", layer_norm_fwd_cpu), x, w, b, eps);
    record<LayerNormBackward>("pynorm_ext::LayerNormBackward", y, x, w, &b, st);
    return y;
}

Tensor rms_norm_autograd(const Tensor &x, const OptTensor &w, double eps) {
    check_no_forward_grad(x, w, OptTensor(), "rms_norm");
    if (!wants_grad(x, w, OptTensor())) return below_autograd(PYNORM_OP("rms_norm", rms_norm_cpu), x, w, eps);
    auto [y, rstd] = below_autograd(PYNORM_OP("rms_norm_fwd", rms_norm_fwd_cpu), x, w, eps);
    record<RMSNormBackward>("pynorm_ext::RMSNormBackward", y, x, w, nullptr, rstd);
    return y;
}

Tensor group_norm_autograd(const Tensor &x, int64_t G, const OptTensor &w, const OptTensor &b, double eps) {
    check_no_forward_grad(x, w, b, "group_norm");
    if (!wants_grad(x, w, b)) return below_autograd(PYNORM_OP("group_norm", group_norm_cpu), x, G, w, b, eps);
    check_bias_grad(w, b, "group_norm");
    auto [y, st] = below_autograd(PYNORM_OP("group_norm_fwd", group_norm_fwd_cpu), x, G, w, b, eps);
    record<GroupNormBackward>("pynorm_ext::GroupNormBackward", y, x, w, &b, st)->G = G;
    return y;
}

// Below autograd the ADInplaceOrView kernel is skipped too: the running statistics'
// version counters are bumped here, as an in-place torch operator's are.
void bump_running(const OptTensor &rm, const OptTensor &rv) {
    for (const OptTensor *r : {&rm, &rv})
        if (r->has_value() && (*r)->defined()) torch::autograd::impl::bump_version(**r);
}

Tensor batch_norm_autograd(const Tensor &x, const OptTensor &w, const OptTensor &b, const OptTensor &rm,
                           const OptTensor &rv, bool training, double momentum, const OptTensor &nbt, double eps) {
    check_no_forward_grad(x, w, b, "batch_norm");
    Tensor y;
    if (wants_grad(x, w, b)) {
        check_bias_grad(w, b, "batch_norm");
        Tensor st;
        std::tie(y, st) = below_autograd(PYNORM_OP("batch_norm_fwd", batch_norm_fwd_cpu), x, w, b, rm, rv, training,
                                         momentum, nbt, eps);
        record<BatchNormBackward>("pynorm_ext::BatchNormBackward", y, x, w, &b, st)->training = training;
    } else {
        y = below_autograd(PYNORM_OP("batch_norm", batch_norm_cpu), x, w, b, rm, rv, training, momentum, nbt, eps);
    }
    if (training) bump_running(rm, rv);
    return y;
}

// As batch_norm's: the running statistics' version counters bumped here; the backward
// is GroupNorm's with one group per channel.
Tensor instance_norm_autograd(const Tensor &x, const OptTensor &w, const OptTensor &b, const OptTensor &rm,
                              const OptTensor &rv, double momentum, double eps) {
    check_no_forward_grad(x, w, b, "instance_norm");
    Tensor y;
    if (wants_grad(x, w, b)) {
        check_bias_grad(w, b, "instance_norm");
        Tensor st;
        std::tie(y, st) = below_autograd(PYNORM_OP("instance_norm_fwd", instance_norm_fwd_cpu), x, w, b, rm, rv,
                                         momentum, eps);
        record<GroupNormBackward>("pynorm_ext::InstanceNormBackward", y, x, w, &b, st)->G = x.size(1);
    } else {
        y = below_autograd(PYNORM_OP("instance_norm", instance_norm_cpu), x, w, b, rm, rv, momentum, eps);
    }
    bump_running(rm, rv);
    return y;
}

}  // namespace

TORCH_LIBRARY(pynorm_ext, m) {
    m.def("bind(int[] addresses) -> ()", &bind);
    m.def("layer_norm(Tensor input, Tensor? weight, Tensor? bias, float eps) -> Tensor");
    m.def("layer_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)");
    m.def("layer_norm_bwd(Tensor grad_out, Tensor input, Tensor? weight, Tensor stats, bool[3] output_mask)"
          " -> (Tensor, Tensor, Tensor)");
    m.def("rms_norm(Tensor input, Tensor? weight, float eps) -> Tensor");
    m.def("rms_norm_fwd(Tensor input, Tensor? weight, float eps) -> (Tensor, Tensor)");
    m.def("rms_norm_bwd(Tensor grad_out, Tensor input, Tensor? weight, Tensor rstd, bool[2] output_mask)"
          " -> (Tensor, Tensor)");
    m.def("group_norm(Tensor input, int num_groups, Tensor? weight, Tensor? bias, float eps) -> Tensor");
    m.def("group_norm_fwd(Tensor input, int num_groups, Tensor? weight, Tensor? bias, float eps)"
          " -> (Tensor, Tensor)");
    m.def("group_norm_bwd(Tensor grad_out, Tensor input, int num_groups, Tensor? weight, Tensor stats,"
          " bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
    m.def("batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean,"
          " Tensor(b!)? running_var, bool training, float momentum, Tensor? num_batches_tracked, float eps)"
          " -> Tensor");
    m.def("batch_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean,"
          " Tensor(b!)? running_var, bool training, float momentum, Tensor? num_batches_tracked, float eps)"
          " -> (Tensor, Tensor)");
    m.def("batch_norm_bwd(Tensor grad_out, Tensor input, Tensor? weight, Tensor stats, bool training,"
          " bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
    m.def("instance_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean,"
          " Tensor(b!)? running_var, float momentum, float eps) -> Tensor");
    m.def("instance_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean,"
          " Tensor(b!)? running_var, float momentum, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pynorm_ext, CPU, m) {
    m.impl("layer_norm", &layer_norm_cpu);
    m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
    m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
    m.impl("rms_norm", &rms_norm_cpu);
    m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
    m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
    m.impl("group_norm", &group_norm_cpu);
    m.impl("group_norm_fwd", &group_norm_fwd_cpu);
    m.impl("group_norm_bwd", &group_norm_bwd_cpu);
    m.impl("batch_norm", &batch_norm_cpu);
    m.impl("batch_norm_fwd", &batch_norm_fwd_cpu);
    m.impl("batch_norm_bwd", &batch_norm_bwd_cpu);
    m.impl("instance_norm", &instance_norm_cpu);
    m.impl("instance_norm_fwd", &instance_norm_fwd_cpu);
}

TORCH_LIBRARY_IMPL(pynorm_ext, Meta, m) {
    m.impl("layer_norm", &layer_norm_meta);
    m.impl("layer_norm_fwd", &layer_norm_fwd_meta);
    m.impl("layer_norm_bwd", &layer_norm_bwd_meta);
    m.impl("rms_norm", &rms_norm_meta);
    m.impl("rms_norm_fwd", &rms_norm_fwd_meta);
    m.impl("rms_norm_bwd", &rms_norm_bwd_meta);
    m.impl("group_norm", &group_norm_meta);
    m.impl("group_norm_fwd", &group_norm_fwd_meta);
    m.impl("group_norm_bwd", &group_norm_bwd_meta);
    m.impl("batch_norm", &batch_norm_meta);
    m.impl("batch_norm_fwd", &batch_norm_fwd_meta);
    m.impl("batch_norm_bwd", &batch_norm_bwd_meta);
    m.impl("instance_norm", &instance_norm_meta);
    m.impl("instance_norm_fwd", &instance_norm_fwd_meta);
}

TORCH_LIBRARY_IMPL(pynorm_ext, Autograd, m) {
    m.impl("layer_norm", &layer_norm_autograd);
    m.impl("rms_norm", &rms_norm_autograd);
    m.impl("group_norm", &group_norm_autograd);
    m.impl("batch_norm", &batch_norm_autograd);
    m.impl("instance_norm", &instance_norm_autograd);
}

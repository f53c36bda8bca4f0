// The pybind11 module cmfast._C: thin wrappers over the launchers in cmfast.h. Arguments are plain integers
// (device addresses, sizes, dtype codes, cudaStream_t) so that neither torch nor CUDA headers are needed here;
// cmfast/ops/_cuda.py checks tensors and passes tensor.data_ptr() and the current stream.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cmfast.h"

namespace py = pybind11;
using cmfast::ptr;

#ifndef CMFAST_SOURCE_HASH
#define CMFAST_SOURCE_HASH "unknown"
#endif
// cmfast._C when installed; the JIT build names itself _C_<hash> so that it can load beside a stale installed one.
#ifndef CMFAST_MODULE
#define CMFAST_MODULE _C
#endif

static void check(int code, const char* op) {
  if (code) throw std::runtime_error(std::string("cmfast._C.") + op + ": CUDA error " + std::to_string(code) +
                                     " (" + cmfast::error_string(code) + ")");
}


PYBIND11_MODULE(CMFAST_MODULE, m) {
  m.doc() = "cmfast CUDA kernels (csrc/): group_norm_act, skip_output, consistency_loss";
  m.attr("SOURCE_HASH") = CMFAST_SOURCE_HASH;  // hash of csrc/ and the target arch: stale builds are rebuilt
  m.attr("DTYPES") = py::make_tuple("float32", "float16", "bfloat16");
  m.def("skip_output_fwd",
        [](ptr x, int xd, ptr F, int Fd, ptr sigma, float sd, float smin, int64_t B, int64_t n, int mode, ptr y,
           ptr st) { check(cmfast::skip_output_fwd(x, xd, F, Fd, sigma, sd, smin, B, n, mode, y, st), "skip_output_fwd"); },
        py::arg("x"), py::arg("x_dtype"), py::arg("F"), py::arg("F_dtype"), py::arg("sigma"), py::arg("sigma_data"),
        py::arg("sigma_min"), py::arg("batch"), py::arg("per_sample"), py::arg("mode"), py::arg("y"), py::arg("stream"));
  m.def("skip_output_bwd",
        [](ptr g, int xd, ptr sigma, float sd, float smin, int64_t B, int64_t n, ptr dx, ptr dF, int Fd, ptr st) {
          check(cmfast::skip_output_bwd(g, xd, sigma, sd, smin, B, n, dx, dF, Fd, st), "skip_output_bwd");
        },
        py::arg("g"), py::arg("x_dtype"), py::arg("sigma"), py::arg("sigma_data"), py::arg("sigma_min"),
        py::arg("batch"), py::arg("per_sample"), py::arg("dx"), py::arg("dF"), py::arg("F_dtype"), py::arg("stream"));
  m.def("consistency_loss_fwd",
        [](ptr pred, int pd, ptr target, int td, ptr weight, int kind, float c, int64_t B, int64_t d, ptr loss,
           ptr grad, ptr st) {
          check(cmfast::consistency_loss_fwd(pred, pd, target, td, weight, kind, c, B, d, loss, grad, st),
                "consistency_loss_fwd");
        },
        py::arg("pred"), py::arg("pred_dtype"), py::arg("target"), py::arg("target_dtype"), py::arg("weight"),
        py::arg("kind"), py::arg("c"), py::arg("batch"), py::arg("d"), py::arg("loss"), py::arg("grad"),
        py::arg("stream"));
  m.def("consistency_loss_bwd",
        [](ptr grad, ptr gout, int64_t B, int64_t d, ptr dpred, int pd, ptr st) {
          check(cmfast::consistency_loss_bwd(grad, gout, B, d, dpred, pd, st), "consistency_loss_bwd");
        },
        py::arg("grad"), py::arg("gout"), py::arg("batch"), py::arg("d"), py::arg("dpred"), py::arg("pred_dtype"),
        py::arg("stream"));
  m.attr("GN_FUSED_MAX_GROUP") = cmfast::kFusedMaxGroup;
  m.attr("GN_FUSED_MAX_CHANNELS") = cmfast::kFusedMaxChannels;
  m.def("group_norm_act_fwd",
        [](ptr x, int dt, int64_t N, int64_t C, int64_t HW, int64_t G, int64_t S, bool nhwc, bool silu, float eps,
           ptr w, ptr b, ptr scale, ptr shift, int64_t ms, ptr pre, int64_t pre_stride, int adt, int mdt, ptr y,
           ptr part, ptr stats, ptr A, ptr B, ptr st) {
          check(cmfast::group_norm_act_fwd(x, dt, N, C, HW, G, S, nhwc, silu, eps, w, b, scale, shift, ms, pre,
                                           pre_stride, adt, mdt, y, part, stats, A, B, st),
                "group_norm_act_fwd");
        },
        py::arg("x"), py::arg("dtype"), py::arg("N"), py::arg("C"), py::arg("HW"), py::arg("G"), py::arg("S"),
        py::arg("nhwc"), py::arg("silu"), py::arg("eps"), py::arg("weight"), py::arg("bias"), py::arg("scale"),
        py::arg("shift"), py::arg("mod_stride"), py::arg("pre"), py::arg("pre_stride"), py::arg("affine_dtype"), py::arg("mod_dtype"),
        py::arg("y"), py::arg("part"),
        py::arg("stats"), py::arg("A"), py::arg("B"), py::arg("stream"));
  m.def("group_norm_act_bwd",
        [](ptr x, ptr dy, int dt, int64_t N, int64_t C, int64_t HW, int64_t G, int64_t S, bool nhwc, bool silu,
           ptr w, ptr b, ptr scale, int64_t ms, ptr stats, ptr A, ptr B, ptr part, ptr csum, ptr P, ptr m12,
           ptr dx, ptr dw, ptr db, ptr dscale, ptr dshift, ptr st) {
          check(cmfast::group_norm_act_bwd(x, dy, dt, N, C, HW, G, S, nhwc, silu, w, b, scale, ms, stats, A, B,
                                           part, csum, P, m12, dx, dw, db, dscale, dshift, st),
                "group_norm_act_bwd");
        },
        py::arg("x"), py::arg("dy"), py::arg("dtype"), py::arg("N"), py::arg("C"), py::arg("HW"), py::arg("G"),
        py::arg("S"), py::arg("nhwc"), py::arg("silu"), py::arg("weight"), py::arg("bias"), py::arg("scale"),
        py::arg("mod_stride"), py::arg("stats"), py::arg("A"), py::arg("B"), py::arg("part"), py::arg("csum"), py::arg("P"), py::arg("m12"),
        py::arg("dx"), py::arg("dweight"), py::arg("dbias"), py::arg("dscale"), py::arg("dshift"), py::arg("stream"));
}

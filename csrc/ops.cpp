// The mokd operators: schemas (TORCH_LIBRARY(mokd)), their CPU implementations (argument checks, output
// allocation, dtype dispatch) and the choice of CPU capability. Autograd and the fake (meta) kernels are
// registered from Python, in mokd/kernels/native.py.
#include "kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#ifdef __linux__
#include <sys/mman.h>
#endif
#include <string>
#include <tuple>
#include <vector>

namespace mokd::native {
namespace {

enum class Capability { Default, Avx2, Avx512 };

bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

// The best capability of this CPU, or the one MOKD_CPU_CAPABILITY names (default | avx2 | avx512): a lower one
// is how the fallbacks are tested on a machine that has the higher ones. Read on every call (a getenv).
Capability capability() {
  const char* requested = std::getenv("MOKD_CPU_CAPABILITY");
  const std::string name = requested ? requested : "";
  if (name.empty()) {
    return cpu_has_avx512() ? Capability::Avx512 : cpu_has_avx2() ? Capability::Avx2 : Capability::Default;
  }
  if (name == "default") return Capability::Default;
  if (name == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "MOKD_CPU_CAPABILITY=avx2, but this CPU has no AVX2/FMA");
    return Capability::Avx2;
  }
  if (name == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "MOKD_CPU_CAPABILITY=avx512, but this CPU lacks AVX-512 F/BW/VL/DQ");
    return Capability::Avx512;
  }
  TORCH_CHECK(false, "MOKD_CPU_CAPABILITY must be default, avx2 or avx512, got '", name, "'");
}

std::string capability_name() {
  switch (capability()) {
    case Capability::Avx512: return "avx512";
    case Capability::Avx2: return "avx2";
    default: return "default";
  }
}

// Calls CAP::fn<types...>(args...) for the selected capability.
#define COMMA ,
#define MOKD_CALL(fn, ...)                                   \
  switch (capability()) {                                    \
    case Capability::Avx512: AVX512::fn(__VA_ARGS__); break; \
    case Capability::Avx2: AVX2::fn(__VA_ARGS__); break;     \
    default: DEFAULT::fn(__VA_ARGS__); break;                \
  }

at::ScalarType accumulation_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

DinoShape dino_shape(const at::Tensor& student, const at::Tensor& teacher, int64_t batch, bool exclude_same) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "mokd::dino_cross_entropy runs on CPU tensors");
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, "mokd::dino_cross_entropy: logits must be 2-D");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "mokd::dino_cross_entropy: student and teacher logits must have one dtype");
  TORCH_CHECK(student.size(1) == teacher.size(1) && student.size(1) > 0, "mokd::dino_cross_entropy: K differs or is 0");
  TORCH_CHECK(batch >= 1 && student.size(0) % batch == 0 && teacher.size(0) % batch == 0 && student.size(0) > 0 &&
                  teacher.size(0) > 0,
              "mokd::dino_cross_entropy: rows must be positive multiples of batch");
  DinoShape shape{student.size(0) / batch, teacher.size(0) / batch, batch, student.size(1), exclude_same};
  TORCH_CHECK(shape.n_pairs() > 0, "mokd::dino_cross_entropy: no (teacher view, student crop) pair");
  return shape;
}

c10::optional<at::Tensor> centre_as(const c10::optional<at::Tensor>& centre, at::ScalarType acc, int64_t k) {
  if (!centre.has_value()) return c10::nullopt;
  TORCH_CHECK(centre->dim() == 1 && centre->size(0) == k, "mokd::dino_cross_entropy: centre must have shape [K]");
  return centre->to(acc).contiguous();
}

// The gradient (S*B*K elements, 96 MiB at B = 32, K = 65536) is a fresh allocation written exactly once, and on
// 4 KiB pages its first-touch page faults cost more than the kernel itself (measured here: 45 ms of a 64 ms
// backward). Transparent huge pages (Linux, THP in "madvise" or "always" mode) cut the faults 512-fold; the
// advice is best effort and changes nothing else (the pages are zeroed either way).
void advise_huge_pages(const at::Tensor& t) {
#ifdef __linux__
  constexpr uintptr_t huge = uintptr_t(2) << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + huge - 1) & ~(huge - 1), end = (start + t.nbytes()) & ~(huge - 1);
  if (end >= begin + 2 * huge) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// One scratch slot per chunk of images; as many chunks as threads (never more than images).
at::Tensor dino_scratch(const DinoShape& shape, at::ScalarType acc, int64_t* slots) {
  *slots = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), shape.batch));
  return at::empty({*slots, dino_scratch_elements(shape)}, at::TensorOptions().dtype(acc));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dino_cross_entropy_cpu(
    const at::Tensor& student_in, const at::Tensor& teacher_in, const c10::optional<at::Tensor>& centre_in,
    double tau_s, double tau_t, int64_t batch, bool exclude_same) {
  const DinoShape shape = dino_shape(student_in, teacher_in, batch, exclude_same);
  // The kernels take the maximum of s / tau from that of s, which needs tau > 0.
  TORCH_CHECK(tau_s > 0 && tau_t > 0, "mokd::dino_cross_entropy: temperatures must be positive");
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const at::ScalarType acc = accumulation_type(student.scalar_type());
  const auto centre = centre_as(centre_in, acc, shape.k);
  const auto options = at::TensorOptions().dtype(acc);
  at::Tensor loss = at::empty({}, options), entropy = at::empty({}, options);
  at::Tensor column_sum = at::empty({shape.k}, options);
  at::Tensor lse_s = at::empty({shape.student * batch}, options), lse_t = at::empty({shape.teacher * batch}, options);
  int64_t slots = 0;
  at::Tensor scratch = dino_scratch(shape, acc, &slots);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "mokd_dino_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    DinoForwardArgs<scalar_t, acc_t> args{
        student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(),
        centre ? centre->const_data_ptr<acc_t>() : nullptr, static_cast<acc_t>(1.0 / tau_s),
        static_cast<acc_t>(1.0 / tau_t), loss.mutable_data_ptr<acc_t>(), column_sum.mutable_data_ptr<acc_t>(),
        entropy.mutable_data_ptr<acc_t>(), lse_s.mutable_data_ptr<acc_t>(), lse_t.mutable_data_ptr<acc_t>(),
        scratch.mutable_data_ptr<acc_t>(), slots};
    MOKD_CALL(dino_forward<scalar_t COMMA acc_t>, shape, args)
  });
  return {loss, column_sum, entropy, lse_s, lse_t};
}

at::Tensor dino_cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student_in,
                                           const at::Tensor& teacher_in, const c10::optional<at::Tensor>& centre_in,
                                           const at::Tensor& lse_s, const at::Tensor& lse_t, double tau_s,
                                           double tau_t, int64_t batch, bool exclude_same) {
  const DinoShape shape = dino_shape(student_in, teacher_in, batch, exclude_same);
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const at::ScalarType acc = accumulation_type(student.scalar_type());
  TORCH_CHECK(lse_s.numel() == shape.student * batch && lse_t.numel() == shape.teacher * batch &&
                  lse_s.scalar_type() == acc && lse_t.scalar_type() == acc,
              "mokd::dino_cross_entropy_backward: saved statistics do not match the logits");
  const auto centre = centre_as(centre_in, acc, shape.k);
  const at::Tensor lse_s_c = lse_s.contiguous(), lse_t_c = lse_t.contiguous();
  at::Tensor grad = at::empty_like(student);
  advise_huge_pages(grad);
  int64_t slots = 0;
  at::Tensor scratch = dino_scratch(shape, acc, &slots);
  const double scale = grad_loss.item<double>() / (tau_s * static_cast<double>(shape.n_pairs() * batch));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "mokd_dino_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    DinoBackwardArgs<scalar_t, acc_t> args{
        student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(),
        centre ? centre->const_data_ptr<acc_t>() : nullptr, lse_s_c.const_data_ptr<acc_t>(),
        lse_t_c.const_data_ptr<acc_t>(), static_cast<acc_t>(1.0 / tau_s), static_cast<acc_t>(1.0 / tau_t),
        static_cast<acc_t>(scale), grad.mutable_data_ptr<scalar_t>(), scratch.mutable_data_ptr<acc_t>(), slots};
    MOKD_CALL(dino_backward<scalar_t COMMA acc_t>, shape, args)
  });
  return grad;
}

void ema_cpu(at::TensorList targets, at::TensorList sources, double weight) {
  TORCH_CHECK(targets.size() == sources.size(), "mokd::ema_: ", targets.size(), " targets but ", sources.size(),
              " sources");
  if (targets.empty()) return;
  const at::ScalarType dtype = targets[0].scalar_type();
  for (size_t i = 0; i < targets.size(); ++i) {
    const at::Tensor &t = targets[i], &s = sources[i];
    TORCH_CHECK(t.device().is_cpu() && s.device().is_cpu(), "mokd::ema_: pair ", i, " is not on the CPU");
    TORCH_CHECK(t.scalar_type() == dtype && s.scalar_type() == dtype, "mokd::ema_: pair ", i,
                " does not have the dtype of pair 0 (", c10::toString(dtype), ")");
    TORCH_CHECK(t.sizes() == s.sizes(), "mokd::ema_: pair ", i, ": shapes differ");
    TORCH_CHECK(t.is_contiguous() && s.is_contiguous(), "mokd::ema_: pair ", i, " is not contiguous");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "mokd_ema", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "mokd::ema_: float64 is not supported (fp32 arithmetic); use torch._foreach_lerp_");
    } else {
      std::vector<EmaPair<scalar_t>> pairs;
      pairs.reserve(targets.size());
      for (size_t i = 0; i < targets.size(); ++i) {
        pairs.push_back({targets[i].mutable_data_ptr<scalar_t>(), sources[i].const_data_ptr<scalar_t>(),
                         targets[i].numel()});
      }
      MOKD_CALL(ema<scalar_t>, pairs.data(), static_cast<int64_t>(pairs.size()), static_cast<float>(weight))
    }
  });
}

}  // namespace
}  // namespace mokd::native

TORCH_LIBRARY(mokd, m) {
  m.def(
      "dino_cross_entropy(Tensor student, Tensor teacher, Tensor? centre, float tau_s, float tau_t, int batch, "
      "bool exclude_same) -> (Tensor loss, Tensor column_sum, Tensor entropy, Tensor lse_s, Tensor lse_t)");
  m.def(
      "dino_cross_entropy_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? centre, Tensor lse_s, "
      "Tensor lse_t, float tau_s, float tau_t, int batch, bool exclude_same) -> Tensor");
  m.def("ema_(Tensor(a!)[] targets, Tensor[] sources, float weight) -> ()");
  m.def("cpu_capability() -> str", [] { return mokd::native::capability_name(); });
}

TORCH_LIBRARY_IMPL(mokd, CPU, m) {
  m.impl("dino_cross_entropy", &mokd::native::dino_cross_entropy_cpu);
  m.impl("dino_cross_entropy_backward", &mokd::native::dino_cross_entropy_backward_cpu);
  m.impl("ema_", &mokd::native::ema_cpu);
}

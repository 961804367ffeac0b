// CPU implementations of the ekipl:: ops whose schemas ekipl_kernels/ops.py defines.
//
// Tokens are processed a chunk of rows at a time: one GEMM writes the chunk's logits into a fp32 buffer
// (fp64 for fp64 inputs), the LM head's bias (if any) is added, one fused pass per row (at::parallel_for) turns each row into its log-prob,
// entropy, per-token loss and, in place, its logit gradient; two more GEMMs take that buffer to the
// hidden-state gradient of the chunk and the weight gradient (accumulated across chunks in fp32); the bias
// gradient is the column sums of the logit gradient.
// The [N, V] logits never exist and are never recomputed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

// Generated from ekipl_kernels/loss_scalars.py by op_builder into the build folder (-I): the slots of `scalars`.
#include "loss_scalars.h"
#include "softmax_row.h"
#include "token_loss.h"

namespace ekipl {
namespace {

// Rows per chunk: the buffer chunk_rows * V * 4 bytes stays under a fixed budget, so it does not grow
// with V. 200 MiB is about 340 rows at V = 152k: every GEMM call streams the whole weight, so chunks of a
// few hundred rows keep that cost small (64 MiB, ~110 rows, costs 10-15% more time on two cores), and the
// buffer is still about a seventh of the [1024, V] logits with their gradient that a materialised loss
// holds. The ops' scratch_bytes argument (KernelOptions.cpu_chunk_mb) replaces the budget when > 0.
constexpr int64_t kDefaultChunkBytes = int64_t(200) << 20;
constexpr int64_t kMinChunkRows = 16;

// The most rows the budget allows, then spread evenly over the chunks needed (no small last chunk,
// whose GEMMs would pay the full cost of streaming the weight for a few rows).
int64_t chunk_rows(int64_t n, int64_t vocab, int64_t element_size, int64_t scratch_bytes) {
  TORCH_CHECK(scratch_bytes >= 0, "ekipl: scratch_bytes must be >= 0 (0: the default); got ", scratch_bytes);
  const int64_t budget = scratch_bytes > 0 ? scratch_bytes : kDefaultChunkBytes;
  const int64_t most = std::max(kMinChunkRows, budget / std::max<int64_t>(1, vocab * element_size));
  const int64_t chunks = std::max<int64_t>(1, (n + most - 1) / most);
  return std::max<int64_t>(1, (n + chunks - 1) / chunks);
}

// The type the GEMM output and the row pass use: fp64 for fp64 inputs, fp32 for everything else.
at::ScalarType accumulate_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

void check_float_input(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "ekipl::", op, ": ", name, " must be a CPU tensor; got ", t.device());
  TORCH_CHECK(t.dim() == dim, "ekipl::", op, ": ", name, " must be ", dim, "-D; got shape ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
              "ekipl::", op, ": ", name, " must be float32, bfloat16, float16 or float64; got ", dtype);
}

// Targets as int64, checked against the vocabulary (an out-of-range id would read outside the row).
at::Tensor checked_targets(const char* op, const at::Tensor& targets, int64_t n, int64_t vocab) {
  TORCH_CHECK(targets.device().is_cpu() && targets.dim() == 1 && targets.size(0) == n, "ekipl::", op,
              ": targets must be a CPU tensor of shape [", n, "]; got ", targets.sizes(), " on ", targets.device());
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, "ekipl::", op,
              ": targets must be int64 or int32; got ", targets.scalar_type());
  at::Tensor ids = targets.to(at::kLong).contiguous();
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(p[t] >= 0 && p[t] < vocab, "ekipl::", op, ": targets[", t, "] = ", p[t], " is outside [0, ",
                vocab, ")");
  }
  return ids;
}

// A per-token [N] vector as contiguous fp32 (or nullopt).
std::optional<at::Tensor> token_vector(const char* op, const char* name, const std::optional<at::Tensor>& v,
                                       int64_t n) {
  if (!v.has_value()) return std::nullopt;
  TORCH_CHECK(v->device().is_cpu() && v->dim() == 1 && v->size(0) == n, "ekipl::", op, ": ", name,
              " must be a CPU tensor of shape [", n, "]; got ", v->sizes(), " on ", v->device());
  return v->to(at::kFloat).contiguous();
}

const float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

std::string loss_scalar_order() {
  std::string order;
  for (int64_t i = 0; i < kLossScalarCount; ++i) order += (i > 0 ? ", " : "") + std::string(kLossScalarNames[i]);
  return order;
}

// A switch of the scalars (kl_kind, expert_mode, policy_loss): a whole number in [low, high].
int64_t scalar_switch(const char* op, c10::ArrayRef<double> scalars, int64_t slot, int64_t low, int64_t high,
                      const char* meaning) {
  const double value = scalars[slot];
  TORCH_CHECK(value == std::floor(value) && value >= low && value <= high, "ekipl::", op, ": ",
              kLossScalarNames[slot], " (scalars[", slot, "]) must be ", meaning, "; got ", value);
  return static_cast<int64_t>(value);
}

// A row added to the table of ekipl_kernels/loss_scalars.py fails the build here until the op reads it; a row
// renamed or removed fails it where its constant is used.
static_assert(kLossScalarCount == 18,
              "the loss_scalars table changed: decode the new scalar in loss_params (or the op), then update this count");

// The ops' `scalars` argument, checked (count, finiteness, switches) and decoded; temperature is read by the ops.
LossParams loss_params(const char* op, c10::ArrayRef<double> scalars) {
  TORCH_CHECK(static_cast<int64_t>(scalars.size()) == kLossScalarCount, "ekipl::", op, ": scalars must hold the ",
              kLossScalarCount, " loss scalars in the order ", loss_scalar_order(),
              " (ekipl_kernels.loss_scalars.loss_scalars(config) builds them); got ", scalars.size(), " values");
  for (int64_t i = 0; i < kLossScalarCount; ++i) {
    TORCH_CHECK(std::isfinite(scalars[i]), "ekipl::", op, ": the loss scalars must be finite; got ", scalars[i],
                " for ", kLossScalarNames[i], " (scalars[", i, "])");
  }
  LossParams p;
  p.eps_low = scalars[kEpsLow];
  p.eps_high = scalars[kEpsHigh];
  p.dual_clip = scalars[kDualClip];
  p.beta = scalars[kBeta];
  p.kl_kind = scalar_switch(op, scalars, kKlKind, 1, 3, "1, 2 or 3 (k1, k2, k3)");
  p.entropy_coef = scalars[kEntropyCoef];
  p.expert_mode = scalar_switch(op, scalars, kExpertMode, kRatio, kShaped, "0 (ratio), 1 (is) or 2 (shaped)");
  p.shaping_gamma = scalars[kShapingGamma];
  p.is_cap = scalars[kIsCap];
  p.tis_cap = scalars[kTisCap];
  p.log_ratio_clamp = scalars[kLogRatioClamp];
  p.kl_clamp = scalars[kKlClamp];
  p.policy_loss = scalar_switch(op, scalars, kPolicyLoss, kClip, kSapo, "0 (clip), 1 (cispo) or 2 (sapo)");
  p.cispo_cap = scalars[kCispoCap];
  p.sapo_temperature_pos = scalars[kSapoTemperaturePos];
  p.sapo_temperature_neg = scalars[kSapoTemperatureNeg];
  p.kl_bias_correction = scalar_switch(op, scalars, kKlBiasCorrection, 0, 1, "0 or 1") != 0;
  TORCH_CHECK(p.policy_loss != kSapo || (p.sapo_temperature_pos > 0.0 && p.sapo_temperature_neg > 0.0), "ekipl::",
              op, ": the SAPO temperatures must be > 0; got ", p.sapo_temperature_pos, " and ", p.sapo_temperature_neg);
  return p;
}

// The per-token inputs of the loss ops, validated, with raw pointers for the row pass.
struct TokenBatch {
  LossParams params;
  at::Tensor advantages, agg_weight, is_expert;
  std::optional<at::Tensor> old_lp, ref_lp, beh_lp;
  const float *advantage_ptr, *weight_ptr, *old_ptr, *ref_ptr, *beh_ptr;
  const bool* expert_ptr;

  TokenBatch(const char* op, int64_t n, const at::Tensor& advantages_, const at::Tensor& agg_weight_,
             const at::Tensor& is_expert_, const std::optional<at::Tensor>& old_, const std::optional<at::Tensor>& ref_,
             const std::optional<at::Tensor>& beh_, const LossParams& p)
      : params(p),
        advantages(*token_vector(op, "advantages", advantages_, n)),
        agg_weight(*token_vector(op, "agg_weight", agg_weight_, n)),
        old_lp(token_vector(op, "old_logprobs", old_, n)),
        ref_lp(token_vector(op, "ref_logprobs", ref_, n)),
        beh_lp(token_vector(op, "behavior_logprobs", beh_, n)) {
    TORCH_CHECK(is_expert_.device().is_cpu() && is_expert_.dim() == 1 && is_expert_.size(0) == n, "ekipl::", op,
                ": is_expert must be a CPU tensor of shape [", n, "]; got ", is_expert_.sizes());
    is_expert = is_expert_.to(at::kBool).contiguous();
    TORCH_CHECK(p.beta <= 0.0 || ref_lp.has_value(), "ekipl::", op, ": ref_logprobs is required when beta > 0");
    TORCH_CHECK(!(p.expert_mode == kImportance || p.tis_cap > 0.0) || beh_lp.has_value(), "ekipl::", op,
                ": behavior_logprobs is required with expert_mode 'is' or tis_cap");
    advantage_ptr = advantages.data_ptr<float>();
    weight_ptr = agg_weight.data_ptr<float>();
    expert_ptr = is_expert.data_ptr<bool>();
    old_ptr = data_or_null(old_lp);
    ref_ptr = data_or_null(ref_lp);
    beh_ptr = data_or_null(beh_lp);
  }

  TokenInput input(int64_t t, double logprob, double entropy) const {
    return {logprob,
            entropy,
            advantage_ptr[t],
            expert_ptr[t],
            old_ptr != nullptr,
            old_ptr != nullptr ? old_ptr[t] : 0.0,
            ref_ptr != nullptr ? ref_ptr[t] : 0.0,
            beh_ptr != nullptr ? beh_ptr[t] : 0.0};
  }
};

// Where the row pass writes; pointers for outputs that were not asked for are null.
struct RowOutputs {
  float* logprobs;
  float* entropy;
  double* weighted_loss;  // w_t * l_t per token, summed in order afterwards (deterministic)
};

// The fused pass over rows [row0, row0 + rows) of a chunk: x holds their unscaled logits (row stride
// vocab); grad (may alias x, may be null) receives d loss / d x; tokens null = log-probs only.
template <typename T>
void process_rows(const T* x, T* grad, int64_t row0, int64_t rows, int64_t vocab, double temperature,
                  const int64_t* targets, const TokenBatch* tokens, bool want_entropy, const RowOutputs& out) {
  const T inv_tau = T(1.0 / temperature);
  const bool loss_needs_entropy = tokens != nullptr && tokens->params.entropy_coef != 0.0;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = row0 + r;
      const T* row = x + r * vocab;
      const RowSoftmax soft = row_softmax(row, vocab, inv_tau, want_entropy || loss_needs_entropy);
      const int64_t y = targets[t];
      const double lp = double(row[y] * inv_tau - T(soft.max_z)) - soft.log_sum;
      out.logprobs[t] = float(lp);
      if (out.entropy != nullptr) out.entropy[t] = float(soft.entropy);
      if (tokens == nullptr) continue;

      T* grad_row = grad == nullptr ? nullptr : grad + r * vocab;
      const double w = tokens->weight_ptr[t];
      if (w == 0.0) {  // masked: contributes nothing, whatever its (possibly garbage) inputs
        out.weighted_loss[t] = 0.0;
        if (grad_row != nullptr) std::fill(grad_row, grad_row + vocab, T(0));
        continue;
      }
      const TokenLoss l = token_loss(tokens->params, tokens->input(t, lp, soft.entropy));
      out.weighted_loss[t] = w * l.loss;
      if (grad_row != nullptr) {
        const double scale = w / temperature;  // d z / d x = 1 / tau
        row_grad(row, grad_row, vocab, inv_tau, soft, y, scale * l.d_logprob, scale * l.d_entropy);
      }
    }
  });
}

// The chunk's hidden states h (tokens row0...) with the rows of masked tokens zeroed: their logit gradient
// is zero, but 0 * NaN is NaN in the weight-gradient GEMM, and a masked row may hold anything.
at::Tensor zero_masked_rows(const at::Tensor& h, const TokenBatch& tokens, int64_t row0) {
  const at::Tensor keep = tokens.agg_weight.narrow(0, row0, h.size(0)).ne(0);
  return keep.all().item<bool>() ? h : at::where(keep.unsqueeze(1), h, at::zeros({}, h.options()));
}

at::Tensor sum_in_order(const std::vector<double>& values) {
  double total = 0.0;
  for (double v : values) total += v;
  return at::scalar_tensor(total, at::kFloat);
}

at::Tensor float_vector(int64_t n, bool wanted) { return at::empty({wanted ? n : 0}, at::kFloat); }

// logits = hidden @ weight.T + bias a chunk at a time; with tokens, also the loss and (on request) its gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_pass(
    const char* op, const at::Tensor& hidden_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& targets_in, double temperature, const TokenBatch* tokens, bool need_entropy, bool grad_hidden,
    bool grad_weight, bool grad_bias, int64_t scratch_bytes) {
  check_float_input(op, "hidden", hidden_in, 2);
  check_float_input(op, "weight", weight_in, 2);
  TORCH_CHECK(weight_in.scalar_type() == hidden_in.scalar_type(), "ekipl::", op, ": weight dtype ",
              weight_in.scalar_type(), " must equal hidden dtype ", hidden_in.scalar_type());
  TORCH_CHECK(weight_in.size(1) == hidden_in.size(1), "ekipl::", op, ": hidden ", hidden_in.sizes(),
              " and weight ", weight_in.sizes(), " disagree on H");
  TORCH_CHECK(temperature > 0.0, "ekipl::", op, ": temperature must be > 0; got ", temperature);
  const int64_t n = hidden_in.size(0), vocab = weight_in.size(0), width = hidden_in.size(1);
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->device().is_cpu() && bias_in->dim() == 1 && bias_in->size(0) == vocab &&
                    bias_in->scalar_type() == weight_in.scalar_type(),
                "ekipl::", op, ": bias must be a CPU tensor [", vocab, "] of the weight's dtype; got ", bias_in->sizes(),
                " ", bias_in->scalar_type());
  }
  grad_bias = grad_bias && bias_in.has_value();
  const at::Tensor targets = checked_targets(op, targets_in, n, vocab);
  const at::ScalarType dtype = hidden_in.scalar_type();
  const at::ScalarType acc = accumulate_type(dtype);
  const bool want_grads = tokens != nullptr && (grad_hidden || grad_weight || grad_bias);

  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor weight = weight_in.to(acc).contiguous();  // converted once; no copy for fp32/fp64
  const std::optional<at::Tensor> bias =
      bias_in.has_value() ? std::optional<at::Tensor>(bias_in->to(acc).contiguous()) : std::nullopt;
  at::Tensor d_bias_acc = grad_bias && tokens != nullptr ? at::zeros({vocab}, weight.options()) : at::Tensor();
  at::Tensor logprobs = float_vector(n, true);
  at::Tensor entropy = float_vector(n, need_entropy);
  std::vector<double> weighted_loss(tokens != nullptr ? n : 0, 0.0);
  at::Tensor d_hidden = grad_hidden && tokens != nullptr ? at::empty_like(hidden) : hidden.new_empty({0});
  // Written by the first chunk's GEMM and accumulated by the others, so not zero-filled (unless N = 0).
  at::Tensor d_weight_acc;
  if (grad_weight && tokens != nullptr) {
    d_weight_acc = n > 0 ? at::empty({vocab, width}, weight.options()) : at::zeros({vocab, width}, weight.options());
  }
  const RowOutputs out{logprobs.data_ptr<float>(), need_entropy ? entropy.data_ptr<float>() : nullptr,
                       weighted_loss.data()};

  const int64_t step = chunk_rows(n, vocab, at::elementSize(acc), scratch_bytes);
  at::Tensor buffer = at::empty({step, vocab}, weight.options());
  for (int64_t start = 0; start < n; start += step) {
    const int64_t rows = std::min(step, n - start);
    const at::Tensor h = hidden.narrow(0, start, rows).to(acc);  // a view for fp32/fp64
    at::Tensor logits = buffer.narrow(0, 0, rows);
    at::mm_out(logits, h, weight.t());
    if (bias.has_value()) logits.add_(*bias);
    AT_DISPATCH_FLOATING_TYPES(acc, "ekipl_linear_rows", [&] {
      scalar_t* x = logits.data_ptr<scalar_t>();
      process_rows<scalar_t>(x, want_grads ? x : nullptr, start, rows, vocab, temperature,
                             targets.data_ptr<int64_t>(), tokens, need_entropy, out);
    });
    if (!want_grads) continue;
    if (grad_bias) d_bias_acc.add_(logits.sum(0));  // masked rows' gradients are exactly 0
    if (grad_hidden) {
      at::Tensor dh = d_hidden.narrow(0, start, rows);
      if (dtype == acc) {
        at::mm_out(dh, logits, weight);
      } else {
        dh.copy_(at::mm(logits, weight));
      }
    }
    if (grad_weight) {
      const at::Tensor h_rows = zero_masked_rows(h, *tokens, start);
      if (start == 0) {
        at::mm_out(d_weight_acc, logits.t(), h_rows);
      } else {
        d_weight_acc.addmm_(logits.t(), h_rows);
      }
    }
  }

  const at::Tensor loss = tokens != nullptr ? sum_in_order(weighted_loss) : at::Tensor();
  const at::Tensor d_weight = grad_weight && tokens != nullptr ? d_weight_acc.to(dtype) : weight_in.new_empty({0});
  const at::Tensor d_bias = d_bias_acc.defined() ? d_bias_acc.to(dtype) : weight_in.new_empty({0});
  return {loss, logprobs, entropy, d_hidden, d_weight, d_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_grpo_loss(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, const at::Tensor& advantages,
    const at::Tensor& agg_weight, const at::Tensor& is_expert, const std::optional<at::Tensor>& old_logprobs,
    const std::optional<at::Tensor>& ref_logprobs, const std::optional<at::Tensor>& behavior_logprobs,
    c10::ArrayRef<double> scalars, bool need_entropy, bool grad_hidden, bool grad_weight,
    int64_t /*schedule: one on CPU*/, int64_t scratch_bytes, const std::optional<at::Tensor>& bias, bool grad_bias) {
  const char* op = "fused_linear_grpo_loss";
  check_float_input(op, "hidden", hidden, 2);
  const LossParams params = loss_params(op, scalars);
  const double temperature = scalars[kTemperature];
  const TokenBatch tokens(op, hidden.size(0), advantages, agg_weight, is_expert, old_logprobs, ref_logprobs,
                          behavior_logprobs, params);
  return linear_pass(op, hidden, weight, bias, targets, temperature, &tokens, need_entropy, grad_hidden, grad_weight,
                     grad_bias, scratch_bytes);
}

std::tuple<at::Tensor, at::Tensor> fused_linear_logprobs(const at::Tensor& hidden, const at::Tensor& weight,
                                                         const at::Tensor& targets, double temperature,
                                                         bool need_entropy, int64_t /*path: one on CPU*/,
                                                         int64_t scratch_bytes, const std::optional<at::Tensor>& bias) {
  auto [loss, logprobs, entropy, d_hidden, d_weight, d_bias] = linear_pass(
      "fused_linear_logprobs", hidden, weight, bias, targets, temperature, nullptr, need_entropy, false, false, false,
      scratch_bytes);
  return {logprobs, entropy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grpo_loss(
    const at::Tensor& logits_in, const at::Tensor& targets_in, const at::Tensor& advantages,
    const at::Tensor& agg_weight, const at::Tensor& is_expert, const std::optional<at::Tensor>& old_logprobs,
    const std::optional<at::Tensor>& ref_logprobs, const std::optional<at::Tensor>& behavior_logprobs,
    c10::ArrayRef<double> scalars, bool need_entropy, bool grad_logits) {
  const char* op = "grpo_loss";
  check_float_input(op, "logits", logits_in, 2);
  const LossParams params = loss_params(op, scalars);
  const double temperature = scalars[kTemperature];
  TORCH_CHECK(temperature > 0.0, "ekipl::", op, ": temperature must be > 0; got ", temperature);
  const int64_t n = logits_in.size(0), vocab = logits_in.size(1);
  const at::Tensor targets = checked_targets(op, targets_in, n, vocab);
  const TokenBatch tokens(op, n, advantages, agg_weight, is_expert, old_logprobs, ref_logprobs, behavior_logprobs,
                          params);
  const at::ScalarType dtype = logits_in.scalar_type();
  const at::ScalarType acc = accumulate_type(dtype);
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor logprobs = float_vector(n, true);
  at::Tensor entropy = float_vector(n, need_entropy);
  std::vector<double> weighted_loss(n, 0.0);
  at::Tensor d_logits = grad_logits ? at::empty_like(logits) : logits.new_empty({0});
  const RowOutputs out{logprobs.data_ptr<float>(), need_entropy ? entropy.data_ptr<float>() : nullptr,
                       weighted_loss.data()};

  // fp32/fp64 logits are read in place and the gradient written straight into the output; other dtypes
  // go through a chunk-sized buffer of the accumulation type.
  const int64_t step = dtype == acc ? std::max<int64_t>(n, 1) : chunk_rows(n, vocab, at::elementSize(acc), 0);
  for (int64_t start = 0; start < n; start += step) {
    const int64_t rows = std::min(step, n - start);
    const at::Tensor x = logits.narrow(0, start, rows).to(acc);
    at::Tensor g = !grad_logits ? at::Tensor() : dtype == acc ? d_logits.narrow(0, start, rows) : at::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES(acc, "ekipl_logits_rows", [&] {
      process_rows<scalar_t>(x.data_ptr<scalar_t>(), grad_logits ? g.data_ptr<scalar_t>() : nullptr, start, rows,
                             vocab, temperature, targets.data_ptr<int64_t>(), &tokens, need_entropy, out);
    });
    if (grad_logits && dtype != acc) d_logits.narrow(0, start, rows).copy_(g);
  }
  return {sum_in_order(weighted_loss), logprobs, entropy, d_logits};
}

}  // namespace
}  // namespace ekipl

TORCH_LIBRARY_IMPL(ekipl, CPU, m) {
  m.impl("fused_linear_grpo_loss", &ekipl::fused_linear_grpo_loss);
  m.impl("grpo_loss", &ekipl::grpo_loss);
  m.impl("fused_linear_logprobs", &ekipl::fused_linear_logprobs);
}

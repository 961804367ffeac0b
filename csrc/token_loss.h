// The per-token GRPO loss l(lp, H) and its derivatives dl/dlp and dl/dH.
//
// The normative definition is ekipl_kernels.reference.token_losses (DESIGN.md, "The loss"); this is the
// same math for one token, in double, with the reference's autograd conventions written out:
//   * clip: the gradient of max(-rho*A, -clip(rho)*A) is zero only where the clipped branch is strictly
//     larger (clamp passes gradient at its bounds, ties are inside the range where both branches agree);
//   * cispo: -w*A*lp with w = min(rho, cap) not differentiated, so d/dlp = -w*A;
//   * sapo: -sigmoid(t*(rho - 1))*4/t*A, t by the sign of A, d/dlp = -4*A*s*(1 - s)*rho;
//   * kl_bias_correction: the KL term times rho (differentiated: d(rho*kl) = rho*dkl + kl*drho);
//   * dual clip replaces the loss by the constant -c*A (zero gradient);
//   * the TIS weight min(exp(old - beh), cap) multiplies policy tokens and is not differentiated;
//   * old_logprobs = None means old = stop_grad(lp): ratio 1, d(ratio)/d(lp) = 1;
//   * expert tokens under "is": -w*A with w = exp(lp - beh), or min(that, is_cap), unclipped; the
//     gradient is -w*A even where the cap is active (a truncated importance weight);
//   * a clamp (of a log-ratio before exp, of k3) passes the gradient inside [-c, c], bounds included,
//     and zero outside, as torch.clamp does.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace ekipl {

enum ExpertMode : int64_t { kRatio = 0, kImportance = 1, kShaped = 2 };
enum PolicyLoss : int64_t { kClip = 0, kCispo = 1, kSapo = 2 };

// The loss scalars of the ops' `scalars` argument (ekipl_kernels/loss_scalars.py, whose table says what each
// means), decoded; dual_clip, the caps and the clamps are 0 when off.
struct LossParams {
  double eps_low;
  double eps_high;
  double dual_clip;
  double beta;
  int64_t kl_kind;  // 1, 2, 3 for k1, k2, k3
  double entropy_coef;
  int64_t expert_mode;
  double shaping_gamma;
  double is_cap;
  double tis_cap;
  double log_ratio_clamp;
  double kl_clamp;
  int64_t policy_loss;
  double cispo_cap;
  double sapo_temperature_pos;
  double sapo_temperature_neg;
  bool kl_bias_correction;
};

// x clamped to [-bound, bound] (bound 0: not clamped) and d clamp / dx.
struct Clamped {
  double value;
  double slope;
};

inline Clamped clamp(double x, double bound) {
  if (bound > 0.0 && x > bound) return {bound, 0.0};
  if (bound > 0.0 && x < -bound) return {-bound, 0.0};
  return {x, 1.0};
}

// One token's inputs; old/ref/beh are read only when has_old / the config needs them.
struct TokenInput {
  double logprob;
  double entropy;
  double advantage;
  bool expert;
  bool has_old;
  double old_logprob;
  double ref_logprob;
  double behavior_logprob;
};

struct TokenLoss {
  double loss;
  double d_logprob;
  double d_entropy;
};

inline TokenLoss token_loss(const LossParams& p, const TokenInput& t) {
  const double adv = t.advantage;
  const double old = t.has_old ? t.old_logprob : t.logprob;
  const bool importance = t.expert && p.expert_mode == kImportance;
  const Clamped log_ratio = clamp(t.logprob - (importance ? t.behavior_logprob : old), p.log_ratio_clamp);
  const double ratio = std::exp(log_ratio.value);
  double pg;
  double d_pg;
  if (t.expert && p.expert_mode == kShaped) {
    const double prob = std::exp(t.logprob);
    const double denom = prob + p.shaping_gamma;
    pg = -adv * prob / denom;
    d_pg = -adv * p.shaping_gamma * prob / (denom * denom);
  } else if (importance) {
    const double w = p.is_cap > 0.0 ? std::min(ratio, p.is_cap) : ratio;
    pg = -adv * w;
    d_pg = -adv * w * log_ratio.slope;
  } else {
    if (p.policy_loss == kCispo) {
      const double w = std::min(ratio, p.cispo_cap);
      pg = -w * adv * t.logprob;
      d_pg = -w * adv;
    } else if (p.policy_loss == kSapo) {
      const double tau = adv > 0.0 ? p.sapo_temperature_pos : p.sapo_temperature_neg;
      const double s = 1.0 / (1.0 + std::exp(-tau * (ratio - 1.0)));
      pg = -s * 4.0 / tau * adv;
      d_pg = -4.0 * adv * s * (1.0 - s) * ratio * log_ratio.slope;
    } else {
      const double unclipped = -ratio * adv;
      const double clipped = -std::min(std::max(ratio, 1.0 - p.eps_low), 1.0 + p.eps_high) * adv;
      pg = std::max(unclipped, clipped);
      d_pg = clipped > unclipped ? 0.0 : -adv * ratio * log_ratio.slope;
      if (p.dual_clip > 0.0 && adv < 0.0 && -p.dual_clip * adv < pg) {
        pg = -p.dual_clip * adv;
        d_pg = 0.0;
      }
    }
    if (p.tis_cap > 0.0 && !t.expert) {
      const double tis = std::min(std::exp(old - t.behavior_logprob), p.tis_cap);
      pg *= tis;
      d_pg *= tis;
    }
  }

  double loss = pg;
  double d_logprob = d_pg;
  if (p.beta > 0.0) {
    const double d = t.ref_logprob - t.logprob;
    double kl;
    double d_kl;  // d kl / d lp
    if (p.kl_kind == 1) {
      kl = -d;
      d_kl = 1.0;
    } else if (p.kl_kind == 2) {
      kl = 0.5 * d * d;
      d_kl = -d;
    } else {
      const Clamped dc = clamp(d, p.log_ratio_clamp);
      const double e = std::exp(dc.value);
      const Clamped k3 = clamp(e - dc.value - 1.0, p.kl_clamp);
      kl = k3.value;
      d_kl = (1.0 - e) * dc.slope * k3.slope;
    }
    if (p.kl_bias_correction) {
      d_kl = ratio * d_kl + kl * ratio * log_ratio.slope;
      kl *= ratio;
    }
    loss += p.beta * kl;
    d_logprob += p.beta * d_kl;
  }
  loss -= p.entropy_coef * t.entropy;
  return {loss, d_logprob, -p.entropy_coef};
}

}  // namespace ekipl

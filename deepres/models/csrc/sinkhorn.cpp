// Sinkhorn–Knopp on exp(logits) for many small n × n matrices, forward and backward, on the CPU.
//
// deepres.models.stream_mixing_ops runs mHC's projection of every block's H^res onto the doubly
// stochastic matrices as 2·iters log-softmax ops (and 4·iters more in backward); each costs a few
// microseconds on a CPU core whatever its size, about a quarter of an mhc block's training step at the
// digits' width. Here the same iterations are one call forward and one backward, the same function up to
// float rounding (tests/test_hyper.py compares the two and the gradients with a float64 reference).
//
// Layout: logits (n, n, B) contiguous, matrix b's entry (i, j) at (i·n + j)·B + b, batch innermost, so
// that every line of the iteration is a loop over B contiguous values the compiler vectorises.
//
// The iteration runs on P = exp(L − max L) (per matrix), where a normalisation is a sum and a division:
//     P ← P / rowsum(P);  P ← P / colsum(P)      (iters times)
// and its gradient, with P_s the matrix before step s and S_s its line sums, is
//     dP_s = (dP_{s+1} − Σ_line dP_{s+1} ⊙ P_{s+1}) / S_s,      dL = dP_0 ⊙ P_0.
// A matrix whose logits span more than kSpread (in float; kSpread · 8 in double) could underflow to a
// zero line in that form; it takes the log-domain iteration instead (log-softmax by lines, as the
// Python ops do), one matrix at a time.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr double kSpread = 25.0;  // e^-75 (three spreads, the worst ratio of two scaled entries) > FLT_MIN

template <typename T>
T spread_limit() {
  return static_cast<T>(sizeof(T) >= 8 ? 8.0 * kSpread : kSpread);
}

// ---- the log domain, one matrix (m: n·n values, row-major) -------------------------------------

template <typename T>
void log_normalise(T* m, int64_t n, bool rows) {
  for (int64_t a = 0; a < n; ++a) {
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < n; ++c) mx = std::max(mx, rows ? m[a * n + c] : m[c * n + a]);
    T s = 0;
    for (int64_t c = 0; c < n; ++c) s += std::exp((rows ? m[a * n + c] : m[c * n + a]) - mx);
    const T lse = mx + std::log(s);
    for (int64_t c = 0; c < n; ++c) (rows ? m[a * n + c] : m[c * n + a]) -= lse;
  }
}

// steps: (2·iters + 1) · n · n values; steps[0] the logits, steps[s + 1] after step s
template <typename T>
void log_forward(T* steps, int64_t n, int64_t iters) {
  const int64_t nn = n * n;
  for (int64_t s = 0; s < 2 * iters; ++s) {
    std::copy(steps + s * nn, steps + (s + 1) * nn, steps + (s + 1) * nn);
    log_normalise(steps + (s + 1) * nn, n, s % 2 == 0);
  }
}

// g: n·n, the gradient with respect to exp(last step); becomes the gradient with respect to the logits
template <typename T>
void log_backward(T* g, const T* steps, int64_t n, int64_t iters) {
  const int64_t nn = n * n;
  const T* last = steps + 2 * iters * nn;
  for (int64_t k = 0; k < nn; ++k) g[k] *= std::exp(last[k]);
  for (int64_t s = 2 * iters - 1; s >= 0; --s) {
    const T* y = steps + (s + 1) * nn;  // the output of step s, a log-softmax by lines
    const bool rows = s % 2 == 0;
    for (int64_t a = 0; a < n; ++a) {
      T sum = 0;
      for (int64_t c = 0; c < n; ++c) sum += g[rows ? a * n + c : c * n + a];
      for (int64_t c = 0; c < n; ++c) {
        const int64_t k = rows ? a * n + c : c * n + a;
        g[k] -= std::exp(y[k]) * sum;
      }
    }
  }
}

// ---- the exp domain, a block of samples [b0, b1) with the batch innermost -------------------------

// p: (n, n, W) for W = b1 − b0 samples; divides every line of the given kind by its sum, kept in sums (n, W)
template <typename T>
void exp_normalise(T* p, T* sums, int64_t n, int64_t w, bool rows) {
  for (int64_t a = 0; a < n; ++a) {
    T* sum = sums + a * w;
    std::fill(sum, sum + w, T(0));
    for (int64_t c = 0; c < n; ++c) {
      const T* line = p + (rows ? a * n + c : c * n + a) * w;
      for (int64_t b = 0; b < w; ++b) sum[b] += line[b];
    }
    for (int64_t c = 0; c < n; ++c) {
      T* line = p + (rows ? a * n + c : c * n + a) * w;
      for (int64_t b = 0; b < w; ++b) line[b] /= sum[b];
    }
  }
}

// Which samples of [b0, b1) take the log domain: logits spanning more than the spread limit.
template <typename T>
std::vector<char> needs_log(const T* logits, int64_t nn, int64_t batch, int64_t b0, int64_t b1) {
  std::vector<char> flag(b1 - b0, 0);
  for (int64_t b = b0; b < b1; ++b) {
    T lo = std::numeric_limits<T>::infinity(), hi = -lo;
    for (int64_t k = 0; k < nn; ++k) {
      const T v = logits[k * batch + b];
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    flag[b - b0] = !(hi - lo <= spread_limit<T>());  // also a NaN or an infinity
  }
  return flag;
}

// P_0 = exp(L − max L) for samples [b0, b1) into p (n·n, W)
template <typename T>
void exp_start(T* p, const T* logits, int64_t nn, int64_t batch, int64_t b0, int64_t b1) {
  const int64_t w = b1 - b0;
  std::vector<T> mx(w, -std::numeric_limits<T>::infinity());
  for (int64_t k = 0; k < nn; ++k)
    for (int64_t b = 0; b < w; ++b) mx[b] = std::max(mx[b], logits[k * batch + b0 + b]);
  for (int64_t k = 0; k < nn; ++k)
    for (int64_t b = 0; b < w; ++b) p[k * w + b] = std::exp(logits[k * batch + b0 + b] - mx[b]);
}

constexpr int64_t kGrain = 64;  // samples per task: one block of work for at::parallel_for

template <typename T>
void forward_kernel(const T* logits, T* out, int64_t n, int64_t batch, int64_t iters) {
  const int64_t nn = n * n;
  at::parallel_for(0, batch, kGrain, [&](int64_t b0, int64_t b1) {
    const int64_t w = b1 - b0;
    std::vector<T> p(nn * w), sums(n * w);
    exp_start(p.data(), logits, nn, batch, b0, b1);
    for (int64_t s = 0; s < 2 * iters; ++s) exp_normalise(p.data(), sums.data(), n, w, s % 2 == 0);
    for (int64_t k = 0; k < nn; ++k)
      for (int64_t b = 0; b < w; ++b) out[k * batch + b0 + b] = p[k * w + b];
    const std::vector<char> flag = needs_log(logits, nn, batch, b0, b1);
    std::vector<T> steps;
    for (int64_t b = b0; b < b1; ++b) {
      if (!flag[b - b0]) continue;
      steps.assign((2 * iters + 1) * nn, T(0));
      for (int64_t k = 0; k < nn; ++k) steps[k] = logits[k * batch + b];
      log_forward(steps.data(), n, iters);
      for (int64_t k = 0; k < nn; ++k) out[k * batch + b] = std::exp(steps[2 * iters * nn + k]);
    }
  });
}

template <typename T>
void backward_kernel(const T* grad, const T* logits, T* grad_logits, int64_t n, int64_t batch, int64_t iters) {
  const int64_t nn = n * n;
  at::parallel_for(0, batch, kGrain, [&](int64_t b0, int64_t b1) {
    const int64_t w = b1 - b0, steps_n = 2 * iters;
    // every step's matrix (P_0 … P_2iters) and line sums (S_0 … S_2iters−1), recomputed
    std::vector<T> p((steps_n + 1) * nn * w), sums(steps_n * n * w), g(nn * w), dot(w);
    exp_start(p.data(), logits, nn, batch, b0, b1);
    for (int64_t s = 0; s < steps_n; ++s) {
      std::copy(p.begin() + s * nn * w, p.begin() + (s + 1) * nn * w, p.begin() + (s + 1) * nn * w);
      exp_normalise(p.data() + (s + 1) * nn * w, sums.data() + s * n * w, n, w, s % 2 == 0);
    }
    for (int64_t k = 0; k < nn; ++k)
      for (int64_t b = 0; b < w; ++b) g[k * w + b] = grad[k * batch + b0 + b];
    for (int64_t s = steps_n - 1; s >= 0; --s) {
      const T* after = p.data() + (s + 1) * nn * w;
      const T* sum = sums.data() + s * n * w;
      const bool rows = s % 2 == 0;
      for (int64_t a = 0; a < n; ++a) {
        std::fill(dot.begin(), dot.end(), T(0));
        for (int64_t c = 0; c < n; ++c) {
          const int64_t k = rows ? a * n + c : c * n + a;
          for (int64_t b = 0; b < w; ++b) dot[b] += g[k * w + b] * after[k * w + b];
        }
        for (int64_t c = 0; c < n; ++c) {
          const int64_t k = rows ? a * n + c : c * n + a;
          for (int64_t b = 0; b < w; ++b) g[k * w + b] = (g[k * w + b] - dot[b]) / sum[a * w + b];
        }
      }
    }
    for (int64_t k = 0; k < nn; ++k)
      for (int64_t b = 0; b < w; ++b) grad_logits[k * batch + b0 + b] = g[k * w + b] * p[k * w + b];
    const std::vector<char> flag = needs_log(logits, nn, batch, b0, b1);
    std::vector<T> steps, gl(nn);
    for (int64_t b = b0; b < b1; ++b) {
      if (!flag[b - b0]) continue;
      steps.assign((steps_n + 1) * nn, T(0));
      for (int64_t k = 0; k < nn; ++k) steps[k] = logits[k * batch + b];
      log_forward(steps.data(), n, iters);
      for (int64_t k = 0; k < nn; ++k) gl[k] = grad[k * batch + b];
      log_backward(gl.data(), steps.data(), n, iters);
      for (int64_t k = 0; k < nn; ++k) grad_logits[k * batch + b] = gl[k];
    }
  });
}

void check(const at::Tensor& logits, int64_t iters) {
  TORCH_CHECK(logits.device().is_cpu(), "deepres::sinkhorn runs on CPU tensors");
  TORCH_CHECK(logits.dim() >= 2 && logits.size(0) == logits.size(1),
              "deepres::sinkhorn takes (n, n, ...) logits, got ", logits.sizes());
  TORCH_CHECK(iters >= 1, "deepres::sinkhorn needs iters >= 1");
}

at::Tensor sinkhorn_forward(const at::Tensor& logits, int64_t iters) {
  check(logits, iters);
  const at::Tensor x = logits.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.size(0), batch = n ? x.numel() / (n * n) : 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deepres::sinkhorn_forward", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, batch, iters);
  });
  return out;
}

at::Tensor sinkhorn_backward(const at::Tensor& grad, const at::Tensor& logits, int64_t iters) {
  check(logits, iters);
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type(),
              "deepres::sinkhorn_backward: grad and logits must match");
  const at::Tensor x = logits.contiguous(), g = grad.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.size(0), batch = n ? x.numel() / (n * n) : 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deepres::sinkhorn_backward", [&] {
    backward_kernel<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, batch,
                              iters);
  });
  return out;
}

}  // namespace

// The schemas, and the CPU kernels behind them (deepres.models.cpu_kernels registers their shapes for
// torch.compile and meta tensors).
TORCH_LIBRARY(deepres, m) {
  m.def("sinkhorn_forward(Tensor logits, int iters) -> Tensor");
  m.def("sinkhorn_backward(Tensor grad, Tensor logits, int iters) -> Tensor");
}

TORCH_LIBRARY_IMPL(deepres, CPU, m) {
  m.impl("sinkhorn_forward", &sinkhorn_forward);
  m.impl("sinkhorn_backward", &sinkhorn_backward);
}

// Hand-written C++ port of eqcore's Adam solver (eqcore/solvers/adam_numba.py + rowmath.py),
// loop for loop; loss_grad's sums (Numba fastmath={"reassoc"}) carry `omp simd reduction`.
#include <cmath>
#include <cstdint>
#include <omp.h>

namespace {

inline float fmin_(float a, float b) { return b < a ? b : a; }
inline float fmax_(float a, float b) { return b > a ? b : a; }

inline float quant_code(float x, float s, float qmin, float qmax) { return fmin_(fmax_(std::rint(x / s), qmin), qmax); }

inline void loss_grad(const float* __restrict xs, int64_t n, float s, float qmin, float qmax, double& lo, double& go) {
  double sd = s, loss = 0.0, grad = 0.0;
#pragma omp simd reduction(+ : loss, grad)
  for (int64_t i = 0; i < n; i++) {
    float xi = xs[i];
    double q = (double)quant_code(xi, s, qmin, qmax);
    double err = sd * q - (double)xi;
    loss += err * err;
    grad += err * q;
  }
  lo = loss;
  go = grad;
}

float group_adam(const float* x, int64_t n, float qmin, float qmax, int64_t steps, double lr, double beta1,
                 double beta2, double eps, float smax) {
  float absmax = 0.0f;
  for (int64_t i = 0; i < n; i++) {
    float a = std::fabs(x[i]);
    if (a > absmax) absmax = a;
  }
  double s0 = (double)absmax / (double)qmax;  // rowmath.initial_scale
  if (!(s0 > 0.0) || std::isinf(s0)) s0 = 1.0;
  float best_s = fmin_((float)s0, smax);
  if (steps == 0) return best_s;
  double nf = (double)n, u = 1.0, m = 0.0, v = 0.0, best_loss = INFINITY;
  for (int64_t t = 1; t < steps + 1; t++) {
    float s = fmin_((float)(u * s0), smax);
    double loss, grad;
    loss_grad(x, n, s, qmin, qmax, loss, grad);
    if (loss < best_loss) {
      best_loss = loss;
      best_s = s;
    }
    double g = 2.0 * grad / (nf * s0);
    double td = (double)t;  // rowmath.adam_step
    m = beta1 * m + (1.0 - beta1) * g;
    v = beta2 * v + (1.0 - beta2) * g * g;
    double mhat = m / (1.0 - std::pow(beta1, td));
    double vhat = v / (1.0 - std::pow(beta2, td));
    u = u - lr * mhat / (std::sqrt(vhat) + eps);
    if (u < 1e-3) u = 1e-3;
  }
  return best_s;
}

}  // namespace

extern "C" void adam_scales(const float* flat, int64_t rows, int64_t cols, int64_t g, int64_t n_groups, float qmin,
                            float qmax, int64_t steps, double lr, double beta1, double beta2, double eps, float smax,
                            float* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t k = 0; k < rows * n_groups; k++) {
    int64_t r = k / n_groups;
    int64_t lo = (k - r * n_groups) * g;
    int64_t n = g < cols - lo ? g : cols - lo;
    out[k] = group_adam(flat + r * cols + lo, n, qmin, qmax, steps, lr, beta1, beta2, eps, smax);
  }
}

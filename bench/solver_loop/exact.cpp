// Hand-written C++ port of eqcore's exact solver (eqcore/solvers/exact_sweep.py + exact_numba.py),
// loop for loop. The jit_sum loops (Numba fastmath={"reassoc"}) carry `omp simd reduction`;
// every other float operation keeps its order. Build (bench/solver_loop.py): g++ -O3
// -march=native -fopenmp -fno-trapping-math -fno-math-errno, with -ffp-contract=off (no FMA: the
// scales are bit-identical to Numba's) or -ffp-contract=fast (FMA in any a * b + c; the contract's
// float32 quotient a / s and its rint are untouched, only the float64 losses and bounds round
// differently, which can reorder two scales only when their losses agree to ~1e-16).
// Branch-free forms (ternaries, not || or (int64_t)floor) where g++ vectorises no other form.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

namespace {

constexpr double TINY = 1.401298464324817e-45;
constexpr double SHRINK = 0.9, WINDOW = 1.1, MARGIN = 1e-6, BAND = 3e-14, LLOYD_GAIN = 0.03;
constexpr int LLOYD = 4, LEVELS = 256, SHIFT = 8, BLOCKS = 4;

inline int window_count(float qmax) { return qmax < 2 ? 0 : qmax < 4 ? 1 : qmax < 16 ? 2 : 4; }
inline int lo_steps(float qmax) { return qmax < 4 ? 3 : qmax < 16 ? 2 : 1; }
inline int hi_steps(float qmax) { return qmax < 4 ? 4 : qmax < 16 ? 5 : 12; }
inline float lo_step(float s, int k) {
  for (int i = 0; i < k; i++) {
    float shrunk = (float)((double)s * SHRINK);
    if ((double)shrunk <= TINY || shrunk >= s) return (float)TINY;
    s = shrunk;
  }
  return s;
}
inline float hi_step(float s, int k) {
  for (int i = 0; i < k; i++) s = (float)((double)s / SHRINK);
  return s;
}

inline float fmin_(float a, float b) { return b < a ? b : a; }
inline float fmax_(float a, float b) { return b > a ? b : a; }
inline double dmin_(double a, double b) { return b < a ? b : a; }
inline double dmax_(double a, double b) { return b > a ? b : a; }

// the contract: the float32 quotient, rounded half to even (rint), clamped to [0, top]
inline float code(float a, float s, float top) { return fmin_(fmax_(std::rint(a / s), 0.0f), top); }

// max(0, min(w[:m])) as the least bit pattern: an integer min (vectorised; a double min is not)
inline double least(const double* w, int64_t m) {
  int64_t b = 0x7FF0000000000000;
  for (int64_t j = 0; j < m; j++) {
    double v = w[j] > 0.0 ? w[j] : 0.0;
    int64_t i;
    std::memcpy(&i, &v, 8);
    b = i < b ? i : b;
  }
  double r;
  std::memcpy(&r, &b, 8);
  return r;
}
inline float next_up(float f) { int32_t i; std::memcpy(&i, &f, 4); i += 1; std::memcpy(&f, &i, 4); return f; }
inline float next_down(float f) { int32_t i; std::memcpy(&i, &f, 4); i -= 1; std::memcpy(&f, &i, 4); return f; }

double rms_step(float qmax) {
  if (qmax < 2) return 0.996;
  if (qmax < 4) return 0.586;
  if (qmax < 8) return 0.335;
  return 4.5 / (2.0 * ((double)qmax + 1.0));
}

struct Work {
  std::vector<float> wa, wtop, wt, st, ks;
  std::vector<int32_t> wcu, wcw, wb, wk, sk, wc;
  std::vector<double> wA, wB, kq;
  Work(int64_t g, int64_t cap)
      : wa(g), wtop(g), wt(cap + 1), st(cap), ks(1), wcu(g), wcw(g), wb(cap), wk(cap + BLOCKS), sk(cap),
        wc(2 * cap + 1), wA(cap + 1), wB(cap + 1), kq(1) {}
};

inline void prepare(const float* __restrict x, int64_t n, float qmax, float* __restrict wa, float* __restrict wtop,
                    float& amax_out, double& C_out) {
  float amax = 0.0f;
  double C = 0.0;
#pragma omp simd reduction(+ : C) reduction(max : amax)
  for (int64_t i = 0; i < n; i++) {
    float v = x[i];
    float a = std::fabs(v);
    wa[i] = a;
    wtop[i] = v < 0 ? qmax + 1.0f : qmax;
    amax = fmax_(amax, a);
    C += (double)a * (double)a;
  }
  amax_out = amax;
  C_out = C;
}

inline void moments(const float* __restrict wa, const float* __restrict wtop, int64_t n, float s, double& Ao,
                    double& Bo) {
  double A = 0.0, B = 0.0;
#pragma omp simd reduction(+ : A, B)
  for (int64_t i = 0; i < n; i++) {
    double c = (double)code(wa[i], s, wtop[i]);
    A += c * c;
    B += (double)wa[i] * c;
  }
  Ao = A;
  Bo = B;
}

inline double direct_loss(const float* __restrict wa, const float* __restrict wtop, int64_t n, float s) {
  double total = 0.0, sd = s;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; i++) {
    double e = sd * (double)code(wa[i], s, wtop[i]) - (double)wa[i];
    total += e * e;
  }
  return total;
}

inline double loss_moments(const float* __restrict wa, const float* __restrict wtop, int64_t n, float s,
                           double& Ao, double& Bo) {
  double total = 0.0, A = 0.0, B = 0.0, sd = s;
#pragma omp simd reduction(+ : total, A, B)
  for (int64_t i = 0; i < n; i++) {
    double c = (double)code(wa[i], s, wtop[i]), a = (double)wa[i];
    double e = sd * c - a;
    total += e * e;
    A += c * c;
    B += a * c;
  }
  Ao = A;
  Bo = B;
  return total;
}

inline double clamp_bound(const float* __restrict wa, const float* __restrict wtop, int64_t n, float s) {
  double lb = 0.0, sd = s;
#pragma omp simd reduction(+ : lb)
  for (int64_t i = 0; i < n; i++) {
    double t = (double)wtop[i] * sd;
    double e = (double)wa[i] - t;
    lb += (double)wa[i] >= t * (1.0 + MARGIN) ? e * e : 0.0;
  }
  return lb;
}

inline double small_bound(const float* __restrict wa, int64_t n, float s) {
  double lb = 0.0, sd = (double)s * (1.0 - MARGIN);
#pragma omp simd reduction(+ : lb)
  for (int64_t i = 0; i < n; i++) {
    double a = wa[i];
    double e = sd - a;
    lb += a < sd ? dmin_(a * a, e * e) : 0.0;
  }
  return lb;
}

inline int64_t ends(const float* __restrict wa, const float* __restrict wtop, int64_t n, float u, float w,
                    int32_t* __restrict wcu, int32_t* __restrict wcw) {
  int64_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; i++) {
    int32_t cu = (int32_t)code(wa[i], u, wtop[i]);
    int32_t cw = (int32_t)code(wa[i], w, wtop[i]);
    wcu[i] = cu;
    wcw[i] = cw;
    total += (int64_t)(cu - cw);
  }
  return total;
}

// the reciprocal after a Newton step, as in Numba (where reassoc would otherwise fold a * (1 / s) into a / s)
inline double reciprocal(double s) {
  double r = 1.0 / s;
  return r * (2.0 - s * r);
}

// needs max(wa) / s1 < 2^62 (the caller's guard); Numba truncates to int64, here std::trunc gives the
// same value as a double (g++ cannot vectorise the int64 form)
inline double window_bound(const float* __restrict wa, const float* __restrict wtop, int64_t n, float s1, float s2) {
  double lb = 0.0;
  double i1 = reciprocal((double)s1) * (1.0 + MARGIN), i2 = reciprocal((double)s2) * (1.0 - MARGIN);
#pragma omp simd reduction(+ : lb)
  for (int64_t i = 0; i < n; i++) {
    double a = wa[i];
    double top = wtop[i];
    double lo = a * i2;
    double hi = a * i1;
    double flo = std::trunc(lo), fhi = std::trunc(hi);
    double clo = flo + (flo < lo ? 1.0 : 0.0), chi = fhi + (fhi < hi ? 1.0 : 0.0);
    double below = dmin_(flo, top);
    double above = chi;
    double e = dmin_(a - below * (double)s2, above <= top ? above * (double)s1 - a : INFINITY);
    e = dmax_(e, 0.0) * (1.0 - MARGIN);
    double ee = e * e;
    lb += fhi < clo ? ee : (clo > top ? ee : 0.0);  // (a || b): g++ vectorises only this form
  }
  return lb;
}

float threshold(float a, float m, float top) {
  float t = (float)((double)a / ((double)m + 0.5));
  if ((double)t < TINY) t = (float)TINY;
  while (code(a, t, top) > m) t = next_up(t);
  while ((double)t > TINY && code(a, next_down(t), top) <= m) t = next_down(t);
  return t;
}

void exact_thresholds(const float* __restrict wa, const float* __restrict wtop, int64_t k, const int32_t* __restrict wk,
                      float* __restrict wt, int32_t* __restrict wb, const double* __restrict bounds,
                      double* __restrict wn, double* __restrict wd) {
  for (int64_t j = 0; j < k; j++) {  // the gathers first (as exact_sweep.py)
    wn[j] = (double)wa[wk[j] >> SHIFT];
    wd[j] = bounds[wk[j] & (LEVELS - 1)];
  }
  int64_t ambiguous = 0;
  for (int64_t j = 0; j < k; j++) {
    double q = wn[j] / wd[j];
    float f = (float)q;
    double fd = f;
    float t = fd > q ? f : next_up(f);
    wt[j] = (double)t > TINY ? t : (float)TINY;
    wb[j] = fd == q ? 1 : 0;
    ambiguous += fd == q ? 1 : 0;
  }
  if (ambiguous)
    for (int64_t j = 0; j < k; j++)
      if (wb[j]) {
        int32_t i = wk[j] >> SHIFT;
        wt[j] = threshold(wa[i], (float)(wk[j] & (LEVELS - 1)), wtop[i]);
      }
}

inline void settle(const float* wa, const float* wtop, int64_t n, float s, double q, double C, Work& W) {
  if (q > W.kq[0] + BAND * C) return;
  double d = direct_loss(wa, wtop, n, s);
  if (d < W.kq[0] || (d == W.kq[0] && s < W.ks[0])) {  // ties: the smaller scale, as the reference
    W.kq[0] = d;
    W.ks[0] = s;
  }
}

inline float best_in(double A, double B, double C, float lo, float hi, double& qout) {
  double v = A > 0.0 ? B / A : 0.0;
  float f = fmin_(fmax_((float)v, lo), hi);
  float up = next_up(f), down = next_down(f);
  float g = (double)f < v ? up : down;
  g = fmin_(fmax_(g, lo), hi);
  float s = std::fabs((double)g - v) < std::fabs((double)f - v) ? g : f;
  double sd = s;
  qout = (A * sd - 2.0 * B) * sd + C;
  return s;
}

void sweep_piece(const float* wa, const float* wtop, int64_t n, float u, float w, double C, int64_t cnt, Work& W,
                 const double* bounds) {
  double A, B;
  moments(wa, wtop, n, u, A, B);
  if (cnt == 0) {
    double q;
    float s = best_in(A, B, C, u, w, q);
    settle(wa, wtop, n, s, q, C, W);
    return;
  }
  int32_t* __restrict wk = W.wk.data();
  int32_t* __restrict wb = W.wb.data();
  int32_t* __restrict wc = W.wc.data();
  int32_t* __restrict sk = W.sk.data();
  float* __restrict wt = W.wt.data();
  float* __restrict st = W.st.data();
  double* __restrict wA = W.wA.data();
  double* __restrict wB = W.wB.data();
  const int32_t* wcu = W.wcu.data();
  const int32_t* wcw = W.wcw.data();
  int64_t k = 0;
  for (int64_t i = 0; i < n; i++) {
    int32_t base = (int32_t)(i << SHIFT) + wcw[i];
    for (int d = 0; d < BLOCKS; d++) wk[k + d] = base + d;
    for (int64_t d = BLOCKS; d < (int64_t)(wcu[i] - wcw[i]); d++) wk[k + d] = base + (int32_t)d;
    k += wcu[i] - wcw[i];
  }
  exact_thresholds(wa, wtop, k, wk, wt, wb, bounds, wA, wB);  // wA, wB: scratch until the prefix sums
  int64_t nb = 2 * k;
  double per = (double)nb / ((double)w - (double)u);  // capped as in the Python body
  float scale = w > u ? (float)(per < 3e38 ? per : 3e38) : 0.0f;
  for (int64_t j = 0; j < k; j++) {
    int64_t b = (int32_t)((wt[j] - u) * scale);
    b = b > 0 ? b : 0;
    wb[j] = (int32_t)(b < nb - 1 ? b : nb - 1);
  }
  for (int64_t b = 0; b < nb + 1; b++) wc[b] = 0;
  for (int64_t j = 0; j < k; j++) wc[wb[j] + 1] += 1;
  int32_t run = 0;
  for (int64_t b = 0; b < nb + 1; b++) {
    run += wc[b];
    wc[b] = run;
  }
  for (int64_t j = 0; j < k; j++) {
    int32_t p = wc[wb[j]];
    wc[wb[j]] = p + 1;
    st[p] = wt[j];
    sk[p] = wk[j];
  }
  if (k > 1) {  // one branch-free bubble pass, as in the Python body
    float hi = st[0];
    int32_t hi_key = sk[0];
    for (int64_t j = 1; j < k; j++) {
      float t = st[j];
      int32_t key = sk[j];
      bool swap = hi > t;
      st[j - 1] = swap ? t : hi;
      sk[j - 1] = swap ? key : hi_key;
      hi = swap ? hi : t;
      hi_key = swap ? hi_key : key;
    }
    st[k - 1] = hi;
    sk[k - 1] = hi_key;
  }
  for (int64_t j = 1; j < k; j++) {
    float t = st[j];
    if (st[j - 1] > t) {
      int32_t key = sk[j];
      int64_t p = j;
      while (p > 0 && st[p - 1] > t) {
        st[p] = st[p - 1];
        sk[p] = sk[p - 1];
        p -= 1;
      }
      st[p] = t;
      sk[p] = key;
    }
  }
  wA[0] = A;
  wB[0] = B;
  double comp = 0.0;
  for (int64_t j = 0; j < k; j++) {
    A -= (double)(2 * (sk[j] & (LEVELS - 1)) + 1);
    wA[j + 1] = A;
    double a = -(double)wa[sk[j] >> SHIFT];
    double t = B + a;
    comp += (B - t) + a;
    B = t;
    wB[j + 1] = B + comp;
  }
  for (int64_t j = 0; j < k + 1; j++) {
    float lo = j == 0 ? u : st[j - 1];
    float hi = j == k ? w : next_down(st[j]);
    double q;
    float s = best_in(wA[j], wB[j], C, lo, fmax_(lo, hi), q);
    wt[j] = s;
    wA[j] = hi >= lo ? q : INFINITY;
  }
  double qmin = least(wA, k + 1);
  for (int64_t j = 0; j < k + 1; j++)
    if (wA[j] <= qmin + BAND * C) settle(wa, wtop, n, wt[j], wA[j], C, W);
}

float group_exact(const float* x, int64_t n, float qmax, float smax, Work& W, const double* bounds) {
  float* wa = W.wa.data();
  float* wtop = W.wtop.data();
  float amax;
  double C;
  prepare(x, n, qmax, wa, wtop, amax, C);
  if (amax == 0) return fmin_(1.0f, smax);
  float s = fmin_((float)((double)amax / (double)qmax), smax);
  double A, B;
  double best = loss_moments(wa, wtop, n, s, A, B);
  float guess = fmin_((float)(std::sqrt(C / (double)n) * rms_step(qmax)), smax);
  if (guess > 0) {
    double Ag, Bg;
    double q = loss_moments(wa, wtop, n, guess, Ag, Bg);
    if (q < best) {
      best = q;
      s = guess;
      A = Ag;
      B = Bg;
    }
  }
  float best_s = s;
  for (int it = 0; it < LLOYD; it++) {
    if (A <= 0.0) break;
    float s_new = fmin_((float)(B / A), smax);
    if (!(s_new > 0) || s_new == s) break;
    double q = loss_moments(wa, wtop, n, s_new, A, B);
    if (!(q < best)) break;
    double gain = best - q;
    best = q;
    best_s = s_new;
    s = s_new;
    if (gain < LLOYD_GAIN * best) break;
  }
  W.ks[0] = best_s;
  W.kq[0] = best;
  auto lo_stops = [&](int k) {
    float t = lo_step(best_s, k);
    return (double)t <= TINY || clamp_bound(wa, wtop, n, t) > best;
  };
  auto hi_stops = [&](int k) {
    float t = hi_step(best_s, k);
    return t >= smax || (double)t > 2.0 * (double)amax || small_bound(wa, n, t) > best;
  };
  auto first_stop = [](int k, auto stops) {
    if (stops(k)) {
      while (k > 1 && stops(k - 1)) k -= 1;
      return k;
    }
    k += 1;
    while (!stops(k)) k += 1;
    return k;
  };
  float s_lo = lo_step(best_s, first_stop(lo_steps(qmax), lo_stops));
  float s_hi = fmin_(hi_step(best_s, first_stop(hi_steps(qmax), hi_stops)), smax);
  const int windows = (double)amax < 1e18 * (double)s_lo ? window_count(qmax) : 0;
  for (int it = 0; it < windows; it++) {
    float s2 = fmin_((float)((double)s_lo * WINDOW), best_s);
    if (s2 >= best_s || window_bound(wa, wtop, n, s_lo, s2) <= best) break;
    s_lo = s2;
  }
  for (int it = 0; it < windows; it++) {
    float s1 = fmax_((float)((double)s_hi / WINDOW), best_s);
    if (s1 <= best_s || window_bound(wa, wtop, n, s1, s_hi) <= best) break;
    s_hi = s1;
  }
  int64_t cap = (int64_t)W.wt.size() - 1;
  float u = s_lo;
  while (true) {
    float w = s_hi;
    int64_t cnt = ends(wa, wtop, n, u, w, W.wcu.data(), W.wcw.data());
    while (cnt > cap) {
      float half = (float)((double)u + 0.5 * ((double)w - (double)u));
      w = half == w ? u : half;
      cnt = ends(wa, wtop, n, u, w, W.wcu.data(), W.wcw.data());
    }
    sweep_piece(wa, wtop, n, u, w, C, cnt, W, bounds);
    if (w >= s_hi) break;
    u = next_up(w);
  }
  return W.ks[0];
}

}  // namespace

extern "C" void exact_scales(const float* flat, int64_t rows, int64_t cols, int64_t g, int64_t n_groups, float qmax,
                             float smax, int64_t chunks, int64_t cap, const double* bounds, float* out, int threads) {
  int64_t total = rows * n_groups;
  int64_t per = (total + chunks - 1) / chunks;
  g = g < cols ? g : cols;
#pragma omp parallel num_threads(threads)
  {
    Work W(g, cap);  // one workspace per thread, reused by its groups
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
      int64_t end = (c + 1) * per < total ? (c + 1) * per : total;
      for (int64_t k = c * per; k < end; k++) {
        int64_t r = k / n_groups;
        int64_t lo = (k - r * n_groups) * g;
        int64_t n = g < cols - lo ? g : cols - lo;
        out[k] = group_exact(flat + r * cols + lo, n, qmax, smax, W, bounds);
      }
    }
  }
}

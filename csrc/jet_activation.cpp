// CPU kernels for elementwise activation jets (the `cpp` backend of curvrate_fast).
//
// For an input series u(t) = sum_j u_j t^j (normalized Taylor coefficients, docs/math.md §1) and an
// elementwise phi, the forward computes, per element and in one pass, the jets of
//   y(t) = phi(u(t))      and      w(t) = phi'(u(t))
// to order K with the recurrences of docs/math.md §2 (Griewank & Walther ch. 13):
//   tanh:     y_k = (1/k) sum_j j u_j z_{k-j},  z = 1 - y^2          (w = z)
//   sigmoid:  s_k = (1/k) sum_j j u_j w_{k-j},  w = s - s^2
//   softplus: y_k = (1/k) sum_j j u_j sigma(beta u)_{k-j}            (w = sigma(beta u))
//   SiLU:     y = u sigma(u),  w = sigma (1 + u (1 - sigma))
//   GELU:     y = u Phi(u),    w = Phi + u phi(u),  Phi from the erf recurrence, phi = e^{-u^2/2}/sqrt(2 pi)
//   tanh-GELU: y = u (1 + T)/2, T = tanh(c (u + a u^3)),  w by the product rule
//   ReLU/leaky: y_k = m u_k, w = (m, 0, ...), m = 1 or the slope by the sign of u_0
// The backward uses that the Jacobian of the coefficient map is lower-triangular Toeplitz,
// dy_k/du_j = w_{k-j}, so  grad_u_j = sum_{k >= j} grad_y_k w_{k-j}.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>

namespace {

constexpr int kMaxOrder = 8;
constexpr int kBlock = 64;  // elements per block: the inner loops run over them and vectorize

// the codes of curvrate_fast/activation_kinds.py (checked by tests/test_activation_kinds.py)
enum Kind { TANH = 0, SIGMOID = 1, GELU = 2, GELU_TANH = 3, SILU = 4, SOFTPLUS = 5, RELU = 6, LEAKY_RELU = 7 };

Kind parse_kind(const std::string& s) {
  if (s == "tanh") return TANH;
  if (s == "sigmoid") return SIGMOID;
  if (s == "softplus") return SOFTPLUS;
  if (s == "silu") return SILU;
  if (s == "gelu") return GELU;
  if (s == "gelu_tanh") return GELU_TANH;
  if (s == "relu") return RELU;
  if (s == "leaky_relu") return LEAKY_RELU;
  TORCH_CHECK(false, "curvrate_fast cpp backend: unknown activation kind '", s, "'");
}

// A block of series: S[k][i] is coefficient k of element i.
template <typename T, int K>
using Block = T[K + 1][kBlock];

template <typename T, int K>
inline void cauchy(const Block<T, K>& a, const Block<T, K>& b, Block<T, K>& out) {
  for (int k = 0; k <= K; ++k) {
    for (int i = 0; i < kBlock; ++i) out[k][i] = a[0][i] * b[k][i];
    for (int j = 1; j <= k; ++j)
      for (int i = 0; i < kBlock; ++i) out[k][i] += a[j][i] * b[k - j][i];
  }
}

// y_k = (1/k) sum_{j=1..k} j u_j g_{k-j}   (y' = g u')
template <typename T, int K>
inline void integrate_step(const Block<T, K>& u, const Block<T, K>& g, Block<T, K>& y, int k) {
  const T inv = T(1) / T(k);
  for (int i = 0; i < kBlock; ++i) y[k][i] = u[1][i] * g[k - 1][i];
  for (int j = 2; j <= k; ++j) {
    const T jj = T(j);
    for (int i = 0; i < kBlock; ++i) y[k][i] += jj * u[j][i] * g[k - j][i];
  }
  for (int i = 0; i < kBlock; ++i) y[k][i] *= inv;
}

template <typename T, int K>
inline void square_coeff(const Block<T, K>& y, T* out, int k) {
  for (int i = 0; i < kBlock; ++i) out[i] = 0;
  for (int j = 0; 2 * j < k; ++j)
    for (int i = 0; i < kBlock; ++i) out[i] += T(2) * y[j][i] * y[k - j][i];
  if (k % 2 == 0)
    for (int i = 0; i < kBlock; ++i) out[i] += y[k / 2][i] * y[k / 2][i];
}

// tanh: y_0 = tanh u_0, z = 1 - y^2, y_k = (1/k) sum j u_j z_{k-j}  (docs/math.md §2)
// The primal values that need transcendental functions (tanh u_0, sigma(u_0), erf, exp) are
// computed before the block loop by ATen's vectorized kernels and arrive in y[0] / w[0] / p.
template <typename T, int K>
inline void tanh_series(const Block<T, K>& u, Block<T, K>& y, Block<T, K>& z) {
  for (int i = 0; i < kBlock; ++i) z[0][i] = T(1) - y[0][i] * y[0][i];
  for (int k = 1; k <= K; ++k) {
    integrate_step<T, K>(u, z, y, k);
    square_coeff<T, K>(y, z[k], k);
    for (int i = 0; i < kBlock; ++i) z[k][i] = -z[k][i];
  }
}

// sigmoid: w = s (1 - s), s_k = (1/k) sum j u_j w_{k-j}  (docs/math.md §2)
template <typename T, int K>
inline void sigmoid_series(const Block<T, K>& u, Block<T, K>& s, Block<T, K>& w) {
  for (int i = 0; i < kBlock; ++i) w[0][i] = s[0][i] * (T(1) - s[0][i]);
  for (int k = 1; k <= K; ++k) {
    integrate_step<T, K>(u, w, s, k);
    square_coeff<T, K>(s, w[k], k);
    for (int i = 0; i < kBlock; ++i) w[k][i] = s[k][i] - w[k][i];
  }
}

// P0, P1: precomputed primal transcendentals for the block (see primal_values()).
template <typename T, int K>
void block(Kind kind, const Block<T, K>& u, const T* P0, const T* P1, Block<T, K>& y,
           Block<T, K>& w, double p1, double p2) {
  Block<T, K> a, b, c, d;
  switch (kind) {
    case TANH:
      for (int i = 0; i < kBlock; ++i) y[0][i] = P0[i];
      tanh_series<T, K>(u, y, w);
      return;
    case SIGMOID:
      for (int i = 0; i < kBlock; ++i) y[0][i] = P0[i];
      sigmoid_series<T, K>(u, y, w);
      return;
    case SOFTPLUS: {  // y' = sigma(beta u) u'; identity where beta u_0 > threshold (as torch)
      const T beta = T(p1), threshold = T(p2);
      for (int k = 0; k <= K; ++k)
        for (int i = 0; i < kBlock; ++i) a[k][i] = beta * u[k][i];
      for (int i = 0; i < kBlock; ++i) { w[0][i] = P0[i]; y[0][i] = P1[i]; }
      sigmoid_series<T, K>(a, w, b);
      for (int k = 1; k <= K; ++k) integrate_step<T, K>(u, w, y, k);
      for (int i = 0; i < kBlock; ++i) {
        if (a[0][i] > threshold) {
          for (int k = 0; k <= K; ++k) { y[k][i] = u[k][i]; w[k][i] = k == 0 ? T(1) : T(0); }
        }
      }
      return;
    }
    case SILU: {  // y = u sigma, w = sigma (1 + u (1 - sigma))
      for (int i = 0; i < kBlock; ++i) a[0][i] = P0[i];
      sigmoid_series<T, K>(u, a, b);
      cauchy<T, K>(u, a, y);
      for (int k = 0; k <= K; ++k)
        for (int i = 0; i < kBlock; ++i) c[k][i] = (k == 0 ? T(1) : T(0)) - a[k][i];
      cauchy<T, K>(u, c, d);
      for (int i = 0; i < kBlock; ++i) d[0][i] += T(1);
      cauchy<T, K>(a, d, w);
      return;
    }
    case GELU: {  // y = u Phi(u), w = Phi + u phi(u); Phi by the erf recurrence (docs/math.md §2)
      const T r2 = T(M_SQRT1_2);
      for (int k = 0; k <= K; ++k)
        for (int i = 0; i < kBlock; ++i) a[k][i] = r2 * u[k][i];      // v = u/sqrt2
      cauchy<T, K>(a, a, b);                                            // v^2
      for (int i = 0; i < kBlock; ++i) c[0][i] = P1[i];                // g = e^{-v^2}
      for (int k = 1; k <= K; ++k) {                                    // g' = -(v^2)' g
        for (int i = 0; i < kBlock; ++i) c[k][i] = -b[1][i] * c[k - 1][i];
        for (int j = 2; j <= k; ++j)
          for (int i = 0; i < kBlock; ++i) c[k][i] -= T(j) * b[j][i] * c[k - j][i];
        for (int i = 0; i < kBlock; ++i) c[k][i] /= T(k);
      }
      for (int i = 0; i < kBlock; ++i) d[0][i] = P0[i];                // erf(v_0)
      for (int k = 1; k <= K; ++k) {                                    // erf' = (2/sqrtpi) g v'
        integrate_step<T, K>(a, c, d, k);
        for (int i = 0; i < kBlock; ++i) d[k][i] *= T(M_2_SQRTPI);
      }
      for (int k = 0; k <= K; ++k)
        for (int i = 0; i < kBlock; ++i) d[k][i] = T(0.5) * ((k == 0 ? T(1) : T(0)) + d[k][i]);  // Phi
      cauchy<T, K>(u, d, y);
      const T pdf = T(0.5 * M_2_SQRTPI * M_SQRT1_2);                   // 1/sqrt(2 pi)
      for (int k = 0; k <= K; ++k)
        for (int i = 0; i < kBlock; ++i) c[k][i] *= pdf;               // phi(u)
      cauchy<T, K>(u, c, b);
      for (int k = 0; k <= K; ++k)
        for (int i = 0; i < kBlock; ++i) w[k][i] = d[k][i] + b[k][i];
      return;
    }
    case GELU_TANH: {  // y = u (1 + T)/2, T = tanh(c (u + a u^3))
      const T cc = T(std::sqrt(2.0 / M_PI)), aa = T(0.044715);
      cauchy<T, K>(u, u, a);  // u^2
      cauchy<T, K>(a, u, b);  // u^3
      for (int k = 0; k <= K; ++k)
        for (int i = 0; i < kBlock; ++i) b[k][i] = cc * (u[k][i] + aa * b[k][i]);
      for (int i = 0; i < kBlock; ++i) c[0][i] = P0[i];
      tanh_series<T, K>(b, c, d);  // c = T, d = 1 - T^2
      for (int k = 0; k <= K; ++k)
        for (int i = 0; i < kBlock; ++i) c[k][i] = T(0.5) * ((k == 0 ? T(1) : T(0)) + c[k][i]);
      cauchy<T, K>(u, c, y);
      for (int k = 0; k <= K; ++k)
        for (int i = 0; i < kBlock; ++i) a[k][i] = cc * ((k == 0 ? T(1) : T(0)) + T(3) * aa * a[k][i]);
      cauchy<T, K>(u, d, b);
      cauchy<T, K>(b, a, d);
      for (int k = 0; k <= K; ++k)
        for (int i = 0; i < kBlock; ++i) w[k][i] = c[k][i] + T(0.5) * d[k][i];
      return;
    }
    case RELU:
    case LEAKY_RELU: {
      const T slope = kind == RELU ? T(0) : T(p1);
      for (int i = 0; i < kBlock; ++i) {
        const T m = u[0][i] > 0 ? T(1) : slope;
        for (int k = 0; k <= K; ++k) { y[k][i] = m * u[k][i]; w[k][i] = k == 0 ? m : T(0); }
      }
      return;
    }
  }
}

template <typename T, int K>
void fwd_impl(Kind kind, const T* cp, const T* pp, int n_prim, int n_in, int64_t N, T* yp, T* wp,
              double p1, double p2) {
  at::parallel_for(0, (N + kBlock - 1) / kBlock, 16, [&](int64_t b0, int64_t b1) {
    Block<T, K> u, y, w;
    T P0[kBlock], P1[kBlock];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t base = blk * kBlock;
      const int len = static_cast<int>(std::min<int64_t>(kBlock, N - base));
      for (int k = 0; k <= K; ++k)
        for (int i = 0; i < kBlock; ++i)
          u[k][i] = (k < n_in && i < len) ? cp[k * N + base + i] : T(0);
      for (int i = 0; i < kBlock; ++i) {
        P0[i] = (n_prim > 0 && i < len) ? pp[base + i] : T(0);
        P1[i] = (n_prim > 1 && i < len) ? pp[N + base + i] : T(0);
      }
      block<T, K>(kind, u, P0, P1, y, w, p1, p2);
      for (int k = 0; k <= K; ++k)
        for (int i = 0; i < len; ++i) { yp[k * N + base + i] = y[k][i]; wp[k * N + base + i] = w[k][i]; }
    }
  });
}

template <typename T>
void fwd_dispatch(int K, Kind kind, const T* cp, const T* pp, int n_prim, int n_in, int64_t N, T* yp,
                  T* wp, double p1, double p2) {
  switch (K) {
#define CURVRATE_CASE(KK) case KK: fwd_impl<T, KK>(kind, cp, pp, n_prim, n_in, N, yp, wp, p1, p2); return;
    CURVRATE_CASE(0) CURVRATE_CASE(1) CURVRATE_CASE(2) CURVRATE_CASE(3) CURVRATE_CASE(4)
    CURVRATE_CASE(5) CURVRATE_CASE(6) CURVRATE_CASE(7) CURVRATE_CASE(8)
#undef CURVRATE_CASE
    default: TORCH_CHECK(false, "order out of range");
  }
}

// The transcendental primal values each kind needs, by ATen's vectorized kernels: (rows, N).
at::Tensor primal_values(Kind kind, const at::Tensor& u0, double p1, double p2) {
  switch (kind) {
    case TANH: return at::tanh(u0).unsqueeze(0);
    case SIGMOID:
    case SILU: return at::sigmoid(u0).unsqueeze(0);
    case SOFTPLUS: return at::stack({at::sigmoid(u0 * p1), at::softplus(u0, p1, p2)});
    case GELU: return at::stack({at::erf(u0 * M_SQRT1_2), at::exp(u0 * u0 * -0.5)});
    case GELU_TANH: {
      const double cc = std::sqrt(2.0 / M_PI), aa = 0.044715;
      return at::tanh((u0 + u0 * u0 * u0 * aa) * cc).unsqueeze(0);
    }
    default: return at::empty({0, u0.size(0)}, u0.options());
  }
}

std::tuple<at::Tensor, at::Tensor> activation_jet_fwd(const at::Tensor& coeffs, const std::string& kind_name,
                                                      int64_t order, double p1, double p2) {
  TORCH_CHECK(coeffs.dim() == 2, "activation_jet_fwd: coefficients must be 2-D (n+1, N)");
  TORCH_CHECK(order >= 0 && order <= kMaxOrder, "activation_jet_fwd: order must be in [0, ", kMaxOrder, "]");
  TORCH_CHECK(coeffs.size(0) <= order + 1, "activation_jet_fwd: more coefficients than order + 1");
  const Kind kind = parse_kind(kind_name);
  const int K = static_cast<int>(order);
  const int n_in = static_cast<int>(coeffs.size(0));
  const int64_t N = coeffs.size(1);
  auto c = coeffs.contiguous();
  auto y = at::empty({K + 1, N}, c.options());
  auto w = at::empty({K + 1, N}, c.options());
  auto prim = primal_values(kind, c[0], p1, p2).contiguous();
  const int n_prim = static_cast<int>(prim.size(0));
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "activation_jet_fwd", [&] {
    fwd_dispatch<scalar_t>(K, kind, c.data_ptr<scalar_t>(), prim.data_ptr<scalar_t>(), n_prim, n_in, N,
                           y.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), p1, p2);
  });
  return {y, w};
}

// grad_u_j = sum_{k >= j} grad_y_k w_{k-j}: the Toeplitz Jacobian transposed.
at::Tensor activation_jet_bwd(const at::Tensor& grad_y, const at::Tensor& w, int64_t n_in) {
  TORCH_CHECK(grad_y.dim() == 2 && w.sizes() == grad_y.sizes(), "activation_jet_bwd: shape mismatch");
  const int K = static_cast<int>(grad_y.size(0)) - 1;
  const int64_t N = grad_y.size(1);
  auto g = grad_y.contiguous();
  auto wc = w.contiguous();
  auto out = at::empty({n_in, N}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "activation_jet_bwd", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
      for (int j = 0; j < n_in; ++j) {
        scalar_t* o = op + j * N;
        for (int64_t i = begin; i < end; ++i) o[i] = gp[j * N + i] * wp[i];
        for (int k = j + 1; k <= K; ++k) {
          const scalar_t* gk = gp + k * N;
          const scalar_t* wk = wp + (k - j) * N;
          for (int64_t i = begin; i < end; ++i) o[i] += gk[i] * wk[i];
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(curvrate_fast, m) {
  m.def("activation_jet_fwd(Tensor coeffs, str kind, int order, float p1, float p2) -> (Tensor, Tensor)");
  m.def("activation_jet_bwd(Tensor grad_y, Tensor w, int n_in) -> Tensor");
}

TORCH_LIBRARY_IMPL(curvrate_fast, CPU, m) {
  m.impl("activation_jet_fwd", &activation_jet_fwd);
  m.impl("activation_jet_bwd", &activation_jet_bwd);
}

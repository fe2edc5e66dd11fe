// A float32 CPU GEMM for the small and medium products of captured jet programs (AVX-512).
//
//   C = A · B,   C[i, j] = sum_k A[i, k] B[k, j]      (A: M×K, any strides; B: K×N; C: M×N, dense)
//
// Why: a jet through a linear layer multiplies the K+1 stacked coefficient rows by the weight,
// forward and backward (docs/design.md §6), and on small networks these products are narrow
// (640×64·64×64 for the Two Moons MLP at order 4). On CPUs where MKL runs its AVX2 path (AMD
// processors) torch.mm reaches ~95 GFLOP/s on them, oneDNN ~130 with its packing overhead; this
// kernel, with no packing, ~220 on the project's AMD EPYC core (the GEMM-rate note of
// bench/results/cpu_small_models.md).
//
// How: C is cut into tiles of MR ≤ 6 rows by 16·NV ≤ 64 columns. A tile keeps its MR·NV 16-wide
// accumulators in zmm registers (24 of the 32 for 6×4) for the whole sum over k: per k it loads
// the NV vectors of row k of B, and for each of the MR rows broadcasts A[i, k] and adds
// A[i, k]·B[k, j..j+16) by fused multiply-add. Each C element is one sequential float32 sum over
// k, in the order k = 0, 1, ..., K−1 (the same for any thread count: deterministic), which differs
// from MKL's blocked order by float32 rounding only. The last columns of a row (N not a multiple
// of 16) are loaded and stored under a mask. B is read along its rows, so a B whose columns are
// not unit-stride (a transposed weight) is copied dense first (K·N floats, small against the
// product's M·K·N). Row panels are split among threads (at::parallel_for).
//
// On a CPU without AVX-512 the op falls back to at::mm (``avx512_mm_supported()`` says which);
// curvrate_fast.cpu_gemm only picks it where it measured faster.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CURVRATE_HAVE_AVX512_KERNEL 1
#include <immintrin.h>
#endif

namespace {

#ifdef CURVRATE_HAVE_AVX512_KERNEL

// GCC keeps an array of vector accumulators in registers only when its loops are unrolled
// before register allocation; without this it stores all 24 to the stack on every k (80 GFLOP/s
// instead of 220, measured)
#define CURVRATE_UNROLL _Pragma("GCC unroll 16")

constexpr int kRows = 6;       // MR: rows of C per register tile
constexpr int kVectors = 4;    // NV: 16-float vectors of C per register tile row (64 columns)
constexpr int kPanel = 8 * kRows;  // rows per parallel work item

// C[0:MR, 0:16·NV) = A[0:MR, 0:K) · B[0:K, 0:16·NV), the last vector's columns under `last`
template <int MR, int NV>
__attribute__((target("avx512f,fma"), always_inline)) inline void tile(
    int64_t K, const float* A, int64_t sa0, int64_t sa1, const float* B, int64_t ldb, float* C,
    int64_t ldc, __mmask16 last) {
  __m512 acc[MR * NV];
  CURVRATE_UNROLL for (int r = 0; r < MR * NV; ++r) acc[r] = _mm512_setzero_ps();
  const float* ak = A;
  const float* bk = B;
  for (int64_t k = 0; k < K; ++k, ak += sa1, bk += ldb) {
    __m512 b[NV];
    CURVRATE_UNROLL for (int v = 0; v < NV - 1; ++v) b[v] = _mm512_loadu_ps(bk + 16 * v);
    b[NV - 1] = _mm512_maskz_loadu_ps(last, bk + 16 * (NV - 1));
    CURVRATE_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(ak[i * sa0]);
      CURVRATE_UNROLL for (int v = 0; v < NV; ++v) acc[i * NV + v] = _mm512_fmadd_ps(a, b[v], acc[i * NV + v]);
    }
  }
  CURVRATE_UNROLL for (int i = 0; i < MR; ++i) {
    CURVRATE_UNROLL for (int v = 0; v < NV - 1; ++v) _mm512_storeu_ps(C + i * ldc + 16 * v, acc[i * NV + v]);
    _mm512_mask_storeu_ps(C + i * ldc + 16 * (NV - 1), last, acc[i * NV + NV - 1]);
  }
}

// rows [0, M) of one column block of width ≤ 16·NV: full 6-row tiles, then one shorter tile
template <int NV>
__attribute__((target("avx512f,fma"))) void column_block(int64_t M, int64_t K, const float* A, int64_t sa0,
                                                         int64_t sa1, const float* B, int64_t ldb, float* C,
                                                         int64_t ldc, __mmask16 last) {
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows) tile<kRows, NV>(K, A + i * sa0, sa0, sa1, B, ldb, C + i * ldc, ldc, last);
  const float* a = A + i * sa0;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: tile<5, NV>(K, a, sa0, sa1, B, ldb, c, ldc, last); break;
    case 4: tile<4, NV>(K, a, sa0, sa1, B, ldb, c, ldc, last); break;
    case 3: tile<3, NV>(K, a, sa0, sa1, B, ldb, c, ldc, last); break;
    case 2: tile<2, NV>(K, a, sa0, sa1, B, ldb, c, ldc, last); break;
    case 1: tile<1, NV>(K, a, sa0, sa1, B, ldb, c, ldc, last); break;
    default: break;
  }
}

// rows [0, M) of C, every column block
__attribute__((target("avx512f,fma"))) void row_panel(int64_t M, int64_t K, int64_t N, const float* A,
                                                      int64_t sa0, int64_t sa1, const float* B, int64_t ldb,
                                                      float* C) {
  constexpr int64_t width = 16 * kVectors;
  for (int64_t j = 0; j < N; j += width) {
    const int64_t w = std::min<int64_t>(width, N - j);
    const int nv = static_cast<int>((w + 15) / 16);
    const int rem = static_cast<int>(w - 16 * (nv - 1));  // 1..16 columns in the last vector
    const __mmask16 last = static_cast<__mmask16>((1u << rem) - 1u);
    switch (nv) {
      case 4: column_block<4>(M, K, A, sa0, sa1, B + j, ldb, C + j, N, last); break;
      case 3: column_block<3>(M, K, A, sa0, sa1, B + j, ldb, C + j, N, last); break;
      case 2: column_block<2>(M, K, A, sa0, sa1, B + j, ldb, C + j, N, last); break;
      default: column_block<1>(M, K, A, sa0, sa1, B + j, ldb, C + j, N, last); break;
    }
  }
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return has;
}

#else

bool cpu_has_avx512() { return false; }

#endif

void check_operands(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "avx512_mm multiplies two matrices (M×K, K×N), got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, "avx512_mm is a float32 GEMM, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

at::Tensor avx512_mm(const at::Tensor& a, const at::Tensor& b_in) {
  check_operands(a, b_in);
  TORCH_CHECK(a.device().is_cpu() && b_in.device().is_cpu(), "avx512_mm runs on CPU tensors");
#ifdef CURVRATE_HAVE_AVX512_KERNEL
  if (!cpu_has_avx512()) return at::mm(a, b_in);
  const at::Tensor b = (b_in.size(1) <= 1 || b_in.stride(1) == 1) ? b_in : b_in.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor c = at::empty({M, N}, a.options());
  if (M == 0 || N == 0) return c;
  const float* A = a.data_ptr<float>();
  const float* B = b.data_ptr<float>();
  float* C = c.data_ptr<float>();
  const int64_t sa0 = a.stride(0), sa1 = a.stride(1), ldb = b.stride(0);
  const int64_t panels = (M + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    const int64_t r0 = begin * kPanel, r1 = std::min<int64_t>(end * kPanel, M);
    row_panel(r1 - r0, K, N, A + r0 * sa0, sa0, sa1, B, ldb, C + r0 * N);
  });
  return c;
#else
  return at::mm(a, b_in);
#endif
}

at::Tensor avx512_mm_meta(const at::Tensor& a, const at::Tensor& b) {
  check_operands(a, b);
  return at::empty({a.size(0), b.size(1)}, a.options());
}

bool avx512_mm_supported() { return cpu_has_avx512(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(curvrate_fast, m) {
  m.def("avx512_mm(Tensor a, Tensor b) -> Tensor");
  m.def("avx512_mm_supported() -> bool", &avx512_mm_supported);  // no tensor argument: a catch-all kernel
}

TORCH_LIBRARY_IMPL(curvrate_fast, CPU, m) { m.impl("avx512_mm", &avx512_mm); }

TORCH_LIBRARY_IMPL(curvrate_fast, Meta, m) { m.impl("avx512_mm", &avx512_mm_meta); }

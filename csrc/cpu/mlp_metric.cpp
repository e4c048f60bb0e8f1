// Fused pullback / Fisher metric of an MLP decoder, G = J^T diag(w) J, without materialising J [B, D, d].
//
// Points are processed in blocks. A block's state is one row-major matrix of P * (d + 1) rows: for each point its
// primal activation row followed by its d tangent rows (the columns of J_l, transposed). One GEMM per layer pushes
// primal and tangents through W_l together (the weight matrix is reused from cache by every row of the block); the
// activation then scales the tangent rows by a_l'(h_l). The last layer, the big one (D outputs), is computed in column
// tiles that are reduced into the d x d Gram at once, so only a [rows, tile] slab of it ever exists.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"

// The GEMM micro-kernel and the other row loops are compiled for x86-64-v4 (AVX-512), v3 (AVX2 + FMA) and baseline
// and picked at load time (PYGEO_SIMD_CLONES, common/parallel.h).
#if defined(__GNUC__)
#define PYGEO_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PYGEO_ALWAYS_INLINE inline
#endif

namespace pygeo {

namespace {

// Activation codes: the same numbers as pygeo/reference/mlp_metric.py.
enum Activation : int64_t { kIdentity = 0, kRelu, kLeakyRelu, kElu, kSilu, kSoftplus, kTanh, kSigmoid, kActivationCount };

constexpr int kRowsPerMicroTile = 8;         // MR: rows of the register tile (8 x 2 vectors)
constexpr int64_t kTargetBlockRows = 256;    // P (d + 1) rows per point block: the block's slab stays in L2
constexpr int64_t kLastLayerTileColumns = 128;  // output columns of the last layer reduced at once
constexpr int64_t kDepthPerChunk = 128;         // K slice of a weight panel kept in L1

template <typename T>
constexpr int columns_per_micro_tile() {  // NR: two 512-bit vectors
  return static_cast<int>(128 / sizeof(T));
}

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

template <typename T>
PYGEO_ALWAYS_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// value = a(h), slope = a'(h); p0/p1: leaky_relu slope, elu alpha, softplus beta and threshold.
template <typename T>
PYGEO_ALWAYS_INLINE void activate(int64_t code, T p0, T p1, T h, T& value, T& slope) {
  switch (code) {
    case kRelu:
      value = h > T(0) ? h : T(0);
      slope = h > T(0) ? T(1) : T(0);
      return;
    case kLeakyRelu:
      value = h > T(0) ? h : p0 * h;
      slope = h > T(0) ? T(1) : p0;
      return;
    case kElu:
      if (h > T(0)) {
        value = h;
        slope = T(1);
      } else {
        value = p0 * std::expm1(h);
        slope = value + p0;
      }
      return;
    // silu, tanh, sigmoid: slopes without 1 - s or 1 - t^2, which cancel where the activation saturates (a 1-ulp
    // difference in tanh became 3e-7 relative in float64, issue 30): 1 - sigmoid(h) = sigmoid(-h),
    // 1 - tanh(h)^2 = 4 sigmoid(2h) sigmoid(-2h), as pygeo/reference/mlp_metric.py.
    case kSilu: {
      const T s = sigmoid(h);
      value = h * s;
      slope = s * (T(1) + h * sigmoid(-h));
      return;
    }
    case kSoftplus: {
      const T scaled = p0 * h;
      if (scaled > p1) {
        value = h;
        slope = T(1);
      } else {
        value = std::log1p(std::exp(scaled)) / p0;
        slope = sigmoid(scaled);
      }
      return;
    }
    case kTanh: {
      value = std::tanh(h);
      slope = T(4) * sigmoid(T(2) * h) * sigmoid(T(-2) * h);
      return;
    }
    case kSigmoid: {
      const T s = sigmoid(h);
      value = s;
      slope = s * sigmoid(-h);
      return;
    }
    default:  // kIdentity
      value = h;
      slope = T(1);
  }
}

// Vectorised float activations for hidden rows (std::tanh / exp / log1p cost 20-30 ns an element here, a sixth of
// the euclidean metric's time): plain arithmetic that `omp simd` loops vectorise, within 2e-7 relative of the libm
// functions (tests/test_mlp_metric.py checks values and slopes on a dense grid).

// exp(x) for x <= 88, flushed to 0 below -87 (where exp is subnormal or underflows): Cody-Waite reduction
// x = n log 2 + r, Taylor polynomial in r, 2^n built in the exponent bits. The flush matters: clamping x to -87 instead
// would make sigmoid(-1e13) = 1.6e-38 rather than 0, and SiLU's slope s (1 + h (1 - s)) ~ h s then comes out of order
// 1e-25 instead of 0 (issue 30: G ~ 1e19 where torch gives 0 with weights of 1e20).
PYGEO_ALWAYS_INLINE float exp_clamped(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer kept in the low bits
  const float shifted = xc * 1.44269504f + magic;
  const float n = shifted - magic;
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof(float));
  const int32_t power_bits = (bits - 0x4B400000 + 127) << 23;
  float power;
  std::memcpy(&power, &power_bits, sizeof(float));
  return x < -87.0f ? 0.0f : p * power;
}

// log1p(e) for e in [0, 1] as 2 atanh(t), t = e / (2 + e) in [0, 1/3]: no cancellation; odd series to t^13.
PYGEO_ALWAYS_INLINE float log1p_unit(float e) {
  const float t = e / (2.0f + e), t2 = t * t;
  float p = 1.0f / 13.0f;
  p = p * t2 + 1.0f / 11.0f;
  p = p * t2 + 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  return 2.0f * ((p * t2) * t + t);
}

// sigmoid(x) from e = exp(-|x|) in (0, 1].
PYGEO_ALWAYS_INLINE float sigmoid_from(float x, float e) { return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e); }

// tanh(x): the odd Taylor polynomial to x^13 below |x| = 0.4, else 1 - 2 / (exp(2 |x|) + 1).
PYGEO_ALWAYS_INLINE float tanh_fast(float x) {
  const float ax = std::fabs(x), x2 = x * x;
  float p = 21844.0f / 6081075.0f;
  p = p * x2 - 1382.0f / 155925.0f;
  p = p * x2 + 62.0f / 2835.0f;
  p = p * x2 - 17.0f / 315.0f;
  p = p * x2 + 2.0f / 15.0f;
  p = p * x2 - 1.0f / 3.0f;
  p = (p * x2) * x + x;
  const float far = 1.0f - 2.0f / (exp_clamped(ax + ax) + 1.0f);
  return ax < 0.4f ? p : (x < 0.0f ? -far : far);
}

// values[o] = a(values[o] + bias[o]), slopes[o] = a'(...) for tanh, softplus (p0 = beta, p1 = threshold), silu and
// sigmoid.
PYGEO_SIMD_CLONES void smooth_row(int64_t code, float p0, float p1, const float* bias, float* values, float* slopes,
                                  int64_t n) {
  switch (code) {
    case kTanh:  // slope 1 - t^2 = 4 e / (1 + e)^2, e = exp(-2 |h|): no cancellation where tanh saturates
#pragma omp simd
      for (int64_t o = 0; o < n; ++o) {
        const float h = values[o] + bias[o], e = exp_clamped(-2.0f * std::fabs(h)), q = 1.0f + e;
        values[o] = tanh_fast(h);
        slopes[o] = 4.0f * e / (q * q);
      }
      return;
    case kSoftplus:
#pragma omp simd
      for (int64_t o = 0; o < n; ++o) {
        const float h = values[o] + bias[o], scaled = p0 * h, e = exp_clamped(-std::fabs(scaled));
        const bool linear = scaled > p1;  // torch.nn.Softplus: the identity above the threshold
        values[o] = linear ? h : (std::max(scaled, 0.0f) + log1p_unit(e)) / p0;
        slopes[o] = linear ? 1.0f : sigmoid_from(scaled, e);
      }
      return;
    case kSilu:  // 1 - s = sigmoid(-h), from the same e
#pragma omp simd
      for (int64_t o = 0; o < n; ++o) {
        const float h = values[o] + bias[o], e = exp_clamped(-std::fabs(h));
        const float s = sigmoid_from(h, e);
        values[o] = h * s;
        slopes[o] = s * (1.0f + h * sigmoid_from(-h, e));
      }
      return;
    default:  // kSigmoid: s (1 - s) = e / (1 + e)^2 for either sign of h
#pragma omp simd
      for (int64_t o = 0; o < n; ++o) {
        const float h = values[o] + bias[o], e = exp_clamped(-std::fabs(h)), q = 1.0f + e;
        values[o] = sigmoid_from(h, e);
        slopes[o] = e / (q * q);
      }
  }
}

// values[o] = a(values[o] + bias[o]) and slopes[o] = a'(values[o] + bias[o]) over one point's hidden row.
template <typename T>
void activate_row(int64_t code, T p0, T p1, const T* bias, T* values, T* slopes, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (code == kTanh || code == kSoftplus || code == kSilu || code == kSigmoid) {
      return smooth_row(code, p0, p1, bias, values, slopes, n);
    }
  }
  for (int64_t o = 0; o < n; ++o) activate(code, p0, p1, values[o] + bias[o], values[o], slopes[o]);
}

// C[MR, NR] (+)= A[MR, k_begin:K] B[k_begin:K, NR]; A row-major (lda), B row-major (ldb), C row-major (ldc).
// accumulate: add to C instead of overwriting it.
template <typename T, int MR, int NR>
PYGEO_ALWAYS_INLINE void micro_tile(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                                    int64_t k_begin, int64_t K, bool accumulate) {
  T acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = accumulate ? C[r * ldc + c] : T(0);
  for (int64_t k = k_begin; k < K; ++k) {
    const T* b = B + k * ldb;
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * lda + k];
#pragma omp simd
      for (int c = 0; c < NR; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) C[r * ldc + c] = acc[r][c];
}

// C[M, N] = A[M, K] B[K, N] with M % MR == 0 and N % NR == 0 (buffers are padded). B is packed in panels of NR
// columns, each a contiguous [K, NR] block (no cache-set conflicts from a long row stride). `upper_from` >= 0 says
// that B is the transpose of an upper-triangular matrix and its first column is absolute column upper_from: rows k of
// a panel below the panel's first column are zero and skipped.
template <typename T>
PYGEO_ALWAYS_INLINE void gemm_impl(const T* A, int64_t lda, const T* B_panels, T* C, int64_t ldc, int64_t M, int64_t N,
                                   int64_t K, int64_t upper_from) {
  constexpr int MR = kRowsPerMicroTile;
  constexpr int NR = columns_per_micro_tile<T>();
  for (int64_t n0 = 0; n0 < N; n0 += NR) {
    const int64_t k_begin = upper_from >= 0 ? std::min(K, upper_from + n0) : 0;
    const T* panel = B_panels + (n0 / NR) * K * NR;
    // K in chunks whose slice of the panel stays in L1 while every row block of A passes over it.
    for (int64_t k0 = k_begin; k0 < K || k0 == k_begin; k0 += kDepthPerChunk) {
      const int64_t k1 = std::min(K, k0 + kDepthPerChunk);
      for (int64_t m0 = 0; m0 < M; m0 += MR)
        micro_tile<T, MR, NR>(A + m0 * lda, lda, panel, NR, C + m0 * ldc + n0, ldc, k0, k1, k0 != k_begin);
      if (k1 >= K) break;
    }
  }
}

PYGEO_SIMD_CLONES void gemm(const float* A, int64_t lda, const float* B_panels, float* C, int64_t ldc, int64_t M,
                            int64_t N, int64_t K, int64_t upper_from) {
  gemm_impl<float>(A, lda, B_panels, C, ldc, M, N, K, upper_from);
}

PYGEO_SIMD_CLONES void gemm(const double* A, int64_t lda, const double* B_panels, double* C, int64_t ldc, int64_t M,
                            int64_t N, int64_t K, int64_t upper_from) {
  gemm_impl<double>(A, lda, B_panels, C, ldc, M, N, K, upper_from);
}

// G[i, j] += sum_o c[o] Y[i, o] Y[j, o] over the upper triangle (i <= j); Y: d rows of stride ldy, n columns.
// Four columns j at a time: four independent sums instead of one dependent chain per dot product.
template <typename T>
PYGEO_ALWAYS_INLINE void gram_update_impl(const T* c, const T* Y, int64_t ldy, int64_t d, int64_t n, T* scaled, T* G) {
  for (int64_t i = 0; i < d; ++i) {
    const T* yi = Y + i * ldy;
#pragma omp simd
    for (int64_t o = 0; o < n; ++o) scaled[o] = c[o] * yi[o];
    int64_t j = i;
    for (; j + 4 <= d; j += 4) {
      const T *y0 = Y + j * ldy, *y1 = y0 + ldy, *y2 = y1 + ldy, *y3 = y2 + ldy;
      T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t o = 0; o < n; ++o) {
        s0 += scaled[o] * y0[o];
        s1 += scaled[o] * y1[o];
        s2 += scaled[o] * y2[o];
        s3 += scaled[o] * y3[o];
      }
      G[i * d + j] += s0;
      G[i * d + j + 1] += s1;
      G[i * d + j + 2] += s2;
      G[i * d + j + 3] += s3;
    }
    for (; j < d; ++j) {
      const T* yj = Y + j * ldy;
      T sum = T(0);
#pragma omp simd reduction(+ : sum)
      for (int64_t o = 0; o < n; ++o) sum += scaled[o] * yj[o];
      G[i * d + j] += sum;
    }
  }
}

PYGEO_SIMD_CLONES void gram_update(const float* c, const float* Y, int64_t ldy, int64_t d, int64_t n, float* scaled,
                                   float* G) {
  gram_update_impl<float>(c, Y, ldy, d, n, scaled, G);
}

PYGEO_SIMD_CLONES void gram_update(const double* c, const double* Y, int64_t ldy, int64_t d, int64_t n, double* scaled,
                                   double* G) {
  gram_update_impl<double>(c, Y, ldy, d, n, scaled, G);
}

// True when every pre-activation values[o] + bias[o] is finite: an Inf or NaN there (the layer's products overflow)
// must refuse the point, as the torch backend does, not be mapped to a finite activation (ReLU(NaN) = 0 here, and a
// saturated tanh or sigmoid turns an overflow into a zero slope and G = 0). 0 * x is NaN exactly when x is not finite.
template <typename T>
PYGEO_SIMD_CLONES bool pre_activations_finite(const T* values, const T* bias, int64_t n) {
  T probe = T(0);
#pragma omp simd reduction(+ : probe)
  for (int64_t o = 0; o < n; ++o) probe += T(0) * (values[o] + bias[o]);
  return probe == T(0);
}

// row[o] *= factor[o]: a tangent row times the slopes a'(h) of its layer.
template <typename T>
PYGEO_SIMD_CLONES void scale_row(T* row, const T* factor, int64_t n) {
#pragma omp simd
  for (int64_t o = 0; o < n; ++o) row[o] *= factor[o];
}


// Shared by mlp_metric_cpu (M = 1) and mlp_ensemble_metric_cpu: M members of one architecture, G = (1/M) sum_m G_m.
// z: [B, d]; weights[l]: [M, n_{l+1}, n_l] row-major (nn.Linear layout, members stacked) with widths = (n_0 = d, n_1,
// ..., n_L = D); biases[l]: [M, n_{l+1}]; codes[l], params[2 l], params[2 l + 1]: the activation after layer l;
// output_weight: [D] or nullptr (ones), shared by the members, ignored when bernoulli (then w = p (1 - p),
// p = sigmoid(f) clamped into [eps, 1 - eps]); last_upper_triangular: every member's last weight matrix is upper
// triangular (its zeros are skipped); G: [B, d, d]. A point whose pre-activations overflow for some member gets NaN.
template <typename T>
void mlp_members_metric(const T* z, const std::vector<const T*>& weights, const std::vector<const T*>& biases,
                        const std::vector<int64_t>& widths, const std::vector<int64_t>& codes,
                        const std::vector<double>& params, const T* output_weight, bool bernoulli, double eps,
                        bool last_upper_triangular, T* G, int64_t B, int64_t M) {
  const int64_t L = static_cast<int64_t>(weights.size());
  check_positive(L, "number of layers");
  check_positive(M, "number of members");
  PYGEO_CHECK(static_cast<int64_t>(biases.size()) == L && static_cast<int64_t>(codes.size()) == L &&
                  static_cast<int64_t>(params.size()) == 2 * L && static_cast<int64_t>(widths.size()) == L + 1,
              "mlp_metric: weights, biases, codes (L each), params (2 L) and widths (L + 1) disagree");
  for (int64_t l = 0; l <= L; ++l) check_positive(widths[l], "layer width");
  for (int64_t l = 0; l < L; ++l) {
    PYGEO_CHECK(weights[l] != nullptr && biases[l] != nullptr, "mlp_metric: null weight or bias pointer");
    PYGEO_CHECK(codes[l] >= 0 && codes[l] < kActivationCount, "mlp_metric: unknown activation code");
  }
  check_nonnegative(B, "B");
  PYGEO_CHECK(eps > 0 && eps < 0.5, "mlp_metric: eps must be in (0, 0.5)");
  if (B == 0) return;

  constexpr int NR = columns_per_micro_tile<T>();
  const int64_t d = widths[0];
  const int64_t D = widths[L];
  const int64_t rows_per_point = d + 1;  // primal row, then d tangent rows
  const int64_t points_per_block = std::max<int64_t>(1, kTargetBlockRows / rows_per_point);
  const int64_t block_rows = round_up(points_per_block * rows_per_point, kRowsPerMicroTile);

  // W_l^T of each member packed in panels of NR output columns, [n_{l+1} rounded up to NR / NR][n_l][NR],
  // zero-padded, shared by every thread: packed[m * L + l].
  std::vector<std::vector<T>> packed(M * L);
  std::vector<int64_t> padded(L);
  for (int64_t l = 0; l < L; ++l) padded[l] = round_up(widths[l + 1], NR);
#pragma omp parallel for schedule(dynamic, 1) if (M * L > 1)
  for (int64_t item = 0; item < M * L; ++item) {
    const int64_t m = item / L, l = item % L;
    const int64_t in = widths[l], out = widths[l + 1];
    const T* W = weights[l] + m * out * in;
    std::vector<T>& panels = packed[item];
    panels.assign(static_cast<size_t>(in * padded[l]), T(0));
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) panels[((o / NR) * in + i) * NR + o % NR] = W[o * in + i];
  }
  int64_t state_width = round_up(d, NR);
  for (int64_t l = 0; l + 1 < L; ++l) state_width = std::max(state_width, padded[l]);
  const int64_t tile_columns = std::min(padded[L - 1], kLastLayerTileColumns);  // a multiple of NR
  const T lo = static_cast<T>(eps), hi = static_cast<T>(1.0 - eps);
  const bool output_enters_metric = bernoulli || codes[L - 1] != kIdentity;
  PYGEO_CHECK(!(last_upper_triangular && output_enters_metric),
              "mlp_metric: an upper-triangular (compressed) last layer needs an identity output and a constant weight");
  const int64_t n_blocks = (B + points_per_block - 1) / points_per_block;
  const int64_t block_values = points_per_block * d * d;
  // Parallel over (block, member) items when the blocks alone would leave threads idle; each item's Gram goes to its
  // own slot and the members are summed in member order afterwards, so the result is the same in either schedule.
  const bool by_member = M > 1 && n_blocks < 2 * static_cast<int64_t>(max_threads());
  std::vector<T> member_acc(by_member ? static_cast<size_t>(n_blocks * M * block_values) : 0);
  std::vector<char> member_overflow(by_member ? static_cast<size_t>(n_blocks * M * points_per_block) : 0);
  const int64_t n_items = by_member ? n_blocks * M : n_blocks;

#pragma omp parallel
  {
    std::vector<T> state(static_cast<size_t>(block_rows * state_width));
    std::vector<T> next(static_cast<size_t>(block_rows * state_width));
    std::vector<T> tile(static_cast<size_t>(block_rows * tile_columns));
    std::vector<T> scale(static_cast<size_t>(tile_columns)), scaled(static_cast<size_t>(tile_columns));
    std::vector<T> acc(static_cast<size_t>(block_values)), total(static_cast<size_t>(block_values));
    std::vector<T> slopes(static_cast<size_t>(state_width));  // a'(h) of one point's hidden layer
    std::vector<char> overflow(static_cast<size_t>(points_per_block));  // a pre-activation of the point overflowed

    // acc[p] = G_m of the block's points (count from first), overflow[p] |= member m overflowed there.
    auto member_block = [&](int64_t m, int64_t first, int64_t count, T* acc, char* overflow) {
      // Layer input: primal row z_p and the identity tangents; rows of absent points stay zero.
      std::fill(state.begin(), state.end(), T(0));
      for (int64_t p = 0; p < count; ++p) {
        T* rows = state.data() + p * rows_per_point * state_width;
        std::memcpy(rows, z + (first + p) * d, static_cast<size_t>(d) * sizeof(T));
        for (int64_t k = 0; k < d; ++k) rows[(1 + k) * state_width + k] = T(1);
      }
      // Hidden layers: one GEMM for primal and tangents, then a(h) on the primal row, a'(h) on the tangent rows.
      for (int64_t l = 0; l + 1 < L; ++l) {
        const int64_t out = widths[l + 1];
        const T* bias = biases[l] + m * out;
        gemm(state.data(), state_width, packed[m * L + l].data(), next.data(), state_width, block_rows, padded[l],
             widths[l], -1);
        const T p0 = static_cast<T>(params[2 * l]), p1 = static_cast<T>(params[2 * l + 1]);
        for (int64_t p = 0; p < count; ++p) {
          T* rows = next.data() + p * rows_per_point * state_width;
          if (!pre_activations_finite(rows, bias, out)) overflow[p] = 1;
          activate_row(codes[l], p0, p1, bias, rows, slopes.data(), out);
          for (int64_t k = 1; k <= d; ++k) scale_row(rows + k * state_width, slopes.data(), out);
        }
        std::swap(state, next);
      }
      // Last layer, tile by tile over its outputs, reduced into G straight away.
      std::fill(acc, acc + block_values, T(0));
      const int64_t last = L - 1;
      const T* bias = biases[last] + m * D;
      const T p0 = static_cast<T>(params[2 * last]), p1 = static_cast<T>(params[2 * last + 1]);
      for (int64_t o0 = 0; o0 < D; o0 += tile_columns) {
        const int64_t width = std::min(tile_columns, D - o0);
        gemm(state.data(), state_width, packed[m * L + last].data() + o0 * widths[last], tile.data(), tile_columns,
             block_rows, round_up(width, NR), widths[last], last_upper_triangular ? o0 : -1);
        for (int64_t p = 0; p < count; ++p) {
          const T* rows = tile.data() + p * rows_per_point * tile_columns;
          // The output's pre-activation enters G only through a non-identity last activation or the Bernoulli
          // weight (an identity last layer with a constant weight is also the compressed case, whose rows R T hold
          // no output values).
          if (output_enters_metric && !pre_activations_finite(rows, bias + o0, width)) overflow[p] = 1;
          for (int64_t o = 0; o < width; ++o) {
            T value, slope;
            activate(codes[last], p0, p1, rows[o] + bias[o0 + o], value, slope);
            T w = output_weight ? output_weight[o0 + o] : T(1);
            if (bernoulli) {
              const T prob = std::min(std::max(sigmoid(value), lo), hi);
              w = prob * (T(1) - prob);
            }
            scale[o] = w * slope * slope;  // J[o, :] = slope * tangent rows
          }
          gram_update(scale.data(), rows + tile_columns, tile_columns, d, width, scaled.data(), acc + p * d * d);
        }
      }
    };
    // G = sum_m (G_m / M) in member order: each member's Gram divided by M before the sum, so that a mean in range
    // is not lost to an overflowing sum of finite G_m (issue 30); the reference and EnsembleMetric form it alike.
    const T members = static_cast<T>(M);
    auto add_member = [&](T* total, const T* member, int64_t n, bool first_member) {
      if (M == 1) return;  // total is member already (the single-MLP op)
      if (first_member)
        for (int64_t v = 0; v < n; ++v) total[v] /= members;
      else
        for (int64_t v = 0; v < n; ++v) total[v] += member[v] / members;
    };
    // G of the block's points from the members' mean.
    auto write_block = [&](int64_t first, int64_t count, const T* sum, const char* refused) {
      for (int64_t p = 0; p < count; ++p) {
        const T* a = sum + p * d * d;
        T* Gp = G + (first + p) * d * d;
        if (refused[p]) {  // refused in Python ("G is not finite ... overflow"), as on the torch backend
          std::fill(Gp, Gp + d * d, std::numeric_limits<T>::quiet_NaN());
          continue;
        }
        for (int64_t i = 0; i < d; ++i)
          for (int64_t j = i; j < d; ++j) Gp[i * d + j] = Gp[j * d + i] = a[i * d + j];
      }
    };
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n_items; ++item) {
      const int64_t block = by_member ? item / M : item;
      const int64_t first = block * points_per_block;
      const int64_t count = std::min(points_per_block, B - first);
      if (by_member) {
        const int64_t m = item % M;
        char* flags = member_overflow.data() + item * points_per_block;
        member_block(m, first, count, member_acc.data() + item * block_values, flags);
        continue;
      }
      std::fill(overflow.begin(), overflow.end(), char(0));
      for (int64_t m = 0; m < M; ++m) {
        member_block(m, first, count, m == 0 ? total.data() : acc.data(), overflow.data());
        add_member(total.data(), acc.data(), count * d * d, m == 0);
      }
      write_block(first, count, total.data(), overflow.data());
    }
    if (by_member) {  // the implicit barrier of the loop above: every member's Gram is there
#pragma omp for schedule(static)
      for (int64_t block = 0; block < n_blocks; ++block) {
        const int64_t first = block * points_per_block;
        const int64_t count = std::min(points_per_block, B - first);
        const T* base = member_acc.data() + block * M * block_values;
        std::copy(base, base + count * d * d, total.begin());
        std::fill(overflow.begin(), overflow.end(), char(0));
        for (int64_t m = 0; m < M; ++m) {
          const char* flags = member_overflow.data() + (block * M + m) * points_per_block;
          for (int64_t p = 0; p < count; ++p) overflow[p] |= flags[p];
          add_member(total.data(), base + m * block_values, count * d * d, m == 0);
        }
        write_block(first, count, total.data(), overflow.data());
      }
    }
  }
}

}  // namespace

// The fused metric of one MLP (weights[l] [n_{l+1}, n_l], biases[l] [n_{l+1}]): the members' kernel with M = 1.
template <typename T>
void mlp_metric_cpu(const T* z, const std::vector<const T*>& weights, const std::vector<const T*>& biases,
                    const std::vector<int64_t>& widths, const std::vector<int64_t>& codes,
                    const std::vector<double>& params, const T* output_weight, bool bernoulli, double eps,
                    bool last_upper_triangular, T* G, int64_t B) {
  mlp_members_metric<T>(z, weights, biases, widths, codes, params, output_weight, bernoulli, eps,
                        last_upper_triangular, G, B, 1);
}

// The mean metric of M MLPs of one architecture in one launch: weights[l] [M, n_{l+1}, n_l], biases[l] [M, n_{l+1}]
// (members stacked), the rest as mlp_metric_cpu; G [B, d, d] = (1/M) sum_m G_m.
template <typename T>
void mlp_ensemble_metric_cpu(const T* z, const std::vector<const T*>& weights, const std::vector<const T*>& biases,
                             const std::vector<int64_t>& widths, const std::vector<int64_t>& codes,
                             const std::vector<double>& params, const T* output_weight, bool bernoulli, double eps,
                             bool last_upper_triangular, T* G, int64_t B, int64_t M) {
  mlp_members_metric<T>(z, weights, biases, widths, codes, params, output_weight, bernoulli, eps,
                        last_upper_triangular, G, B, M);
}

template void mlp_metric_cpu<float>(const float*, const std::vector<const float*>&, const std::vector<const float*>&,
                                    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<double>&,
                                    const float*, bool, double, bool, float*, int64_t);
template void mlp_metric_cpu<double>(const double*, const std::vector<const double*>&,
                                     const std::vector<const double*>&, const std::vector<int64_t>&,
                                     const std::vector<int64_t>&, const std::vector<double>&, const double*, bool,
                                     double, bool, double*, int64_t);
template void mlp_ensemble_metric_cpu<float>(const float*, const std::vector<const float*>&,
                                             const std::vector<const float*>&, const std::vector<int64_t>&,
                                             const std::vector<int64_t>&, const std::vector<double>&, const float*,
                                             bool, double, bool, float*, int64_t, int64_t);
template void mlp_ensemble_metric_cpu<double>(const double*, const std::vector<const double*>&,
                                              const std::vector<const double*>&, const std::vector<int64_t>&,
                                              const std::vector<int64_t>&, const std::vector<double>&, const double*,
                                              bool, double, bool, double*, int64_t, int64_t);

}  // namespace pygeo

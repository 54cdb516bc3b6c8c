// Small-row products against a column-block-packed weight, for CPU decode steps.
//
// packed[b, k, c] = weight[b * 64 + c, k] (zero past out_features): each 64-column block
// of the input-major weight is one contiguous stream, read once from memory per product
// whatever the row count. Rows run six at a time (24 vector accumulators of the 32) over
// chunks of KC inputs, so a chunk re-read by the next six rows comes from L1. Every
// output element is one float accumulator summed over k in ascending order with fused
// multiply-adds (built with -ffp-contract=fast), whatever the row or thread count: a
// row's result does not depend on which rows share its call.
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

constexpr int64_t COLS = 64;  // columns per packed block: four 16-float vectors
constexpr int64_t KC = 64;    // inputs per chunk: 64 x 256 B = 16 KB of a block, fits L1
constexpr int ROWS = 6;       // rows per pass: 24 of the 32 vector registers accumulate
                              // (dresd.cpu_linear.ROWS_PER_PASS)

typedef float v16 __attribute__((vector_size(64), aligned(4)));

// y[r, 0:64] (+)= x[r, 0:kc] @ w[0:kc, 0:64] for R rows; starts from zero when `first`.
template <int R>
inline void rows_times_chunk(const float* x, int64_t ldx, const float* w, int64_t kc,
                             float* y, int64_t ldy, bool first) {
  v16 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c)
      acc[r][c] = first ? (v16){} : *(const v16*)(y + r * ldy + c * 16);
  for (int64_t k = 0; k < kc; ++k) {
    const v16* wk = (const v16*)(w + k * COLS);
    const v16 w0 = wk[0], w1 = wk[1], w2 = wk[2], w3 = wk[3];
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * ldx + k];
      acc[r][0] += xv * w0;
      acc[r][1] += xv * w1;
      acc[r][2] += xv * w2;
      acc[r][3] += xv * w3;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) *(v16*)(y + r * ldy + c * 16) = acc[r][c];
}

// One 64-column block of y = x @ weight.T for every row of x.
void block_product(const float* x, int64_t rows, int64_t in, const float* wb, float* yb, int64_t ldy) {
  for (int64_t k0 = 0; k0 < in; k0 += KC) {
    const int64_t kc = std::min(KC, in - k0);
    const bool first = k0 == 0;
    const float* w = wb + k0 * COLS;
    int64_t r = 0;
    for (; r + ROWS <= rows; r += ROWS) rows_times_chunk<ROWS>(x + r * in + k0, in, w, kc, yb + r * ldy, ldy, first);
    switch (rows - r) {
      case 5: rows_times_chunk<5>(x + r * in + k0, in, w, kc, yb + r * ldy, ldy, first); break;
      case 4: rows_times_chunk<4>(x + r * in + k0, in, w, kc, yb + r * ldy, ldy, first); break;
      case 3: rows_times_chunk<3>(x + r * in + k0, in, w, kc, yb + r * ldy, ldy, first); break;
      case 2: rows_times_chunk<2>(x + r * in + k0, in, w, kc, yb + r * ldy, ldy, first); break;
      case 1: rows_times_chunk<1>(x + r * in + k0, in, w, kc, yb + r * ldy, ldy, first); break;
      default: break;
    }
  }
}

}  // namespace

// x [rows, in] float32 @ the weight packed by dresd.cpu_linear.pack_weight -> [rows, out].
torch::Tensor packed_matmul(torch::Tensor x, torch::Tensor packed, int64_t out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && packed.scalar_type() == torch::kFloat,
              "packed_matmul: x must be a 2-D float32 tensor and packed float32");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == COLS && packed.size(1) == x.size(1) && packed.is_contiguous(),
              "packed_matmul: packed must be [blocks, in_features, 64] with in_features = x.size(1)");
  x = x.contiguous();
  const int64_t rows = x.size(0), in = x.size(1), blocks = packed.size(0), ldy = blocks * COLS;
  auto y = torch::empty({rows, ldy}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) block_product(xp, rows, in, wp + b * in * COLS, yp + b * COLS, ldy);
  });
  return ldy == out ? y : y.narrow(1, 0, out);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_matmul", &packed_matmul, "x @ weight.T against a column-block-packed weight");
}

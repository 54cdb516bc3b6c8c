// Small-row products against a column-block-packed weight, for CPU decode steps.
//
// packed[b, k, c] = weight[b * 64 + c, k] (zero past out_features): each 64-column block
// of the input-major weight is one contiguous stream, read once from memory per product
// whatever the row count. Rows run six at a time (24 vector accumulators of the 32) over
// chunks of KC inputs, so a chunk re-read by the next six rows comes from L1. Every
// output element is one float accumulator summed over k in ascending order with fused
// multiply-adds (built with -ffp-contract=fast), whatever the row or thread count: a
// row's result does not depend on which rows share its call.
//
// A weight whose values are exactly small integer codes times a per-group scale plus a
// per-group offset (a GGUF Q4_1 / Q8_0 model's weights, dequantized) can instead be packed
// as those codes (4 or 8 bits a weight, dresd.model.fastpath.weight_codes): each input's 64 weights are
// decoded in registers, w = code * scale + offset, which gives back the float weight's
// exact bits (code * scale is exact in float32), then multiplied exactly as above. Reading
// 6-10 bits a weight instead of 32 is what makes a one-row product faster; the sums are
// the same.
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

constexpr int64_t COLS = 64;  // columns per packed block: four 16-float vectors
constexpr int64_t KC = 64;    // inputs per chunk: 64 x 256 B = 16 KB of a block, fits L1
constexpr int ROWS = 6;       // rows per pass: 24 of the 32 vector registers accumulate
                              // (dresd.model.fastpath.cpu_linear.ROWS_PER_PASS)

constexpr int64_t GROUP = 32;  // inputs sharing one scale and offset (dresd.model.fastpath.weight_codes.GROUP)

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef uint8_t u8x16 __attribute__((vector_size(16), aligned(1)));
typedef int32_t i32x16 __attribute__((vector_size(64), aligned(4)));

// 16 bytes -> 16 floats. Widening to int32 first: a direct byte -> float conversion and
// a conversion straight from a load both compile to scalar code (GCC 13).
inline v16 to_floats(u8x16 b) { return __builtin_convertvector(__builtin_convertvector(b, i32x16), v16); }

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

// One 64-column block of y = x @ weight.T for every row of x; chunk(k0, kc) gives the
// block's inputs k0 .. k0+kc-1 as a [kc, 64] float array.
template <typename Chunk>
void block_product(const float* x, int64_t rows, int64_t in, Chunk chunk, float* yb, int64_t ldy) {
  for (int64_t k0 = 0; k0 < in; k0 += KC) {
    const int64_t kc = std::min(KC, in - k0);
    const bool first = k0 == 0;
    const float* w = chunk(k0, kc);
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

// w[0:4] = code[k, 0:64] * d[0:4] + m[0:4]: one input's 64 weights, exactly.
// BITS 8: codes are int8, one byte a column. BITS 4: codes 0..15, byte j of an input's 32
// holding column j in its low nibble and column j + 32 in its high one.
template <int BITS>
inline void decode_input(const uint8_t* codes, int64_t k, const v16* d, const v16* m, v16 w[4]) {
  if constexpr (BITS == 8) {
    // Two's complement bytes: flip the sign bit, widen unsigned, subtract 128.
    const uint8_t* c = codes + k * COLS;
    for (int i = 0; i < 4; ++i) w[i] = (to_floats(*(const u8x16*)(c + 16 * i) ^ 128) - 128.0f) * d[i] + m[i];
  } else {
    const uint8_t* c = codes + k * (COLS / 2);
    const u8x16 lo = *(const u8x16*)c, hi = *(const u8x16*)(c + 16);
    w[0] = to_floats(lo & 15) * d[0] + m[0];
    w[1] = to_floats(hi & 15) * d[1] + m[1];
    w[2] = to_floats(lo >> 4) * d[2] + m[2];
    w[3] = to_floats(hi >> 4) * d[3] + m[3];
  }
}

// rows_times_chunk for up to ROWS rows of a whole coded block, decoding each input's
// weights in registers: the same products, in the same order, as from a decoded buffer.
template <int R, int BITS>
void rows_times_coded_block(const float* x, int64_t in, const uint8_t* codes, const float* scale,
                            const float* offset, float* y, int64_t ldy) {
  v16 acc[R][4] = {};
  for (int64_t g0 = 0; g0 < in; g0 += GROUP) {
    const v16* d = (const v16*)(scale + (g0 / GROUP) * COLS);
    const v16* m = (const v16*)(offset + (g0 / GROUP) * COLS);
    for (int64_t k = g0; k < g0 + GROUP; ++k) {
      v16 w[4];
      decode_input<BITS>(codes, k, d, m, w);
      for (int r = 0; r < R; ++r) {
        const float xv = x[r * in + k];
        acc[r][0] += xv * w[0];
        acc[r][1] += xv * w[1];
        acc[r][2] += xv * w[2];
        acc[r][3] += xv * w[3];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) *(v16*)(y + r * ldy + c * 16) = acc[r][c];
}

template <int BITS>
void coded_blocks(const float* xp, int64_t rows, int64_t in, const uint8_t* cp, const float* sp, const float* op,
                  float* yp, int64_t ldy, int64_t b0, int64_t b1) {
  const int64_t code_bytes = in * COLS * BITS / 8, groups = in / GROUP;
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* cb = cp + b * code_bytes;
    const float* sb = sp + b * groups * COLS;
    const float* ob = op + b * groups * COLS;
    // ROWS rows a pass, each pass decoding the block again (from cache: a block's codes
    // are at most a few tens of KB); cheaper than storing decoded floats for re-reading.
    for (int64_t r = 0; r < rows; r += ROWS) {
      const float* x = xp + r * in;
      float* y = yp + r * ldy + b * COLS;
      switch (std::min<int64_t>(ROWS, rows - r)) {
        case 1: rows_times_coded_block<1, BITS>(x, in, cb, sb, ob, y, ldy); break;
        case 2: rows_times_coded_block<2, BITS>(x, in, cb, sb, ob, y, ldy); break;
        case 3: rows_times_coded_block<3, BITS>(x, in, cb, sb, ob, y, ldy); break;
        case 4: rows_times_coded_block<4, BITS>(x, in, cb, sb, ob, y, ldy); break;
        case 5: rows_times_coded_block<5, BITS>(x, in, cb, sb, ob, y, ldy); break;
        default: rows_times_coded_block<ROWS, BITS>(x, in, cb, sb, ob, y, ldy); break;
      }
    }
  }
}

}  // namespace

// x [rows, in] float32 @ the weight packed by dresd.model.fastpath.cpu_linear.pack_weight -> [rows, out].
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
    for (int64_t b = b0; b < b1; ++b) {
      const float* wb = wp + b * in * COLS;
      block_product(xp, rows, in, [&](int64_t k0, int64_t) { return wb + k0 * COLS; }, yp + b * COLS, ldy);
    }
  });
  return ldy == out ? y : y.narrow(1, 0, out);
}

// x [rows, in] float32 @ a weight packed as codes by dresd.model.fastpath.cpu_linear.pack -> [rows, out].
torch::Tensor coded_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor offset,
                           int64_t out, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "coded_matmul: bits must be 4 or 8");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.size(1) % GROUP == 0,
              "coded_matmul: x must be a 2-D float32 tensor with a multiple of 32 columns");
  const int64_t rows = x.size(0), in = x.size(1), blocks = codes.size(0), ldy = blocks * COLS;
  TORCH_CHECK(codes.scalar_type() == torch::kByte && codes.is_contiguous() && codes.dim() == 3 &&
                  codes.size(1) == in && codes.size(2) == COLS * bits / 8,
              "coded_matmul: codes must be uint8 [blocks, in_features, 64 * bits / 8]");
  for (const auto& t : {scale, offset})
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.dim() == 3 && t.size(0) == blocks &&
                    t.size(1) == in / GROUP && t.size(2) == COLS,
                "coded_matmul: scale and offset must be float32 [blocks, in_features / 32, 64]");
  x = x.contiguous();
  auto y = torch::empty({rows, ldy}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* op = offset.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    if (bits == 8) coded_blocks<8>(xp, rows, in, cp, sp, op, yp, ldy, b0, b1);
    else coded_blocks<4>(xp, rows, in, cp, sp, op, yp, ldy, b0, b1);
  });
  return ldy == out ? y : y.narrow(1, 0, out);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_matmul", &packed_matmul, "x @ weight.T against a column-block-packed weight");
  m.def("coded_matmul", &coded_matmul, "x @ weight.T against a weight packed as exact integer codes");
}

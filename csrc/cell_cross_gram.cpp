// Per-cell cross-Gram kernels for CPU tensors, reading the maps in place
// (see cskd_kernels/ops/cross_gram.py for the contract).
//
//   cell_cross_gram_forward(parts, cells)      k maps (B, C, H, W), cells (q, 4) int32
//       -> G (q, kB, kB) float64, G = the Gram of the rows shifted by row 0 over each cell's features
//   cell_cross_gram_backward(parts, cells, m)  m (q, kB, kB) centered
//       -> k maps: grad_a[b, :, cell] = sum_j m[a B + b, j] (row_j - row_0)[:, cell]
//
// Row r of a cell is map r / B, image r % B; its features are the cell's C x
// (height x width) values, and every cell row of one channel is a contiguous
// segment of `width` values of the map (the whole channel plane when the cell
// spans whole rows). So no stacked or padded copy of the cells is made: the
// kernels pack the shifted segments (row_r - row_0) of up to `block` features
// into a thread-local tile that stays in L1, then run the register-blocked
// Gram of gram_tiles.h over it (forward), or form every output row as the
// m-combination of the tile rows and scatter it to the gradients' segments
// (backward; every pixel is in exactly one cell, so every gradient element is
// written exactly once).
//
// The cells of one grid row (a band) are read together, a whole map row at a
// time, each cell's segments going to its own tile: every cache line of the
// maps is read once, in order. Work is cut into items of (band, channel
// range) that threads take dynamically. Each item accumulates the partial
// Gram of each of its cells in its own double slots (each tile's dot products
// are summed in the input dtype first), and the slots of a cell are summed in
// item order: the result depends neither on the
// schedule nor on the number of threads. The shift makes row 0 exactly zero
// and removes any common offset of the features (centering, done afterwards
// in Python, is invariant to it).
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cell_table.h"
#include "cpu_features.h"
#include "denormals.h"
#include "gram_tiles.h"
#include "ops.h"
#include "output_pool.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CSKD_XG_X86_DISPATCH 1
#include <immintrin.h>
#endif

namespace {

using namespace cskd::tiles;
using cskd::Cell;
using cskd::read_cells;

// Features per work item (channels x cell positions), about cka.cpp's item size.
constexpr int64_t kItemFeatures = 8192;

// One cell's geometry and the maps' layout.
struct Geometry {
  int64_t height, width;  // of the maps
  int64_t channels;
  int64_t plane;  // height * width
};

// A band: consecutive cells of the table on the same rows (a row of the grid).
// The band's cells are read together, a whole map row at a time, so every
// cache line of the maps is read once and in order (cell by cell, a row of
// 26 values in 5 cells would touch most lines twice, in short strided runs
// that the prefetchers miss).
struct Band {
  int64_t first;  // index of the first cell in the table
  int64_t count;
  const Cell* cells;
};

// The work items: channels [c0, c1) of a band.
struct Item {
  int64_t band;
  int64_t c0;
  int64_t c1;
  int64_t slot;  // its first partial Gram (one per cell of the band)
};

// Calls run(cell of the band, offset, length) for the contiguous runs of
// channels [c0, c1) of a band, offsets relative to an image's first element,
// in feature order within each cell.
template <typename Run>
CSKD_TILES_INLINE void for_each_run(const Geometry& geo, const Band& band, int64_t c0, int64_t c1, const Run& run) {
  const Cell& first = band.cells[0];
  if (band.count == 1 && first.width == geo.width && first.height == geo.height) {
    run(0, c0 * geo.plane, (c1 - c0) * geo.plane);
  } else if (band.count == 1 && first.width == geo.width) {
    for (int64_t c = c0; c < c1; ++c) run(0, c * geo.plane + first.row0 * geo.width, first.height * geo.width);
  } else {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t y = 0; y < first.height; ++y) {
        const int64_t base = c * geo.plane + (first.row0 + y) * geo.width;
        for (int64_t j = 0; j < band.count; ++j) run(j, base + band.cells[j].col0, band.cells[j].width);
      }
    }
  }
}

// The element loops of the packing and scattering: plain loops (compiled for
// each target), and AVX-512 ones with masked tails (a cell row is often
// shorter than two vectors, so scalar tails would cost as much as the rest).
struct PlainOps {
  template <typename T>
  static CSKD_TILES_INLINE void shift(const T* rl, const T* r0, T* out, int64_t len) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) out[j] = rl[j] - r0[j];
  }
  template <typename T>
  static CSKD_TILES_INLINE void copy(const T* src, T* dst, int64_t len) {
    std::memcpy(dst, src, static_cast<size_t>(len) * sizeof(T));
  }
};

#ifdef CSKD_XG_X86_DISPATCH
#define CSKD_XG_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512")))
// Not always_inline: the generic loops that call these are inlined into the AVX-512 entry points first.
#define CSKD_XG_AVX512_INLINE CSKD_XG_AVX512 inline

struct Avx512Ops {
  static CSKD_XG_AVX512_INLINE void shift(const float* rl, const float* r0, float* out, int64_t len) {
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) _mm512_storeu_ps(out + j, _mm512_sub_ps(_mm512_loadu_ps(rl + j), _mm512_loadu_ps(r0 + j)));
    if (j < len) {
      const __mmask16 k = static_cast<__mmask16>((1u << (len - j)) - 1);
      _mm512_mask_storeu_ps(out + j, k, _mm512_sub_ps(_mm512_maskz_loadu_ps(k, rl + j), _mm512_maskz_loadu_ps(k, r0 + j)));
    }
  }
  static CSKD_XG_AVX512_INLINE void shift(const double* rl, const double* r0, double* out, int64_t len) {
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) _mm512_storeu_pd(out + j, _mm512_sub_pd(_mm512_loadu_pd(rl + j), _mm512_loadu_pd(r0 + j)));
    if (j < len) {
      const __mmask8 k = static_cast<__mmask8>((1u << (len - j)) - 1);
      _mm512_mask_storeu_pd(out + j, k, _mm512_sub_pd(_mm512_maskz_loadu_pd(k, rl + j), _mm512_maskz_loadu_pd(k, r0 + j)));
    }
  }
  static CSKD_XG_AVX512_INLINE void copy(const float* src, float* dst, int64_t len) {
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) _mm512_storeu_ps(dst + j, _mm512_loadu_ps(src + j));
    if (j < len) {
      const __mmask16 k = static_cast<__mmask16>((1u << (len - j)) - 1);
      _mm512_mask_storeu_ps(dst + j, k, _mm512_maskz_loadu_ps(k, src + j));
    }
  }
  static CSKD_XG_AVX512_INLINE void copy(const double* src, double* dst, int64_t len) {
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) _mm512_storeu_pd(dst + j, _mm512_loadu_pd(src + j));
    if (j < len) {
      const __mmask8 k = static_cast<__mmask8>((1u << (len - j)) - 1);
      _mm512_mask_storeu_pd(dst + j, k, _mm512_maskz_loadu_pd(k, src + j));
    }
  }
};
#endif

// tile[l - 1][pos + j] = rows[l][offset + j] - rows[0][offset + j] for l = 1..n-1, j < len.
template <typename Ops, typename T>
CSKD_TILES_INLINE void shift_run(const T* const* rows, int64_t n, int64_t offset, int64_t len, T* tile, int64_t ld) {
  const T* r0 = rows[0] + offset;
  for (int64_t l = 1; l < n; ++l) Ops::shift(rows[l] + offset, r0, tile + (l - 1) * ld, len);
}

// Cuts the band's runs of columns [c0, c1) into pieces that fill each cell's tile up to `block`
// columns: pack(q, offset, take) packs one piece at column pos[q] of cell q's tile (pos[q] then
// advances), flush(q) empties a full tile (and resets pos[q]); every tile is flushed at the end.
template <typename Pack, typename Flush>
CSKD_TILES_INLINE void pack_band(const Geometry& geo, const Band& band, int64_t c0, int64_t c1, int64_t block,
                                 std::vector<int64_t>& pos, const Pack& pack, const Flush& flush) {
  for_each_run(geo, band, c0, c1, [&](int64_t q, int64_t offset, int64_t len) CSKD_TILES_LAMBDA {
    for (int64_t done = 0; done < len;) {
      const int64_t take = std::min(len - done, block - pos[q]);
      pack(q, offset + done, take);
      pos[q] += take;
      done += take;
      if (pos[q] == block) flush(q);
    }
  });
  for (int64_t q = 0; q < band.count; ++q) flush(q);
}

// G of one item into acc: one n x n slot per cell of the band (lower triangle;
// row and column 0 stay zero). tile: one (n - 1) x ld tile per cell of the band.
template <typename Ops, int Bytes, typename T>
CSKD_TILES_INLINE void gram_item_body(const T* const* rows, int64_t n, const Geometry& geo, const Band& band,
                                      int64_t c0, int64_t c1, int64_t block, int64_t ld, T* tile, double* acc) {
  const int64_t tile_stride = (n - 1) * ld;
  std::vector<int64_t> pos(static_cast<size_t>(band.count), 0);
  auto flush = [&](int64_t j) CSKD_TILES_LAMBDA {
    if (pos[j] > 0) gram_block<Bytes>(tile + j * tile_stride, ld, n - 1, pos[j], acc + j * n * n + n + 1, n);
    pos[j] = 0;
  };
  pack_band(geo, band, c0, c1, block, pos, [&](int64_t j, int64_t offset, int64_t take) CSKD_TILES_LAMBDA {
    shift_run<Ops>(rows, n, offset, take, tile + j * tile_stride + pos[j], ld);
  }, flush);
}

struct Piece {
  int64_t pos;
  int64_t offset;
  int64_t len;
};

// The gradients of one item. m_band: the n x n matrices of the band's cells;
// tile: one (n - 1) x ld tile per cell of the band; out: n x ld scratch;
// pieces: up to `block` pieces per cell of the band.
template <typename Ops, int Bytes, typename T>
CSKD_TILES_INLINE void grad_item_body(const T* const* rows, T* const* grads, int64_t n, const Geometry& geo,
                                      const Band& band, int64_t c0, int64_t c1, const T* m_band, int64_t block,
                                      int64_t ld, T* tile, T* out, Piece* pieces) {
  constexpr int64_t L = kTileLanes<T>;
  const int64_t tile_stride = (n - 1) * ld;
  std::vector<int64_t> pos(static_cast<size_t>(band.count), 0), count(static_cast<size_t>(band.count), 0);
  auto flush = [&](int64_t q) CSKD_TILES_LAMBDA {
    if (pos[q] == 0) return;
    const Piece* pq = pieces + q * block;
    // Whole vectors: the columns past pos hold stale (finite) tile values and are not copied out.
    const int64_t width = (pos[q] + L - 1) / L * L;
    // Row i of the output is sum_l m[i][l] (row_l - row_0); l = 0 drops out (its shifted row is zero).
    combine_rows<Bytes>(m_band + q * n * n + 1, n, tile + q * tile_stride, ld, n - 1, n, width, out, ld);
    for (int64_t i = 0; i < n; ++i) {
      T* g = grads[i];
      for (int64_t s = 0; s < count[q]; ++s) Ops::copy(out + i * ld + pq[s].pos, g + pq[s].offset, pq[s].len);
    }
    pos[q] = 0;
    count[q] = 0;
  };
  pack_band(geo, band, c0, c1, block, pos, [&](int64_t q, int64_t offset, int64_t take) CSKD_TILES_LAMBDA {
    shift_run<Ops>(rows, n, offset, take, tile + q * tile_stride + pos[q], ld);
    pieces[q * block + count[q]++] = Piece{pos[q], offset, take};
  }, flush);
}

template <typename T>
void gram_item_baseline(const T* const* rows, int64_t n, const Geometry& geo, const Band& band, int64_t c0,
                        int64_t c1, int64_t block, int64_t ld, T* tile, double* acc) {
  gram_item_body<PlainOps, kBaselineBytes>(rows, n, geo, band, c0, c1, block, ld, tile, acc);
}

template <typename T>
void grad_item_baseline(const T* const* rows, T* const* grads, int64_t n, const Geometry& geo, const Band& band,
                        int64_t c0, int64_t c1, const T* m_c, int64_t block, int64_t ld, T* tile, T* out,
                        Piece* pieces) {
  grad_item_body<PlainOps, kBaselineBytes>(rows, grads, n, geo, band, c0, c1, m_c, block, ld, tile, out, pieces);
}

#ifdef CSKD_XG_X86_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"))) void gram_item_avx2(const T* const* rows, int64_t n, const Geometry& geo,
                                                        const Band& band, int64_t c0, int64_t c1, int64_t block,
                                                        int64_t ld, T* tile, double* acc) {
  gram_item_body<PlainOps, kAvx2Bytes>(rows, n, geo, band, c0, c1, block, ld, tile, acc);
}

template <typename T>
__attribute__((target("avx2,fma"))) void grad_item_avx2(const T* const* rows, T* const* grads, int64_t n,
                                                        const Geometry& geo, const Band& band, int64_t c0,
                                                        int64_t c1, const T* m_c, int64_t block, int64_t ld,
                                                        T* tile, T* out, Piece* pieces) {
  grad_item_body<PlainOps, kAvx2Bytes>(rows, grads, n, geo, band, c0, c1, m_c, block, ld, tile, out, pieces);
}

template <typename T>
CSKD_XG_AVX512 void gram_item_avx512(const T* const* rows, int64_t n, const Geometry& geo, const Band& band,
                                     int64_t c0, int64_t c1, int64_t block, int64_t ld, T* tile, double* acc) {
  gram_item_body<Avx512Ops, kAvx512Bytes>(rows, n, geo, band, c0, c1, block, ld, tile, acc);
}

template <typename T>
CSKD_XG_AVX512 void grad_item_avx512(const T* const* rows, T* const* grads, int64_t n, const Geometry& geo,
                                     const Band& band, int64_t c0, int64_t c1, const T* m_c, int64_t block,
                                     int64_t ld, T* tile, T* out, Piece* pieces) {
  grad_item_body<Avx512Ops, kAvx512Bytes>(rows, grads, n, geo, band, c0, c1, m_c, block, ld, tile, out, pieces);
}
#endif

template <typename T>
void gram_item(const T* const* rows, int64_t n, const Geometry& geo, const Band& band, int64_t c0, int64_t c1,
               int64_t block, int64_t ld, T* tile, double* acc) {
#ifdef CSKD_XG_X86_DISPATCH
  if (cskd::cpu::has_avx512_core()) return gram_item_avx512(rows, n, geo, band, c0, c1, block, ld, tile, acc);
  if (cskd::cpu::has_avx2_fma()) return gram_item_avx2(rows, n, geo, band, c0, c1, block, ld, tile, acc);
#endif
  gram_item_baseline(rows, n, geo, band, c0, c1, block, ld, tile, acc);
}

template <typename T>
void grad_item(const T* const* rows, T* const* grads, int64_t n, const Geometry& geo, const Band& band, int64_t c0,
               int64_t c1, const T* m_c, int64_t block, int64_t ld, T* tile, T* out, Piece* pieces) {
#ifdef CSKD_XG_X86_DISPATCH
  if (cskd::cpu::has_avx512_core()) {
    return grad_item_avx512(rows, grads, n, geo, band, c0, c1, m_c, block, ld, tile, out, pieces);
  }
  if (cskd::cpu::has_avx2_fma()) {
    return grad_item_avx2(rows, grads, n, geo, band, c0, c1, m_c, block, ld, tile, out, pieces);
  }
#endif
  grad_item_baseline(rows, grads, n, geo, band, c0, c1, m_c, block, ld, tile, out, pieces);
}

// ---------------------------------------------------------------------------
// Entry points.

// Cells per band at most: each takes a tile of its own (16 KiB) in the thread's scratch.
constexpr int64_t kMaxBand = 8;

struct Problem {
  std::vector<torch::Tensor> parts;  // contiguous, one dtype
  Geometry geo;
  int64_t batch;
  int64_t n;  // k * batch
  std::vector<Cell> cells;
  std::vector<Band> bands;
  std::vector<Item> items;
  int64_t slots = 0;      // partial Grams of all items
  int64_t widest = 1;     // cells in the largest band
};

Problem prepare(const std::vector<torch::Tensor>& parts_in, const torch::Tensor& cells_in) {
  TORCH_CHECK(!parts_in.empty(), "parts must hold at least one map");
  const torch::Tensor& first = parts_in[0];
  TORCH_CHECK(first.dim() == 4, "parts must be 4-D maps (B, C, H, W), got ", first.sizes());
  Problem pb;
  for (size_t i = 0; i < parts_in.size(); ++i) {
    const torch::Tensor& p = parts_in[i];
    TORCH_CHECK(p.sizes() == first.sizes(), "parts must have one shape, got ", first.sizes(), " and ", p.sizes());
    TORCH_CHECK(p.device().is_cpu(), "parts must be CPU tensors, got one on ", p.device());
    TORCH_CHECK(p.scalar_type() == first.scalar_type(), "parts must have one dtype, got ", first.scalar_type(),
                " and ", p.scalar_type());
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
                "parts must be float32 or float64, got ", p.scalar_type());
    pb.parts.push_back(p.contiguous());
  }
  pb.batch = first.size(0);
  pb.n = pb.batch * static_cast<int64_t>(parts_in.size());
  pb.geo = Geometry{first.size(2), first.size(3), first.size(1), first.size(2) * first.size(3)};
  pb.cells = read_cells(cells_in, pb.geo.height, pb.geo.width);
  // Bands: runs of consecutive non-empty cells on the same rows (empty cells keep a zero Gram).
  const int64_t q_count = static_cast<int64_t>(pb.cells.size());
  for (int64_t q = 0; q < q_count;) {
    const Cell& c = pb.cells[q];
    if (c.height == 0 || c.width == 0) {
      ++q;
      continue;
    }
    int64_t e = q + 1;
    while (e < q_count && e - q < kMaxBand && pb.cells[e].row0 == c.row0 && pb.cells[e].height == c.height &&
           pb.cells[e].width > 0) {
      ++e;
    }
    pb.bands.push_back(Band{q, e - q, nullptr});
    q = e;
  }
  for (int64_t b = 0; b < static_cast<int64_t>(pb.bands.size()); ++b) {
    Band& band = pb.bands[b];
    band.cells = pb.cells.data() + band.first;
    pb.widest = std::max(pb.widest, band.count);
    const int64_t step = std::max<int64_t>(1, kItemFeatures / (band.cells[0].height * band.cells[0].width));
    for (int64_t c0 = 0; c0 < pb.geo.channels; c0 += step) {
      pb.items.push_back(Item{b, c0, std::min(pb.geo.channels, c0 + step), pb.slots});
      pb.slots += band.count;
    }
  }
  return pb;
}

template <typename T>
std::vector<const T*> row_pointers(const Problem& pb) {
  std::vector<const T*> rows(static_cast<size_t>(pb.n));
  const int64_t image = pb.geo.channels * pb.geo.plane;
  for (int64_t r = 0; r < pb.n; ++r) rows[r] = pb.parts[r / pb.batch].data_ptr<T>() + (r % pb.batch) * image;
  return rows;
}

template <typename T>
void forward_typed(const Problem& pb, torch::Tensor& out) {
  const int64_t n = pb.n, slot = n * n;
  const std::vector<const T*> rows = row_pointers<T>(pb);
  const int64_t count = static_cast<int64_t>(pb.items.size());
  const int threads = item_threads(count);
  const int64_t block = block_columns<T>(n - 1);
  const int64_t ld = tile_ld<T>(block);
  const int64_t tile_size = std::max<int64_t>(n - 1, 1) * ld * pb.widest;
  std::vector<double> partial(static_cast<size_t>(pb.slots * slot), 0.0);
  AlignedBuffer<T> scratch(threads * tile_size);
  for_each_item(count, threads, [&](int64_t i, int tid) {
    const Item& item = pb.items[i];
    gram_item(rows.data(), n, pb.geo, pb.bands[item.band], item.c0, item.c1, block, ld,
              scratch.data() + tid * tile_size, partial.data() + item.slot * slot);
  });
  double* o = out.data_ptr<double>();
  for (const Item& item : pb.items) {  // item order: fixed, whatever the schedule
    const Band& band = pb.bands[item.band];
    for (int64_t j = 0; j < band.count; ++j) {
      double* g = o + (band.first + j) * slot;
      const double* s = partial.data() + (item.slot + j) * slot;
      for (int64_t a = 0; a < n; ++a)
        for (int64_t b = 0; b <= a; ++b) g[a * n + b] += s[a * n + b];
    }
  }
  for (int64_t q = 0; q < static_cast<int64_t>(pb.cells.size()); ++q) {
    double* g = o + q * slot;
    for (int64_t a = 0; a < n; ++a)
      for (int64_t b = 0; b < a; ++b) g[b * n + a] = g[a * n + b];
  }
}

template <typename T>
void backward_typed(const Problem& pb, const torch::Tensor& m, std::vector<torch::Tensor>& grads) {
  const int64_t n = pb.n;
  const std::vector<const T*> rows = row_pointers<T>(pb);
  std::vector<T*> grad_rows(static_cast<size_t>(n));
  const int64_t image = pb.geo.channels * pb.geo.plane;
  for (int64_t r = 0; r < n; ++r) grad_rows[r] = grads[r / pb.batch].data_ptr<T>() + (r % pb.batch) * image;
  const T* m_data = m.data_ptr<T>();
  const int64_t count = static_cast<int64_t>(pb.items.size());
  const int threads = item_threads(count);
  const int64_t block = block_columns<T>(n - 1);
  const int64_t ld = tile_ld<T>(block);
  // The band's tiles, then the n output rows.
  const int64_t tiles = std::max<int64_t>(n - 1, 1) * ld * pb.widest;
  const int64_t tile_size = tiles + n * ld;
  AlignedBuffer<T> scratch(threads * tile_size);
  // The padded columns of the tiles are read (never used): start them finite.
  std::memset(scratch.data(), 0, static_cast<size_t>(threads * tile_size) * sizeof(T));
  const int64_t piece_size = block * pb.widest;
  std::vector<Piece> pieces(static_cast<size_t>(threads * piece_size));
  for_each_item(count, threads, [&](int64_t i, int tid) {
    const Item& item = pb.items[i];
    const Band& band = pb.bands[item.band];
    T* tile = scratch.data() + tid * tile_size;
    grad_item(rows.data(), grad_rows.data(), n, pb.geo, band, item.c0, item.c1, m_data + band.first * n * n, block,
              ld, tile, tile + tiles, pieces.data() + tid * piece_size);
  });
}

torch::Tensor cell_cross_gram_forward(const std::vector<torch::Tensor>& parts, const torch::Tensor& cells) {
  const Problem pb = prepare(parts, cells);
  const int64_t q = static_cast<int64_t>(pb.cells.size());
  torch::Tensor out = at::zeros({q, pb.n, pb.n}, pb.parts[0].options().dtype(at::kDouble));
  if (pb.items.empty() || pb.n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(pb.parts[0].scalar_type(), "cell_cross_gram_forward",
                             [&] { forward_typed<scalar_t>(pb, out); });
  return out;
}

std::vector<torch::Tensor> cell_cross_gram_backward(const std::vector<torch::Tensor>& parts,
                                                    const torch::Tensor& cells, const torch::Tensor& m_in) {
  const Problem pb = prepare(parts, cells);
  const int64_t q = static_cast<int64_t>(pb.cells.size());
  TORCH_CHECK(m_in.dim() == 3 && m_in.size(0) == q && m_in.size(1) == pb.n && m_in.size(2) == pb.n,
              "m must have shape (cells, k*B, k*B) = (", q, ", ", pb.n, ", ", pb.n, "), got ", m_in.sizes());
  TORCH_CHECK(m_in.device().is_cpu() && m_in.is_floating_point(), "m must be a floating-point CPU tensor");
  // n x n per cell: converting it to the maps' dtype costs nothing and keeps one kernel per dtype.
  const torch::Tensor m = m_in.to(pb.parts[0].scalar_type()).contiguous();
  std::vector<torch::Tensor> grads;
  for (const torch::Tensor& p : pb.parts) grads.push_back(cskd::empty_output_like(p));
  int64_t covered = 0;
  for (const Cell& c : pb.cells) covered += c.height * c.width;
  TORCH_CHECK(covered == pb.geo.plane, "the cells must cover the ", pb.geo.height, " x ", pb.geo.width,
              " map once (they cover ", covered, " positions)");
  if (pb.items.empty() || pb.n == 0) return grads;
  AT_DISPATCH_FLOATING_TYPES(pb.parts[0].scalar_type(), "cell_cross_gram_backward",
                             [&] { backward_typed<scalar_t>(pb, m, grads); });
  return grads;
}

}  // namespace

void register_cell_cross_gram(pybind11::module& m) {
  m.def("cell_cross_gram_forward", cskd::denormals::flushing(&cell_cross_gram_forward),
        pybind11::arg("parts"), pybind11::arg("cells"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "G (cells, k*B, k*B) float64: per cell the Gram of the rows (map r / B, image r % B) shifted by row 0, "
        "over the cell's C x positions features; maps read in place.");
  m.def("cell_cross_gram_backward", cskd::denormals::flushing(&cell_cross_gram_backward),
        pybind11::arg("parts"), pybind11::arg("cells"),
        pybind11::arg("m"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Per map a: grad[b, :, cell] = sum_j m[cell][a B + b, j] (row_j - row_0)[:, cell] for centered m.");
}

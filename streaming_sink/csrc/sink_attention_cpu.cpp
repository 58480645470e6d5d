// The streaming-sink attention contract over a paged KV cache, on CPU.
//
// Same contract and arguments as streaming_sink/reference_attention.py (read that
// first; it is the ground truth this kernel is tested against). What makes it fast:
//   * one work item = (sequence, query block j, kv head): the item's queries share
//     their live blocks and per-block query rotations, and every K/V row loaded
//     serves all of them (GQA without repeat, prefill rows of a block together);
//   * only live blocks are read (sinks + the window blocks that exist), straight
//     from the cache in its own dtype (no float copy of the cache);
//   * online softmax, one pass over the live blocks; learned sink logits seed it;
//   * the rotation R(delta) of the query is applied once per (item, block), with
//     cos/sin from a table precomputed per layer (delta = m * block_size);
//   * all items of a step in one parallel_for.
// Cache views are [blocks, block_size, kv_heads, D] with any strides: vLLM's CPU
// layout (keys transposed per block: offset stride 1) and SGLang's token pool
// (block_size 1, d stride 1) both take a vectorised path. fp8 caches (e4m3fn, e5m2;
// vLLM's uint8 cache viewed as float8) are read in place too: k_scale is folded into
// the query's scale and v_scale into the output, so a load is a bit conversion only.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

struct Policy {
  bool on;         // false: plain causal attention (no sink/window rules)
  int64_t S, Sb, Wb, bs;
  bool streaming(int64_t j) const { return on && j > Sb + Wb; }
  int64_t ws(int64_t j) const { return streaming(j) ? (j - Wb) * bs : S; }  // window start
  // The same window with a sequence's own sink length (per-request sinks).
  Policy with_sinks(int64_t s) const { return Policy{on, s, (s + bs - 1) / bs, Wb, bs}; }
};

struct Item {  // the queries of one sequence that sit in one logical block j
  int64_t seq, j, row0, t0, n;
};

struct Rope {
  const float* table;    // [(Wb + 1), half, 2]: cos, sin of delta = m * bs
  const float* inv_freq; // [half], for deltas outside the table
  int64_t table_rows, half;
  bool neox;
};

// cos/sin of `delta` positions, as the torch reference computes them (angle in double).
inline void rotation(const Rope& r, int64_t delta, int64_t bs, float* cs) {
  if (delta % bs == 0 && delta / bs < r.table_rows) {
    std::copy_n(r.table + (delta / bs) * r.half * 2, r.half * 2, cs);
    return;
  }
  for (int64_t i = 0; i < r.half; ++i) {
    double ang = static_cast<double>(delta) * static_cast<double>(r.inv_freq[i]);
    cs[2 * i] = static_cast<float>(std::cos(ang));
    cs[2 * i + 1] = static_cast<float>(std::sin(ang));
  }
}

inline void rotate_row(const float* x, float* y, const float* cs, int64_t half, int64_t D, bool neox) {
  if (neox) {
    for (int64_t i = 0; i < half; ++i) {
      float c = cs[2 * i], s = cs[2 * i + 1], x1 = x[i], x2 = x[i + half];
      y[i] = x1 * c - x2 * s;
      y[i + half] = x2 * c + x1 * s;
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      float c = cs[2 * i], s = cs[2 * i + 1], x1 = x[2 * i], x2 = x[2 * i + 1];
      y[2 * i] = x1 * c - x2 * s;
      y[2 * i + 1] = x2 * c + x1 * s;
    }
  }
  std::copy(x + 2 * half, x + D, y + 2 * half);
}

// Physical block ids: int32 or int64 rows; sequence i reads row rows[i] (or row i).
struct BlockTable {
  const int32_t* t32;
  const int64_t* t64;
  int64_t stride;
  const int64_t* rows;
  int64_t row(int64_t seq) const { return rows ? rows[seq] : seq; }
  int64_t at(int64_t r, int64_t b) const { return t32 ? t32[r * stride + b] : t64[r * stride + b]; }
};

template <typename KT>
struct Cache {
  const KT* k;
  const KT* v;
  int64_t kb, ko, kh, kd;  // key strides: block, offset, head, dim
  int64_t vb, vo, vh, vd;
};

// Loads as float. bf16 by a shift, so loops over it vectorise.
inline float load(float x) { return x; }
inline float load(c10::Half x) { return static_cast<float>(x); }
inline float load(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
// fp8 (kMant mantissa bits, exponent bias kBias) -> float, exact, and written without
// branches so loops over it vectorise (a ?: here stopped gcc: 10-30x slower): a normal
// number is its exponent/mantissa bits moved into place with the bias difference added;
// a subnormal (exponent 0) is mantissa * 2^(1 - bias - kMant), computed in float (a float
// subnormal would be slow); an integer mask picks one. Inf/NaN codes come out finite:
// vLLM never writes them and the kernel reads written slots only.
template <int kMant, int kBias>
inline float fp8_to_float(uint8_t x) {
  const uint32_t em = x & 0x7F;
  const uint32_t normal = (em << (23 - kMant)) + (static_cast<uint32_t>(127 - kBias) << 23);
  const float sub_f = static_cast<float>(static_cast<int32_t>(em)) *
                      (1.0f / static_cast<float>(1u << (kBias + kMant - 1)));
  uint32_t sub;
  std::memcpy(&sub, &sub_f, sizeof sub);
  const uint32_t is_sub = 0u - static_cast<uint32_t>((em >> kMant) == 0);  // all ones for a subnormal
  const uint32_t bits = (sub & is_sub) | (normal & ~is_sub) | (static_cast<uint32_t>(x & 0x80) << 24);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float load(c10::Float8_e4m3fn x) { return fp8_to_float<3, 7>(x.x); }
inline float load(c10::Float8_e5m2 x) { return fp8_to_float<2, 15>(x.x); }
template <typename T>
constexpr bool kIsFp8 = std::is_same_v<T, c10::Float8_e4m3fn> || std::is_same_v<T, c10::Float8_e5m2>;

// exp(x) for x <= 0 (scores minus their running max), Cephes' expf polynomial
// (~1 ulp): plain arithmetic, so loops over it vectorise (std::exp does not).
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float f = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * f + 1.3981999507e-3f;
  y = y * f + 8.3334519073e-3f;
  y = y * f + 4.1665795894e-2f;
  y = y * f + 1.6666665459e-1f;
  y = y * f + 5.0000001201e-1f;
  y = y * f * f + f + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof scale);
  return y * scale;
}

// Keys scored per online-softmax update: one block of 64+ tokens, or several small
// blocks (SGLang's are single tokens), so the per-update cost is spread.
constexpr int64_t kGroupKeys = 128;
// Register tiles: kRows query rows x kLanes floats (two AVX-512 vectors): 8 accumulators,
// and per step 2 loads of keys (values) + 4 broadcasts of queries (probabilities) feed 8 FMAs.
constexpr int64_t kRows = 4, kLanes = 32;

// Scores s[r][o] = q[r] . k(o) for kRows rows, o in [o0, o1) (multiples of kLanes) of a
// dim-major key block (vLLM's CPU layout): each key vector loaded once for all rows.
template <typename KT>
inline void score_tile_dim_major(const float* q, int64_t D, const KT* kblk, int64_t kd, int64_t o0,
                                 int64_t o1, float* s, int64_t s_stride) {
  for (int64_t o = o0; o < o1; o += kLanes) {
    float t[kRows][kLanes] = {};
    for (int64_t d = 0; d < D; ++d) {
      const KT* kr = kblk + d * kd + o;
      if constexpr (kIsFp8<KT>) {
        float kf[kLanes];  // converted once for all rows (an fp8 conversion is ~10 ops)
#pragma omp simd
        for (int64_t c = 0; c < kLanes; ++c) kf[c] = load(kr[c]);
        for (int64_t r = 0; r < kRows; ++r) {
          const float qd = q[r * D + d];
#pragma omp simd
          for (int64_t c = 0; c < kLanes; ++c) t[r][c] += qd * kf[c];
        }
      } else {  // plain floats load in the loop: a staging copy made decode 1.4x slower
        for (int64_t r = 0; r < kRows; ++r) {
          const float qd = q[r * D + d];
#pragma omp simd
          for (int64_t c = 0; c < kLanes; ++c) t[r][c] += qd * load(kr[c]);
        }
      }
    }
    for (int64_t r = 0; r < kRows; ++r) std::copy_n(t[r], kLanes, s + r * s_stride + o);
  }
}

// acc[r][:] += sum_o p[r][o] * v(o) for kRows rows, o in [o0, o1), token-major values.
template <typename KT>
inline void pv_tile(const float* p, int64_t p_stride, const KT* vblk, int64_t vo, int64_t o0, int64_t o1,
                    float* acc, int64_t D) {
  for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
    float t[kRows][kLanes];
    for (int64_t r = 0; r < kRows; ++r) std::copy_n(acc + r * D + d0, kLanes, t[r]);
    for (int64_t o = o0; o < o1; ++o) {
      const KT* vr = vblk + o * vo + d0;
      if constexpr (kIsFp8<KT>) {
        float vf[kLanes];  // converted once for all rows
#pragma omp simd
        for (int64_t c = 0; c < kLanes; ++c) vf[c] = load(vr[c]);
        for (int64_t r = 0; r < kRows; ++r) {
          const float pr = p[r * p_stride + o];
#pragma omp simd
          for (int64_t c = 0; c < kLanes; ++c) t[r][c] += pr * vf[c];
        }
      } else {
        for (int64_t r = 0; r < kRows; ++r) {
          const float pr = p[r * p_stride + o];
#pragma omp simd
          for (int64_t c = 0; c < kLanes; ++c) t[r][c] += pr * load(vr[c]);
        }
      }
    }
    for (int64_t r = 0; r < kRows; ++r) std::copy_n(t[r], kLanes, acc + r * D + d0);
  }
}

// src[i * s_outer + j] for i in [i0, i1), j in [j0, j1) -> dst[i * d_outer + j] in bf16.
// An fp8 block read by several row tiles is widened once (else each 4-row tile would
// convert it again: prefill ran 2x slower than bf16). To bf16, not float: every e4m3 /
// e5m2 value is exact in bf16, and a float block (32 KB at 128 x 64) fell out of L1
// (as slow as converting per tile).
template <typename KT>
inline void widen(const KT* src, int64_t s_outer, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                  c10::BFloat16* dst, int64_t d_outer) {
  for (int64_t i = i0; i < i1; ++i) {
    const KT* r = src + i * s_outer;
    c10::BFloat16* w = dst + i * d_outer;
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) {
      const float f = load(r[j]);
      uint32_t bits;
      std::memcpy(&bits, &f, sizeof bits);
      w[j] = c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());  // exact
    }
  }
}

template <typename KT, typename QT>
void run_item(const Item& it, int64_t h, const Policy& P, const Rope* rope, const Cache<KT>& C,
              const QT* q, QT* out, int64_t q_row_stride, int64_t Hq, int64_t Hkv, int64_t D,
              const BlockTable& table, const float* sinks, int64_t sw, float scale, float v_scale,
              std::vector<float>& buf) {
  const int64_t G = Hq / Hkv, nq = it.n * G, bs = P.bs, j = it.j;
  const int64_t nqp = (nq + kRows - 1) / kRows * kRows;  // rows padded to whole tiles (zero queries)
  const bool streaming = P.streaming(j);
  const int64_t half = rope ? rope->half : 0;
  const int64_t gblocks = std::max<int64_t>(1, kGroupKeys / bs), gcols = gblocks * bs;
  const bool tiled_k = C.kd != 1 && C.ko == 1 && bs % kLanes == 0 && D % kLanes == 0;
  const bool tiled_v = C.vd == 1 && D % kLanes == 0;
  const bool widen_fp8 = kIsFp8<KT> && nqp > kRows;  // several row tiles read each block
  buf.resize(nqp * D * 3 + nqp * gcols + nqp * 2 + 2 * std::max<int64_t>(half, 1));
  thread_local std::vector<c10::BFloat16> wide_buf;  // [bs * D] an fp8 block widened (widen_fp8)
  if (widen_fp8) wide_buf.resize(bs * D);
  c10::BFloat16* wide = wide_buf.data();
  std::fill_n(buf.data(), nqp * D * 2, 0.f);  // queries (padding rows stay 0) and accumulators
  float* qf = buf.data();         // [nqp, D] the item's queries (a = qi * G + g), scaled
  float* acc = qf + nqp * D;      // [nqp, D]
  float* qr = acc + nqp * D;      // [nqp, D] rotated by the current block's delta
  float* s = qr + nqp * D;        // [nqp, gcols] scores (then probabilities) of the group
  float* m = s + nqp * gcols;     // [nqp] running max
  float* l = m + nqp;             // [nqp] running denominator
  float* cs = l + nqp;            // [half, 2]
  for (int64_t qi = 0; qi < it.n; ++qi)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t a = qi * G + g, head = h * G + g;
      const QT* qrow = q + (it.row0 + qi) * q_row_stride + head * D;
      for (int64_t d = 0; d < D; ++d) qf[a * D + d] = static_cast<float>(qrow[d]) * scale;
      m[a] = sinks ? sinks[head] : -std::numeric_limits<float>::infinity();
      l[a] = sinks ? 1.f : 0.f;  // exp(sink - m) = 1: the sink's share of the denominator
    }

  // Live blocks (docs/architecture.md): sinks + window when streaming, else 0..j.
  std::vector<int64_t> blocks;
  if (streaming) {
    for (int64_t b = 0; b < P.Sb; ++b) blocks.push_back(b);
    for (int64_t b = j - P.Wb; b <= j; ++b) blocks.push_back(b);
  } else {
    int64_t lo = sw > 0 ? std::max<int64_t>(it.t0 - sw + 1, 0) / bs : 0;
    for (int64_t b = lo; b <= j; ++b) blocks.push_back(b);
  }
  // The attended key offsets [lo, hi) of block b for query row qi.
  auto range = [&](int64_t b, int64_t qi, int64_t& lo, int64_t& hi) {
    const int64_t t = it.t0 + qi, base = b * bs;
    lo = 0;
    hi = std::min(bs, t - base + 1);
    if (sw > 0) lo = std::max(lo, t - sw + 1 - base);
    else if (streaming && b < P.Sb) hi = std::min(hi, P.S - base);  // sink tokens only
  };

  const int64_t trow = table.row(it.seq);
  const KT* vblk[kGroupKeys];
  int64_t ulo[kGroupKeys], uhi[kGroupKeys];  // per block of the group: union of the rows' ranges
  for (size_t g0 = 0; g0 < blocks.size(); g0 += gblocks) {
    const int64_t ng = std::min<int64_t>(gblocks, blocks.size() - g0);
    // 1. Scores of every block of the group, each through the query rotated by its delta.
    int64_t last_delta = 0;
    const float* qb = qf;
    for (int64_t gi = 0; gi < ng; ++gi) {
      const int64_t b = blocks[g0 + gi];
      int64_t blo = bs, bhi = 0;
      for (int64_t qi = 0; qi < it.n; ++qi) {
        int64_t lo, hi;
        range(b, qi, lo, hi);
        if (lo < hi) blo = std::min(blo, lo), bhi = std::max(bhi, hi);
      }
      ulo[gi] = blo, uhi[gi] = std::max(blo, bhi);
      const int64_t phys = table.at(trow, b);
      vblk[gi] = C.v + phys * C.vb + h * C.vh;
      if (blo >= bhi) continue;
      const KT* kblk = C.k + phys * C.kb + h * C.kh;
      const int64_t delta = (!P.on || b < P.Sb) ? 0 : P.ws(j) - P.ws(b);
      if (delta == 0) {
        qb = qf;
      } else if (delta != last_delta || qb == qf) {
        rotation(*rope, delta, bs, cs);
        for (int64_t a = 0; a < nqp; ++a) rotate_row(qf + a * D, qr + a * D, cs, half, D, rope->neox);
        qb = qr;
      }
      last_delta = delta;
      float* sg = s + gi * bs;
      if (tiled_k) {  // vLLM's layout: whole lane groups (the block's slots all exist)
        const int64_t o0 = blo / kLanes * kLanes, o1 = (bhi + kLanes - 1) / kLanes * kLanes;
        if (widen_fp8) {  // keys stay dim-major: [D, bs]
          widen(kblk, C.kd, 0, D, o0, o1, wide, bs);
          for (int64_t a0 = 0; a0 < nqp; a0 += kRows)
            score_tile_dim_major(qb + a0 * D, D, wide, bs, o0, o1, sg + a0 * gcols, gcols);
        } else {
          for (int64_t a0 = 0; a0 < nqp; a0 += kRows)
            score_tile_dim_major(qb + a0 * D, D, kblk, C.kd, o0, o1, sg + a0 * gcols, gcols);
        }
      } else {
        for (int64_t a = 0; a < nqp; ++a) {
          float* sa = sg + a * gcols;
          const float* qa = qb + a * D;
          for (int64_t o = blo; o < bhi; ++o) {
            const KT* kr = kblk + o * C.ko;
            float dot = 0.f;
            if (C.kd == 1) {
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < D; ++d) dot += qa[d] * load(kr[d]);
            } else {
              for (int64_t d = 0; d < D; ++d) dot += qa[d] * load(kr[d * C.kd]);
            }
            sa[o] = dot;
          }
        }
      }
    }
    // 2. Online softmax update per row over its own ranges; in the union ranges, what
    // a row does not attend gets probability 0 (those slots are written, finite keys).
    for (int64_t qi = 0; qi < it.n; ++qi) {
      int64_t lo[kGroupKeys], hi[kGroupKeys];
      bool any = false;
      for (int64_t gi = 0; gi < ng; ++gi) {
        range(blocks[g0 + gi], qi, lo[gi], hi[gi]);
        any |= lo[gi] < hi[gi];
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t a = qi * G + g;
        float* sa = s + a * gcols;
        if (!any) {  // no key of this group for the row (a layer window): p = 0 in the union
          for (int64_t gi = 0; gi < ng; ++gi) std::fill(sa + gi * bs + ulo[gi], sa + gi * bs + uhi[gi], 0.f);
          continue;
        }
        float mb = m[a];
        for (int64_t gi = 0; gi < ng; ++gi) {
          const float* sp = sa + gi * bs;
#pragma omp simd reduction(max : mb)
          for (int64_t o = lo[gi]; o < hi[gi]; ++o) mb = std::max(mb, sp[o]);
        }
        const float corr = std::exp(m[a] - mb);  // 0 on the first keys of a row without sinks
        if (corr != 1.f) {
          l[a] *= corr;
          float* acca = acc + a * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acca[d] *= corr;
        }
        m[a] = mb;
        float sum = 0.f;
        for (int64_t gi = 0; gi < ng; ++gi) {
          float* sp = sa + gi * bs;
          const int64_t l0 = std::max(lo[gi], ulo[gi]), h0 = std::min(hi[gi], uhi[gi]);
          for (int64_t o = ulo[gi]; o < std::min(l0, uhi[gi]); ++o) sp[o] = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t o = l0; o < h0; ++o) {
            sp[o] = exp_neg(sp[o] - mb);
            sum += sp[o];
          }
          for (int64_t o = std::max(h0, ulo[gi]); o < uhi[gi]; ++o) sp[o] = 0.f;
        }
        l[a] += sum;
      }
    }
    for (int64_t a = nq; a < nqp; ++a)  // padding rows: no keys
      for (int64_t gi = 0; gi < ng; ++gi) std::fill(s + a * gcols + gi * bs + ulo[gi], s + a * gcols + gi * bs + uhi[gi], 0.f);
    // 3. P.V over the union ranges.
    for (int64_t gi = 0; gi < ng; ++gi) {
      if (ulo[gi] >= uhi[gi]) continue;
      if (tiled_v && widen_fp8) {  // values token-major: [bs, D]
        widen(vblk[gi], C.vo, ulo[gi], uhi[gi], 0, D, wide, D);
        for (int64_t a0 = 0; a0 < nqp; a0 += kRows)
          pv_tile(s + a0 * gcols + gi * bs, gcols, wide, D, ulo[gi], uhi[gi], acc + a0 * D, D);
      } else if (tiled_v) {
        for (int64_t a0 = 0; a0 < nqp; a0 += kRows)
          pv_tile(s + a0 * gcols + gi * bs, gcols, vblk[gi], C.vo, ulo[gi], uhi[gi], acc + a0 * D, D);
      } else {
        for (int64_t a = 0; a < nq; ++a) {
          float* acca = acc + a * D;
          for (int64_t o = ulo[gi]; o < uhi[gi]; ++o) {
            const float p = s[a * gcols + gi * bs + o];
            const KT* vr = vblk[gi] + o * C.vo;
            for (int64_t d = 0; d < D; ++d) acca[d] += p * load(vr[d * C.vd]);
          }
        }
      }
    }
  }
  for (int64_t qi = 0; qi < it.n; ++qi)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t a = qi * G + g;
      QT* o = out + (it.row0 + qi) * q_row_stride + (h * G + g) * D;
      const float inv = v_scale / l[a];  // v_scale: an fp8 cache's values are read unscaled
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<QT>(acc[a * D + d] * inv);
    }
}

// out, q: [tokens, Hq, D] contiguous, float32 or the cache's dtype. k_cache/v_cache: [blocks, bs, Hkv, D].
// block_table [rows, max_blocks] int32/int64, table_rows [seqs] (sequence -> row; None: row i);
// query_start_loc [seqs + 1], seq_lens [seqs] int64.
// window_blocks < 0: no policy. rope_table [(Wb + 1), half, 2] + inv_freq [half] float32.
// seq_ids: only these sequences' rows are computed (the others' rows are left untouched).
// seq_sinks [seqs] int64: each sequence's own sink length (None: sink_tokens for all).
// k_scale/v_scale: an fp8 cache's dequantization factors (k = k_fp8 * k_scale); 1 otherwise.
void paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& block_table,
                     const c10::optional<at::Tensor>& table_rows, const at::Tensor& query_start_loc,
                     const at::Tensor& seq_lens, double scale,
                     int64_t sink_tokens, int64_t window_blocks,
                     const c10::optional<at::Tensor>& rope_table, const c10::optional<at::Tensor>& inv_freq,
                     int64_t rotary_dim, bool neox, const c10::optional<at::Tensor>& sinks,
                     int64_t sliding_window, const c10::optional<at::Tensor>& seq_ids,
                     const c10::optional<at::Tensor>& seq_sinks, double k_scale, double v_scale) {
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn || k_cache.scalar_type() == at::kFloat8_e5m2;
  TORCH_CHECK(q.scalar_type() == out.scalar_type() &&
              (q.scalar_type() == at::kFloat || (!fp8 && q.scalar_type() == k_cache.scalar_type()) ||
               (fp8 && (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf))),
              "q/out: float32 or the cache's dtype (bf16/fp16 with an fp8 cache)");
  TORCH_CHECK(fp8 || (k_scale == 1.0 && v_scale == 1.0), "k_scale/v_scale apply to fp8 caches only");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && q.sizes() == out.sizes(), "q/out: same shape, contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "caches are [blocks, block_size, kv_heads, D]");
  TORCH_CHECK(block_table.scalar_type() == at::kLong || block_table.scalar_type() == at::kInt,
              "block_table must be int32 or int64");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong &&
              (!table_rows.has_value() || table_rows->scalar_type() == at::kLong),
              "query_start_loc/seq_lens/table_rows must be int64");
  TORCH_CHECK(block_table.stride(1) == 1, "block_table rows must be contiguous");
  const int64_t Hq = q.size(1), D = q.size(2), bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(Hq % Hkv == 0 && k_cache.size(3) == D, "head shapes do not match");
  Policy P{window_blocks >= 0, sink_tokens, (sink_tokens + bs - 1) / bs, window_blocks, bs};
  Rope rope{};
  if (P.on) {
    TORCH_CHECK(rope_table.has_value() && inv_freq.has_value(), "the policy needs the rotary table");
    TORCH_CHECK(rope_table->is_contiguous() && rope_table->scalar_type() == at::kFloat, "rope_table: float32");
    rope = Rope{rope_table->data_ptr<float>(), inv_freq->data_ptr<float>(), rope_table->size(0),
                rotary_dim / 2, neox};
    TORCH_CHECK(rope_table->size(1) == rotary_dim / 2 && inv_freq->numel() == rotary_dim / 2, "rotary dims");
  }
  const float* sink_ptr = nullptr;
  if (sinks.has_value()) {
    TORCH_CHECK(sinks->scalar_type() == at::kFloat && sinks->is_contiguous() && sinks->numel() == Hq,
                "sinks: float32 [Hq]");
    sink_ptr = sinks->data_ptr<float>();
  }
  const int64_t* qsl = query_start_loc.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* seq_S = nullptr;
  if (seq_sinks.has_value()) {
    TORCH_CHECK(P.on, "seq_sinks needs the policy");
    TORCH_CHECK(seq_sinks->scalar_type() == at::kLong && seq_sinks->is_contiguous() &&
                seq_sinks->numel() == seq_lens.numel(), "seq_sinks: int64 [seqs]");
    seq_S = seq_sinks->data_ptr<int64_t>();
    for (int64_t i = 0; i < seq_sinks->numel(); ++i) TORCH_CHECK(seq_S[i] >= 0, "sink_tokens must be >= 0");
  }
  std::vector<int64_t> seqs;
  if (seq_ids.has_value()) {
    const int64_t* ids = seq_ids->data_ptr<int64_t>();
    seqs.assign(ids, ids + seq_ids->numel());
  } else {
    for (int64_t i = 0; i < seq_lens.numel(); ++i) seqs.push_back(i);
  }
  std::vector<Item> items;
  for (int64_t i : seqs) {
    const int64_t q_lo = qsl[i], q_hi = qsl[i + 1], len = lens[i];
    if (q_hi <= q_lo) continue;
    const int64_t first_t = len - (q_hi - q_lo);
    for (int64_t j = first_t / bs; j <= (len - 1) / bs; ++j) {
      const int64_t t0 = std::max(first_t, j * bs), t1 = std::min(len, (j + 1) * bs);
      items.push_back(Item{i, j, q_lo + t0 - first_t, t0, t1 - t0});
    }
  }
  const int64_t n_work = static_cast<int64_t>(items.size()) * Hkv;
  if (n_work == 0) return;
  const bool i32 = block_table.scalar_type() == at::kInt;
  BlockTable table{i32 ? block_table.data_ptr<int32_t>() : nullptr, i32 ? nullptr : block_table.data_ptr<int64_t>(),
                   block_table.stride(0), table_rows.has_value() ? table_rows->data_ptr<int64_t>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND4(at::kBFloat16, at::kHalf, at::kFloat8_e4m3fn, at::kFloat8_e5m2,
                                  k_cache.scalar_type(), "sink_attention_cpu", [&] {
    TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "k/v cache dtypes differ");
    Cache<scalar_t> C{k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                      k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
                      v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3)};
    auto run = [&](auto* qp, auto* op) {
      at::parallel_for(0, n_work, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> buf;
        for (int64_t w = begin; w < end; ++w) {
          const Item& it = items[w / Hkv];
          run_item(it, w % Hkv, seq_S ? P.with_sinks(seq_S[it.seq]) : P, P.on ? &rope : nullptr, C, qp, op,
                   Hq * D, Hq, Hkv, D, table, sink_ptr, sliding_window, static_cast<float>(scale * k_scale),
                   static_cast<float>(v_scale), buf);
        }
      });
    };
    if (q.scalar_type() == at::kFloat) {
      run(q.data_ptr<float>(), out.data_ptr<float>());
    } else if constexpr (kIsFp8<scalar_t>) {  // q/out in the model's dtype
      if (q.scalar_type() == at::kBFloat16) run(q.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>());
      else run(q.data_ptr<c10::Half>(), out.data_ptr<c10::Half>());
    } else {
      run(q.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    }
  });
}

}  // namespace

TORCH_LIBRARY(streaming_sink, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "Tensor? table_rows, Tensor query_start_loc, Tensor seq_lens, float scale, int sink_tokens, int window_blocks, "
        "Tensor? rope_table, Tensor? inv_freq, int rotary_dim, bool neox, Tensor? sinks, "
        "int sliding_window, Tensor? seq_ids, Tensor? seq_sinks, float k_scale, float v_scale) -> ()");
}

TORCH_LIBRARY_IMPL(streaming_sink, CPU, m) { m.impl("paged_attention", &paged_attention); }

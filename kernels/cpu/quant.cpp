// kvscope's CPU kernels for quantized weights: 4-bit groups (w4a8) and int8 rows (w8a8), both times
// int8-quantized activations.
//
// Built at first use by kernels/cpu_quant.py (g++ -O3 -march=native, cached per source, compiler and
// CPU); called through ctypes. The AVX-512 VNNI path is the fast one; the scalar path computes
// the same integers (tests hold them together) and exists so the library loads everywhere, but
// the Python side only routes work here when kvq4_isa() names a vector ISA.
//
// Weight layout of one linear W [N, K] (group G along K, G a multiple of 32, K padded to Kp, a
// multiple of G, with zero columns; N padded to N16 * 16 with zero rows):
//   qw  uint8  [N16][Kp / 8][64]   byte (lane * 4 + j) of chunk c: low nibble q[16t + lane][8c + j],
//                                  high nibble q[16t + lane][8c + 4 + j]   (j < 4, q in [0, 16))
//   sc  uint16 [N16][Kp / G][16]   fp16 bits of the group scale s
//   zp  int8   [N16][Kp / G][16]   integer zero point z in [0, 16)
//   W[n, k] = (q[n, k] - z[n, k / G]) * s[n, k / G]
// Activations x [M, K] are quantized per token in blocks of 32: d = max|x| / 127, xq = round(x / d)
// (half to even), so x ~= xq * d. Then for 16 rows at once (one 512-bit register of int32 sums):
//   y[n] = sum_g s[n, g] * sum_{blocks b of g} d_b * (sum_k q[n, k] * xq[k] - z[n, g] * sum_k xq[k])
// The inner sums are exact integers (vpdpbusd: u8 weights x s8 activations); the outer ones fp32.
// Up to 8 tokens share one unpacking of a weight tile (8 accumulators per 16 rows).
// Stacks of E experts are E such layouts back to back.
//
// int8 (kvq8_*): W [N, K] = w [N, K] (int8, symmetric) * r [N] (one fp32 scale per row), stored as
//   qw  uint8  [N16][Kp / 4][64]   byte (lane * 4 + j) of chunk c: w[16t + lane][4c + j] + 128
//   rs  float  [N16][16]           r per row
//   y[n] = r[n] * sum_b d_b * (sum_k (w + 128) * xq - 128 * sum_k xq)     (Kp = K padded to 32)
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(KVQ4_FORCE_SCALAR)
#include <immintrin.h>
#define KVQ4_AVX512VNNI 1
#endif

namespace {

constexpr int kChunkTokens = 8;  // tokens sharing one pass over a weight tile
#ifndef KVQ_PREFETCH
#define KVQ_PREFETCH 4096
#endif
// Software prefetch distance (bytes ahead in a weight's stream; tiles of one weight are
// contiguous): a routed expert is 0.25-1 MB, too short for the hardware prefetcher to reach
// full speed before it ends (measured: 8.5 GB/s per expert stream vs 19 GB/s on a 16 MB head).
constexpr int kPrefetch = KVQ_PREFETCH;

struct QuantRows {  // activations of some tokens, quantized per block of 32
  std::vector<int8_t> q;    // [M][Kp]
  std::vector<float> d;     // [M][Kp / 32]
  std::vector<int32_t> s;   // [M][Kp / 32]: sum of the block's xq
  int kp = 0;
  void resize(int m, int kp_) {
    kp = kp_;
    q.resize((size_t)m * kp);
    d.resize((size_t)m * (kp / 32));
    s.resize((size_t)m * (kp / 32));
  }
};

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {  // IEEE half -> float, exact (subnormals, inf, NaN)
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    int e = -1;
    uint32_t m = man;
    do { e++; m <<= 1; } while (!(m & 0x400));
    u = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even (NaN kept a NaN)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// One token's row (k valid values, fp32) into xq [kp] / d / s (blocks of 32).
void quantize_row(const float* x, int k, int kp, int8_t* xq, float* d, int32_t* s) {
  float buf[32];
  for (int b = 0; b < kp / 32; b++) {
    const int k0 = b * 32, valid = k - k0 >= 32 ? 32 : (k - k0 > 0 ? k - k0 : 0);
    for (int j = 0; j < 32; j++) buf[j] = j < valid ? x[k0 + j] : 0.f;
    float amax = 0.f;
    bool bad = false;  // NaN or inf: the block's scale becomes NaN, so the outputs are NaN too
    for (int j = 0; j < 32; j++) {
      const float a = std::fabs(buf[j]);
      amax = a > amax ? a : amax;
      bad |= !(a <= 3.0e38f);
    }
    const float db = bad ? NAN : amax / 127.0f;
    int32_t sum = 0;
    if (!bad && db > 0.f) {
      for (int j = 0; j < 32; j++) {
        int v = (int)std::nearbyint(buf[j] / db);  // half to even, as torch.round
        v = v > 127 ? 127 : (v < -127 ? -127 : v);
        xq[k0 + j] = (int8_t)v;
        sum += v;
      }
    } else {
      std::memset(xq + k0, 0, 32);
    }
    d[b] = db;
    s[b] = sum;
  }
}

void load_row(const void* x, int dtype, size_t row, int k, float* out) {
  if (dtype == 0) {
    std::memcpy(out, (const float*)x + row * k, sizeof(float) * k);
  } else {
    const uint16_t* p = (const uint16_t*)x + row * k;
    for (int i = 0; i < k; i++) out[i] = bf16_to_f32(p[i]);
  }
}

// 16 output rows of one weight tile for MB tokens: out[m * 16 + lane].
// xq rows at xq + m * kp, block scales / sums at d + m * (kp / 32), s + ...
// Per group: acc += s * sum_b d_b * (sum_k q * xq)  -  s * z * sum_b d_b * (sum_k xq); the inner
// sums are exact int32 (vpdpbusd), the rest fp32.
template <int MB>
void tile(const uint8_t* w, const uint16_t* sc, const int8_t* zp, int kp, int g,
          const int8_t* xq, const float* d, const int32_t* s, float* out) {
  const int ngroups = kp / g, bpg = g / 32, nb = kp / 32;
#ifdef KVQ4_AVX512VNNI
  __m512 acc[MB];
  for (int m = 0; m < MB; m++) acc[m] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int gi = 0; gi < ngroups; gi++) {
    const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sc + (size_t)gi * 16)));
    const __m512 zsv = _mm512_mul_ps(
        sv, _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(zp + (size_t)gi * 16)))));
    for (int b = 0; b < bpg; b++) {
      const int blk = gi * bpg + b, k0 = blk * 32;
      const uint8_t* wb = w + (size_t)(k0 / 8) * 64;
      __m512i ia[MB];
      for (int m = 0; m < MB; m++) ia[m] = _mm512_setzero_si512();
      for (int c = 0; c < 4; c++) {
        _mm_prefetch((const char*)(wb + c * 64 + kPrefetch), _MM_HINT_T1);
        const __m512i v = _mm512_loadu_si512((const void*)(wb + c * 64));
        const __m512i lo = _mm512_and_si512(v, low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        for (int m = 0; m < MB; m++) {
          const int8_t* xp = xq + (size_t)m * kp + k0 + c * 8;
          int32_t x0, x1;
          std::memcpy(&x0, xp, 4);
          std::memcpy(&x1, xp + 4, 4);
          ia[m] = _mm512_dpbusd_epi32(ia[m], lo, _mm512_set1_epi32(x0));
          ia[m] = _mm512_dpbusd_epi32(ia[m], hi, _mm512_set1_epi32(x1));
        }
      }
      for (int m = 0; m < MB; m++)
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[m]),
                                 _mm512_mul_ps(sv, _mm512_set1_ps(d[(size_t)m * nb + blk])), acc[m]);
    }
    for (int m = 0; m < MB; m++) {
      float zsum = 0.f;
      for (int b = 0; b < bpg; b++) {
        const size_t blk = (size_t)m * nb + gi * bpg + b;
        zsum += d[blk] * (float)s[blk];
      }
      acc[m] = _mm512_fnmadd_ps(zsv, _mm512_set1_ps(zsum), acc[m]);
    }
  }
  for (int m = 0; m < MB; m++) _mm512_storeu_ps(out + m * 16, acc[m]);
#else
  for (int m = 0; m < MB; m++)
    for (int lane = 0; lane < 16; lane++) {
      float acc = 0.f;
      for (int gi = 0; gi < ngroups; gi++) {
        const float sv = f16_to_f32(sc[(size_t)gi * 16 + lane]);
        const float zsv = sv * (float)zp[(size_t)gi * 16 + lane];
        float zsum = 0.f;
        for (int b = 0; b < bpg; b++) {
          const int blk = gi * bpg + b, k0 = blk * 32;
          int32_t ia = 0;
          for (int kk = k0; kk < k0 + 32; kk++) {
            const uint8_t byte = w[(size_t)(kk / 8) * 64 + lane * 4 + (kk % 8) % 4];
            const int q = (kk % 8) < 4 ? (byte & 0xF) : (byte >> 4);
            ia += q * xq[(size_t)m * kp + kk];
          }
          acc = std::fma((float)ia, sv * d[(size_t)m * nb + blk], acc);
          zsum += d[(size_t)m * nb + blk] * (float)s[(size_t)m * nb + blk];
        }
        acc = std::fma(-zsv, zsum, acc);
      }
      out[m * 16 + lane] = acc;
    }
#endif
}

void tile_n(int mb, const uint8_t* w, const uint16_t* sc, const int8_t* zp, int kp, int g,
            const int8_t* xq, const float* d, const int32_t* s, float* out) {
  switch (mb) {
    case 1: tile<1>(w, sc, zp, kp, g, xq, d, s, out); break;
    case 2: tile<2>(w, sc, zp, kp, g, xq, d, s, out); break;
    case 3: tile<3>(w, sc, zp, kp, g, xq, d, s, out); break;
    case 4: tile<4>(w, sc, zp, kp, g, xq, d, s, out); break;
    case 5: tile<5>(w, sc, zp, kp, g, xq, d, s, out); break;
    case 6: tile<6>(w, sc, zp, kp, g, xq, d, s, out); break;
    case 7: tile<7>(w, sc, zp, kp, g, xq, d, s, out); break;
    default: tile<8>(w, sc, zp, kp, g, xq, d, s, out); break;
  }
}

// int8 weights: 16 output rows of one tile for MB tokens (see the header for the layout).
template <int MB>
void tile8(const uint8_t* w, const float* rs, int kp, const int8_t* xq, const float* d,
           const int32_t* s, float* out) {
  const int nb = kp / 32;
#ifdef KVQ4_AVX512VNNI
  __m512 acc[MB];
  for (int m = 0; m < MB; m++) acc[m] = _mm512_setzero_ps();
  for (int blk = 0; blk < nb; blk++) {
    const int k0 = blk * 32;
    const uint8_t* wb = w + (size_t)(k0 / 4) * 64;
    __m512i ia[MB];
    for (int m = 0; m < MB; m++) ia[m] = _mm512_setzero_si512();
    for (int c = 0; c < 8; c++) {
      _mm_prefetch((const char*)(wb + c * 64 + kPrefetch), _MM_HINT_T1);
      const __m512i v = _mm512_loadu_si512((const void*)(wb + c * 64));
      for (int m = 0; m < MB; m++) {
        int32_t x0;
        std::memcpy(&x0, xq + (size_t)m * kp + k0 + c * 4, 4);
        ia[m] = _mm512_dpbusd_epi32(ia[m], v, _mm512_set1_epi32(x0));
      }
    }
    for (int m = 0; m < MB; m++) {
      const __m512i t = _mm512_sub_epi32(ia[m], _mm512_set1_epi32(128 * s[(size_t)m * nb + blk]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(d[(size_t)m * nb + blk]),
                               acc[m]);
    }
  }
  const __m512 rv = _mm512_loadu_ps(rs);
  for (int m = 0; m < MB; m++) _mm512_storeu_ps(out + m * 16, _mm512_mul_ps(acc[m], rv));
#else
  for (int m = 0; m < MB; m++)
    for (int lane = 0; lane < 16; lane++) {
      float acc = 0.f;
      for (int blk = 0; blk < nb; blk++) {
        const int k0 = blk * 32;
        int32_t ia = 0;
        for (int kk = k0; kk < k0 + 32; kk++)
          ia += (int)w[(size_t)(kk / 4) * 64 + lane * 4 + kk % 4] * xq[(size_t)m * kp + kk];
        const int32_t t = ia - 128 * s[(size_t)m * nb + blk];
        acc = std::fma((float)t, d[(size_t)m * nb + blk], acc);
      }
      out[m * 16 + lane] = acc * rs[lane];
    }
#endif
}

void tile8_n(int mb, const uint8_t* w, const float* rs, int kp, const int8_t* xq, const float* d,
             const int32_t* s, float* out) {
  switch (mb) {
    case 1: tile8<1>(w, rs, kp, xq, d, s, out); break;
    case 2: tile8<2>(w, rs, kp, xq, d, s, out); break;
    case 3: tile8<3>(w, rs, kp, xq, d, s, out); break;
    case 4: tile8<4>(w, rs, kp, xq, d, s, out); break;
    case 5: tile8<5>(w, rs, kp, xq, d, s, out); break;
    case 6: tile8<6>(w, rs, kp, xq, d, s, out); break;
    case 7: tile8<7>(w, rs, kp, xq, d, s, out); break;
    default: tile8<8>(w, rs, kp, xq, d, s, out); break;
  }
}

inline void prefetch_head(const uint8_t* p) {
#ifdef KVQ4_AVX512VNNI
  for (int i = 0; i < kPrefetch; i += 64) _mm_prefetch((const char*)(p + i), _MM_HINT_T1);
#else
  (void)p;
#endif
}

// One linear weight in either layout (bits 4: qw / sc / zp / g; bits 8: qw / rs).
struct Weight {
  int bits;
  const uint8_t* qw;
  const uint16_t* sc;
  const int8_t* zp;
  const float* rs;
  int kp, g;
  size_t tile_bytes() const { return bits == 4 ? (size_t)kp * 8 : (size_t)kp * 16; }
  size_t tile_scales() const { return bits == 4 ? (size_t)(kp / g) * 16 : 16; }
  // expert e of a stack of n-row weights
  Weight expert(int e, int n) const {
    const size_t n16 = (size_t)(n + 15) / 16;
    Weight w = *this;
    w.qw += e * n16 * tile_bytes();
    if (bits == 4) {
      w.sc += e * n16 * tile_scales();
      w.zp += e * n16 * tile_scales();
    } else {
      w.rs += e * n16 * 16;
    }
    return w;
  }
};

// out[m][0..n) for the m quantized tokens of qr (rows r0 .. r0 + m), row stride ldo. Tile-major:
// each 16-row weight tile is read from memory once and reused from cache by every chunk of up
// to kChunkTokens tokens, so m tokens cost one pass over the weight, not ceil(m / 4).
void gemm(const Weight& w, int n, const QuantRows& qr, int r0, int m, float* out, int ldo,
          int nthreads) {
  const int n16 = (n + 15) / 16, kp = w.kp, nb = kp / 32;
  const size_t tq = w.tile_bytes(), ts = w.tile_scales();
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1) schedule(static)
  for (int t = 0; t < n16; t++) {
    float buf[kChunkTokens * 16];
    const int cols = n - t * 16 < 16 ? n - t * 16 : 16;
    for (int c0 = 0; c0 < m; c0 += kChunkTokens) {
      const int mb = m - c0 < kChunkTokens ? m - c0 : kChunkTokens;
      const size_t row = (size_t)r0 + c0;
      const int8_t* xq = qr.q.data() + row * kp;
      const float* d = qr.d.data() + row * nb;
      const int32_t* s = qr.s.data() + row * nb;
      if (w.bits == 4)
        tile_n(mb, w.qw + t * tq, w.sc + t * ts, w.zp + t * ts, kp, w.g, xq, d, s, buf);
      else
        tile8_n(mb, w.qw + t * tq, w.rs + t * ts, kp, xq, d, s, buf);
      for (int i = 0; i < mb; i++)
        std::memcpy(out + (size_t)(c0 + i) * ldo + t * 16, buf + i * 16, cols * 4);
    }
  }
}

void quantize_rows(const void* x, int dtype, int m, int k, int kp, QuantRows& qr,
                   std::vector<float>& row) {
  qr.resize(m, kp);
  row.resize(k);
  for (int i = 0; i < m; i++) {
    load_row(x, dtype, i, k, row.data());
    quantize_row(row.data(), k, kp, qr.q.data() + (size_t)i * kp, qr.d.data() + (size_t)i * (kp / 32),
                 qr.s.data() + (size_t)i * (kp / 32));
  }
}

void store_rows(const float* src, int m, int n, void* y, int dtype) {
  const size_t total = (size_t)m * n;
  if (dtype == 0) {
    std::memcpy(y, src, total * 4);
  } else {
    uint16_t* p = (uint16_t*)y;
    for (size_t i = 0; i < total; i++) p[i] = f32_to_bf16(src[i]);
  }
}

}  // namespace

extern "C" {

const char* kvq4_isa() {
#ifdef KVQ4_AVX512VNNI
  return "avx512vnni";
#else
  return "scalar";
#endif
}

// y [M, N] = x [M, K] @ W^T. dtype 0: x and y fp32, 1: bf16.
static void linear_impl(const void* x, int dtype, int m, int k, int n, const Weight& w, void* y,
                        int nthreads) {
  thread_local QuantRows qr;
  thread_local std::vector<float> row, out;
  quantize_rows(x, dtype, m, k, w.kp, qr, row);
  out.resize((size_t)m * n);
  gemm(w, n, qr, 0, m, out.data(), n, nthreads);
  store_rows(out.data(), m, n, y, dtype);
}

void kvq4_linear(const void* x, int dtype, int m, int k, int n, const uint8_t* qw,
                 const uint16_t* sc, const int8_t* zp, int kp, int g, void* y, int nthreads) {
  linear_impl(x, dtype, m, k, n, Weight{4, qw, sc, zp, nullptr, kp, g}, y, nthreads);
}

void kvq8_linear(const void* x, int dtype, int m, int k, int n, const uint8_t* qw, const float* rs,
                 int kp, void* y, int nthreads) {
  linear_impl(x, dtype, m, k, n, Weight{8, qw, nullptr, nullptr, rs, kp, 32}, y, nthreads);
}

// Routed experts: y [M, D] = sum_j rw[m, j] * down_e(silu(gate_e(x_m)) * up_e(x_m)), e = ids[m, j].
// gate_up stack: E x (N = 2I, K = D) (gate rows first), down stack: E x (N = D, K = I). Each
// selected expert's weights are read once for all the tokens routed to it (in chunks of 8 that
// reuse each tile while it is in cache). Ids outside [0, E) contribute nothing.
static void moe_impl(const void* x, int dtype, int m, int d_model, const int64_t* ids,
                     const float* rw, int topk, int n_exp, int inter, const Weight& gu,
                     const Weight& dn, void* y, int nthreads) {
  thread_local QuantRows qx, qchunk, qact;
  thread_local std::vector<float> row, h, act, o, acc;
  thread_local std::vector<int> count, start, order, fill;
  const int gu_kp = gu.kp, dn_kp = dn.kp;
  quantize_rows(x, dtype, m, d_model, gu_kp, qx, row);
  const int n_gu = 2 * inter;
  // Counting sort of the (token, slot) pairs by expert.
  count.assign(n_exp + 1, 0);
  for (int i = 0; i < m * topk; i++)
    if (ids[i] >= 0 && ids[i] < n_exp) count[ids[i]]++;
  start.assign(n_exp + 1, 0);
  for (int e = 0; e < n_exp; e++) start[e + 1] = start[e] + count[e];
  order.assign(start[n_exp], 0);
  fill.assign(start.begin(), start.end() - 1);
  for (int i = 0; i < m * topk; i++)
    if (ids[i] >= 0 && ids[i] < n_exp) order[fill[ids[i]]++] = i;
  acc.assign((size_t)m * d_model, 0.f);
  int most = 0;
  for (int e = 0; e < n_exp; e++) most = count[e] > most ? count[e] : most;
  h.resize((size_t)most * n_gu);
  act.resize((size_t)most * inter);
  o.resize((size_t)most * d_model);
  qchunk.resize(most, gu_kp);
  qact.resize(most, dn_kp);
  const int nbx = gu_kp / 32, nba = dn_kp / 32;
  for (int e = 0; e < n_exp; e++) {
    const int p0 = start[e], mb = count[e];
    if (mb == 0) continue;
    // the heads of this expert's down weight and of the next selected expert's gate_up, so
    // their streams start at full speed (the in-stream prefetch covers the rest)
    prefetch_head(dn.expert(e, d_model).qw);
    for (int e2 = e + 1; e2 < n_exp; e2++)
      if (count[e2]) {
        prefetch_head(gu.expert(e2, n_gu).qw);
        break;
      }
    for (int c = 0; c < mb; c++) {  // gather the expert's quantized tokens
      const int tok = order[p0 + c] / topk;
      std::memcpy(qchunk.q.data() + (size_t)c * gu_kp, qx.q.data() + (size_t)tok * gu_kp, gu_kp);
      std::memcpy(qchunk.d.data() + (size_t)c * nbx, qx.d.data() + (size_t)tok * nbx, nbx * 4);
      std::memcpy(qchunk.s.data() + (size_t)c * nbx, qx.s.data() + (size_t)tok * nbx, nbx * 4);
    }
    gemm(gu.expert(e, n_gu), n_gu, qchunk, 0, mb, h.data(), n_gu, nthreads);
    for (int c = 0; c < mb; c++) {
      float* a = act.data() + (size_t)c * inter;
      const float* hc = h.data() + (size_t)c * n_gu;
      for (int i = 0; i < inter; i++) a[i] = hc[i] / (1.f + std::exp(-hc[i])) * hc[inter + i];
      quantize_row(a, inter, dn_kp, qact.q.data() + (size_t)c * dn_kp, qact.d.data() + (size_t)c * nba,
                   qact.s.data() + (size_t)c * nba);
    }
    gemm(dn.expert(e, d_model), d_model, qact, 0, mb, o.data(), d_model, nthreads);
    for (int c = 0; c < mb; c++) {
      const int pair = order[p0 + c], tok = pair / topk;
      const float wgt = rw[pair];
      float* dst = acc.data() + (size_t)tok * d_model;
      const float* src = o.data() + (size_t)c * d_model;
      for (int i = 0; i < d_model; i++) dst[i] += wgt * src[i];
    }
  }
  store_rows(acc.data(), m, d_model, y, dtype);
}

void kvq4_moe(const void* x, int dtype, int m, int d_model, const int64_t* ids, const float* rw,
              int topk, int n_exp, int inter, const uint8_t* gu_qw, const uint16_t* gu_sc,
              const int8_t* gu_zp, int gu_kp, int gu_g, const uint8_t* dn_qw,
              const uint16_t* dn_sc, const int8_t* dn_zp, int dn_kp, int dn_g, void* y,
              int nthreads) {
  moe_impl(x, dtype, m, d_model, ids, rw, topk, n_exp, inter,
           Weight{4, gu_qw, gu_sc, gu_zp, nullptr, gu_kp, gu_g},
           Weight{4, dn_qw, dn_sc, dn_zp, nullptr, dn_kp, dn_g}, y, nthreads);
}

void kvq8_moe(const void* x, int dtype, int m, int d_model, const int64_t* ids, const float* rw,
              int topk, int n_exp, int inter, const uint8_t* gu_qw, const float* gu_rs, int gu_kp,
              const uint8_t* dn_qw, const float* dn_rs, int dn_kp, void* y, int nthreads) {
  moe_impl(x, dtype, m, d_model, ids, rw, topk, n_exp, inter,
           Weight{8, gu_qw, nullptr, nullptr, gu_rs, gu_kp, 32},
           Weight{8, dn_qw, nullptr, nullptr, dn_rs, dn_kp, 32}, y, nthreads);
}

}  // extern "C"

// Fused token sampling on the CPU: temperature -> top-k -> top-p -> one draw per row, without
// sorting the vocabulary. Semantics (ties, greedy, errors, the seeded draw) are the reference's:
// python/fusedlm/reference/sampling.py.
//
// Per row (one task per row, rows in parallel):
//   1. x = logits / T (float32, as the reference), row max, and the value checks;
//   2. top-k: the k-th largest value `kth` (counted with multiplicity) from a size-k min-heap; a
//      16-wide compare against the heap's minimum skips almost every element;
//   3. top-p over the survivors (x >= kth), two ways to find the cut without a full sort:
//      - few survivors (top-k on): collect them and sort only those;
//      - many: e = exp(x - max) and a histogram of the mass over 2048 value buckets; the bucket
//        where the mass counted from the top reaches p * Z is the only one whose tokens are
//        collected and sorted.
//      The kept set is then { x > cut_value } U { x == cut_value and index >= cut_index }: the
//      ranking is (value desc, index desc), the reference's (= transformers') tie order;
//   4. draw: u from SplitMix64(seed + (row + 1) * GOLDEN), then inverse CDF in index order over
//      the kept tokens (float64 running sum), as the reference does.
// The AVX-512 paths (scale/max, exp/sum) sit next to scalar twins that compute the same values.
#include "cpu/ops.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <climits>
#include <cstring>
#include <limits>
#include <queue>
#include <vector>

#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/threading.h"

#define FUSEDLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

namespace fusedlm::cpu {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr int64_t kFewSurvivors = 2048;  // top-k survivors sorted directly up to this count
constexpr int kBuckets = 2048;           // histogram buckets for the top-p cut
constexpr float kBucketRange = 32.0f;    // buckets span [max - 32, max]; lower values share bucket 0
constexpr float kExpFloor = -87.0f;      // exp(x) for x below is taken as 0 (float32 underflow)

enum Status : int32_t { kOk = 0, kNaN = 1, kPosInf = 2, kNoFinite = 3, kOverflow = 4 };

uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The row's uniform in [0, 1): the top 53 bits of the hash (reference: row_uniforms).
double row_uniform(uint64_t seed, int64_t row) {
  return static_cast<double>(splitmix64(seed + static_cast<uint64_t>(row + 1) * kGolden) >> 11) * 0x1.0p-53;
}

// ---- exp(x) for x <= 0 (Cephes' expf polynomial), scalar and AVX-512 twins ----------------
// n = round(x log2 e); r = x - n ln2 (in two parts); exp(x) = 2^n (1 + r + r^2 P(r)).
// Both compute the same fma sequence, so they return the same bits. x < kExpFloor gives 0.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

inline float exp_scalar(float x) {
  if (!(x >= kExpFloor)) return 0.0f;
  const float n = std::nearbyint(x * kLog2e);
  float r = std::fma(n, -kLn2Hi, x);
  r = std::fma(n, -kLn2Lo, r);
  float p = std::fma(kP0, r, kP1);
  p = std::fma(p, r, kP2);
  p = std::fma(p, r, kP3);
  p = std::fma(p, r, kP4);
  p = std::fma(p, r, kP5);
  p = std::fma(p, r * r, r) + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

FUSEDLM_AVX512 inline __m512 exp_avx512(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpFloor), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpFloor));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Hi), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Lo), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kP0), r, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(live, p, _mm512_castsi512_ps(bits));
}

// ---- pass 1: x = src / t, max, checks ------------------------------------------------------
struct ScanResult {
  float max = kNegInf;
  bool nan = false, pos_inf = false;
};

ScanResult scale_scalar(const float* src, int64_t n, float t, float* x) {
  ScanResult s;
  for (int64_t i = 0; i < n; ++i) {
    const float v = src[i];
    s.nan |= v != v;
    s.pos_inf |= v == std::numeric_limits<float>::infinity();
    x[i] = v / t;
    s.max = std::max(s.max, x[i]);
  }
  return s;
}

FUSEDLM_AVX512 ScanResult scale_avx512(const float* src, int64_t n, float t, float* x) {
  const __m512 vt = _mm512_set1_ps(t), inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 vmax = _mm512_set1_ps(kNegInf);
  __mmask16 nan = 0, pos_inf = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(src + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    pos_inf |= _mm512_cmp_ps_mask(v, inf, _CMP_EQ_OQ);
    const __m512 q = _mm512_div_ps(v, vt);
    _mm512_storeu_ps(x + i, q);
    vmax = _mm512_max_ps(vmax, q);
  }
  ScanResult tail = scale_scalar(src + i, n - i, t, x + i);
  tail.max = std::max(tail.max, _mm512_reduce_max_ps(vmax));
  tail.nan |= nan != 0;
  tail.pos_inf |= pos_inf != 0;
  return tail;
}

// ---- exp pass: e = exp(x - max) where x >= lo (else 0); returns the float64 sum ----------
double exp_scalar_pass(const float* x, int64_t n, float max, float lo, float* e) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    e[i] = x[i] >= lo ? exp_scalar(x[i] - max) : 0.0f;
    sum += e[i];
  }
  return sum;
}

FUSEDLM_AVX512 double exp_avx512_pass(const float* x, int64_t n, float max, float lo, float* e) {
  const __m512 vmax = _mm512_set1_ps(max), vlo = _mm512_set1_ps(lo);
  double sum = 0.0;
  int64_t i = 0;
  while (i + 16 <= n) {
    __m512 block = _mm512_setzero_ps();  // float partial sums over <= 1024 elements, then float64
    for (int64_t end = std::min(n - n % 16, i + 1024); i < end; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      const __mmask16 in = _mm512_cmp_ps_mask(v, vlo, _CMP_GE_OQ);
      const __m512 ev = _mm512_maskz_mov_ps(in, exp_avx512(_mm512_sub_ps(v, vmax)));
      _mm512_storeu_ps(e + i, ev);
      block = _mm512_add_ps(block, ev);
    }
    sum += _mm512_reduce_add_ps(block);
  }
  return sum + exp_scalar_pass(x + i, n - i, max, lo, e + i);
}

using MinHeap = std::priority_queue<float, std::vector<float>, std::greater<float>>;

inline void offer(MinHeap& heap, float v) {
  if (v > heap.top()) {
    heap.pop();
    heap.push(v);
  }
}

// Offers x[start, n) to the heap, 16 at a time: only elements above the heap's minimum go in.
// Returns where it stopped (the scalar loop finishes the tail).
FUSEDLM_AVX512 int64_t offer_avx512(const float* x, int64_t start, int64_t n, MinHeap& heap) {
  int64_t j = start;
  for (; j + 16 <= n; j += 16) {
    __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), _mm512_set1_ps(heap.top()), _CMP_GT_OQ);
    while (m) {
      offer(heap, x[j + __builtin_ctz(m)]);
      m &= m - 1;
    }
  }
  return j;
}

// k-th largest value of x[0, n) (with multiplicity), 0 < k < n, from a size-k min-heap.
float kth_largest(const float* x, int64_t n, int64_t k, bool avx512) {
  MinHeap heap(x, x + k);
  int64_t i = avx512 ? offer_avx512(x, k, n, heap) : k;
  for (; i < n; ++i) offer(heap, x[i]);
  return heap.top();
}

// A survivor for the top-p cut: value, index, mass.
struct Token {
  float x;
  int64_t index;
  double e;
};

// Walks `tokens` in ranking order (value desc, index desc), starting with `before` mass ranked
// above them, and keeps each token whose mass before it is < target. Sets the cut to the last
// kept token, adds the kept mass to `kept_mass`. Returns false if every token was kept.
bool cut_in(std::vector<Token>& tokens, double before, double target, float& cut_value, int64_t& cut_index,
            double& kept_mass) {
  std::sort(tokens.begin(), tokens.end(),
            [](const Token& a, const Token& b) { return a.x != b.x ? a.x > b.x : a.index > b.index; });
  for (const Token& tok : tokens) {
    if (!(before < target)) return true;
    cut_value = tok.x;
    cut_index = tok.index;
    before += tok.e;
    kept_mass += tok.e;
  }
  return false;
}

// Kept set { x > cut_value } U { x == cut_value, index >= cut_index }.
inline bool kept(float v, int64_t i, float cut_value, int64_t cut_index) {
  return v > cut_value || (v == cut_value && i >= cut_index);
}

// ---- the draw over a dense row: first kept token (index order) whose running mass exceeds target
// Scalar walk from `begin`; acc / last carry the running sum and the last kept token seen.
int64_t draw_scalar(const float* x, const float* e, int64_t begin, int64_t n, float cut_value, int64_t cut_index,
                    double target, double& acc, int64_t& last) {
  for (int64_t i = begin; i < n; ++i) {
    if (e[i] <= 0.0f || !kept(x[i], i, cut_value, cut_index)) continue;
    last = i;
    acc += e[i];
    if (acc > target) return i;
  }
  return -1;
}

// Skips whole blocks of 16 whose kept mass cannot reach target; returns where the scalar walk
// must start (the block that may cross). Block sums are float; the crossing block is walked in
// float64 by draw_scalar, which continues past it if rounding made the block fall short.
FUSEDLM_AVX512 int64_t skip_blocks_avx512(const float* x, const float* e, int64_t n, float cut_value,
                                          int64_t cut_index, double target, double& acc, int64_t& last) {
  const __m512 vcut = _mm512_set1_ps(cut_value);
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    __mmask16 keep = _mm512_cmp_ps_mask(v, vcut, _CMP_GT_OQ);
    const __mmask16 tie = _mm512_cmp_ps_mask(v, vcut, _CMP_EQ_OQ);
    if (tie) {  // ties of the cut value: kept from cut_index on
      const __m512i index = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(std::min<int64_t>(i, INT32_MAX - 16))));
      keep |= tie & _mm512_cmp_epi32_mask(index, _mm512_set1_epi32(static_cast<int32_t>(std::min<int64_t>(cut_index, INT32_MAX))), _MM_CMPINT_NLT);
    }
    const __m512 ev = _mm512_maskz_mov_ps(keep, _mm512_loadu_ps(e + i));
    const double block = _mm512_reduce_add_ps(ev);
    if (acc + block > target) return i;
    const __mmask16 live = keep & _mm512_cmp_ps_mask(ev, _mm512_setzero_ps(), _CMP_GT_OQ);
    if (live) last = i + 31 - __builtin_clz(live);
    acc += block;
  }
  return i;
}

// ---- value buckets for the top-p histogram --------------------------------------------------
// bucket(v) = clamp(floor((v - lo) * inv_width), 0, kBuckets - 1) for survivors (v >= kth, finite),
// kBuckets otherwise. The AVX-512 twin computes the same float expression, so the same ids.
inline uint16_t bucket_of(float v, float kth, float lo, float inv_width) {
  if (!(v >= kth) || v == kNegInf) return kBuckets;
  if (v < lo) return 0;
  return static_cast<uint16_t>(std::min(kBuckets - 1, static_cast<int>((v - lo) * inv_width)));
}

void bucket_scalar(const float* x, int64_t n, float kth, float lo, float inv_width, uint16_t* ids) {
  for (int64_t i = 0; i < n; ++i) ids[i] = bucket_of(x[i], kth, lo, inv_width);
}

FUSEDLM_AVX512 void bucket_avx512(const float* x, int64_t n, float kth, float lo, float inv_width, uint16_t* ids) {
  const __m512 vkth = _mm512_set1_ps(kth), vlo = _mm512_set1_ps(lo), vinv = _mm512_set1_ps(inv_width);
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  const __m512i top = _mm512_set1_epi32(kBuckets - 1), none = _mm512_set1_epi32(kBuckets);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    // (v - lo) * inv_width >= 0 where v >= lo; truncation = floor there
    __m512i b = _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_sub_ps(v, vlo), vinv));
    b = _mm512_min_epi32(b, top);
    b = _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(v, vlo, _CMP_LT_OQ), _mm512_setzero_si512());
    const __mmask16 survivor = _mm512_cmp_ps_mask(v, vkth, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, ninf, _CMP_NEQ_OQ);
    b = _mm512_mask_mov_epi32(none, survivor, b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ids + i), _mm512_cvtepi32_epi16(b));
  }
  bucket_scalar(x + i, n - i, kth, lo, inv_width, ids + i);
}

void collect_scalar(const uint16_t* ids, int64_t begin, int64_t end, int b, const float* x, const float* e,
                    std::vector<Token>& out) {
  for (int64_t i = begin; i < end; ++i)
    if (ids[i] == b) out.push_back({x[i], i, e[i]});
}

FUSEDLM_AVX512 void collect_avx512(const uint16_t* ids, int64_t n, int b, const float* x, const float* e,
                                   std::vector<Token>& out) {
  const __m512i vb = _mm512_set1_epi16(static_cast<int16_t>(b));
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    uint32_t m = _mm512_cmpeq_epi16_mask(_mm512_loadu_si512(ids + i), vb);
    while (m) {
      const int64_t j = i + __builtin_ctz(m);
      out.push_back({x[j], j, e[j]});
      m &= m - 1;
    }
  }
  collect_scalar(ids, i, n, b, x, e, out);
}

struct RowParams {
  float temperature;
  int64_t top_k;
  double top_p;
};

struct Scratch {
  std::vector<float> x, e;
  std::vector<Token> tokens;
  std::vector<double> mass;
  std::vector<uint16_t> bucket_ids;
};

int32_t process_row(const void* row_ptr, DType dtype, int64_t V, const RowParams& prm, uint64_t seed, int64_t row,
                    int64_t* token_out, float* filter_out, Scratch& s) {
  const bool avx512 = use_avx512();
  s.x.resize(V);
  float* x = s.x.data();
  const float* src;
  if (dtype == DType::F32) {
    src = static_cast<const float*>(row_ptr);
  } else {
    for (int64_t i = 0; i < V; ++i) x[i] = load_as_float(row_ptr, dtype, i);
    src = x;
  }
  const bool greedy = prm.temperature == 0.0f;
  const ScanResult scan = avx512 ? scale_avx512(src, V, greedy ? 1.0f : prm.temperature, x)
                                 : scale_scalar(src, V, greedy ? 1.0f : prm.temperature, x);
  if (scan.nan) return kNaN;
  if (scan.pos_inf) return kPosInf;
  if (scan.max == kNegInf) return kNoFinite;
  if (scan.max == std::numeric_limits<float>::infinity()) return kOverflow;
  const float max = scan.max;

  if (greedy) {  // first index of the maximum; top_k / top_p ignored
    const int64_t arg = std::find(x, x + V, max) - x;
    if (token_out) *token_out = arg;
    if (filter_out) {
      std::fill(filter_out, filter_out + V, kNegInf);
      filter_out[arg] = max;
    }
    return kOk;
  }

  // top-k threshold (-inf when off)
  const bool k_on = prm.top_k > 0 && prm.top_k < V;
  const float kth = k_on ? kth_largest(x, V, prm.top_k, avx512) : kNegInf;

  // top-p cut; with p off the cut is kth itself (every survivor kept)
  float cut_value = kth;
  int64_t cut_index = 0;
  double kept_mass = 0.0;   // unnormalised mass of the kept set
  bool dense = true;        // e[] holds exp(x - max) for the survivors
  std::vector<Token>& few = s.tokens;
  few.clear();
  if (k_on) {
    int64_t survivors = 0;
    for (int64_t i = 0; i < V; ++i) survivors += x[i] >= kth;
    if (survivors <= kFewSurvivors) {  // collect the survivors in index order
      dense = false;
      for (int64_t i = 0; i < V; ++i)
        if (x[i] >= kth && x[i] > kNegInf) few.push_back({x[i], i, std::exp(static_cast<double>(x[i]) - max)});
    }
  }
  if (!dense) {
    double total = 0.0;
    for (const Token& tok : few) total += tok.e;
    if (prm.top_p < 1.0) {
      std::vector<Token> ranked(few);
      if (!cut_in(ranked, 0.0, prm.top_p * total, cut_value, cut_index, kept_mass)) cut_value = kth, cut_index = 0;
    } else {
      kept_mass = total;
    }
  } else if (token_out || prm.top_p < 1.0) {
    s.e.resize(V);
    float* e = s.e.data();
    const double total = avx512 ? exp_avx512_pass(x, V, max, kth, e) : exp_scalar_pass(x, V, max, kth, e);
    kept_mass = total;
    if (prm.top_p < 1.0) {
      // mass histogram over value buckets (bucket_ids: 0 .. kBuckets-1, kBuckets for non-survivors)
      const float lo = max - kBucketRange, inv_width = kBuckets / kBucketRange;
      s.bucket_ids.resize(V);
      uint16_t* ids = s.bucket_ids.data();
      if (avx512) bucket_avx512(x, V, kth, lo, inv_width, ids);
      else bucket_scalar(x, V, kth, lo, inv_width, ids);
      s.mass.assign(kBuckets + 1, 0.0);
      double* mass = s.mass.data();
      for (int64_t i = 0; i < V; ++i) mass[ids[i]] += e[i];
      const double target = prm.top_p * total;
      double before = 0.0;
      int b = kBuckets - 1;
      while (b > 0 && before + mass[b] < target) before += mass[b--];
      // every bucket above b is kept whole; cut inside bucket b
      if (avx512) collect_avx512(ids, V, b, x, e, few);
      else collect_scalar(ids, 0, V, b, x, e, few);
      kept_mass = before;
      if (!cut_in(few, before, target, cut_value, cut_index, kept_mass)) {
        // rounding left the whole bucket kept: the cut is its lowest token (or keep everything)
        if (b == 0) cut_value = kth, cut_index = 0, kept_mass = total;
      }
      few.clear();
    }
  }

  if (filter_out) {
    for (int64_t i = 0; i < V; ++i) filter_out[i] = kept(x[i], i, cut_value, cut_index) ? x[i] : kNegInf;
  }
  if (token_out) {
    const double target = row_uniform(seed, row) * kept_mass;
    double acc = 0.0;
    int64_t last = -1;
    if (!dense) {
      for (const Token& tok : few) {
        if (!kept(tok.x, tok.index, cut_value, cut_index) || tok.e <= 0.0) continue;
        last = tok.index;
        acc += tok.e;
        if (acc > target) break;
      }
    } else {
      const int64_t begin = avx512 ? skip_blocks_avx512(x, s.e.data(), V, cut_value, cut_index, target, acc, last) : 0;
      draw_scalar(x, s.e.data(), begin, V, cut_value, cut_index, target, acc, last);
    }
    *token_out = last >= 0 ? last : std::find(x, x + V, max) - x;
  }
  return kOk;
}

}  // namespace

void sampling_run(const void* logits, DType dtype, int64_t B, int64_t V, int64_t stride_row, const float* temperature,
                  const int64_t* top_k, const double* top_p, uint64_t seed, int64_t* tokens, float* filtered,
                  int32_t* status, int num_threads) {
  const int64_t elem = dtype == DType::F32 ? 4 : 2;
  parallel_for(B, num_threads, [&](int64_t row) {
    thread_local Scratch scratch;
    const void* row_ptr = static_cast<const char*>(logits) + row * stride_row * elem;
    status[row] = process_row(row_ptr, dtype, V, {temperature[row], top_k[row], top_p[row]}, seed, row,
                              tokens ? tokens + row : nullptr, filtered ? filtered + row * V : nullptr, scratch);
  });
}

}  // namespace fusedlm::cpu

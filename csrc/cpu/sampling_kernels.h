// The passes of the sampler over one row, written once over common/vec.h (sampling.cpp includes
// this file once per ISA level through common/for_each_isa.h, hence no include guard).
//
// Per row (rows in parallel, one task each):
//   1. scan, one read of the logits: x = logits / T, its max, the NaN / +inf checks, and with
//      top-k on the k-th largest value kth from a size-k heap: a W-wide compare against the heap's
//      minimum skips almost every element, and the few that pass are remembered as candidates
//      (every token with x >= kth is among them, in index order);
//   2. top-k with at most kFewSurvivors survivors (x >= kth): the candidates are the whole row from
//      here on (float64 masses, top-p by sorting them, the draw among them). x is never stored;
//   3. otherwise the dense path over the tokens with x >= lower (kth, or -inf with top-k off): one
//      pass stores e = exp(x - max), sums Z and, for top-p, stores each token's value bucket
//      (kBuckets over [max - 32, max]); a scalar loop adds the masses into the bucket histogram; the
//      bucket where the mass counted from the top reaches p Z is the only one whose tokens are
//      listed (a compare per element) and ranked, and the cut falls at the first of them whose
//      mass ranked before it reaches p Z. The kept set is { x > cut.value } U { x == cut.value and
//      index >= cut.index }: the ranking is (value desc, index desc), the reference's tie order;
//   4. the draw: u from SplitMix64(seed + (row + 1) * GOLDEN), then the inverse CDF in index order
//      over the kept tokens (float64 running sum), skipping whole blocks of 4W tokens whose kept
//      mass cannot reach u * kept_mass.

constexpr int64_t kFewSurvivors = 2048;  // top-k survivors handled as a list up to this count
constexpr int kMantissaBits = 5;         // top-p histogram: bucket_ids
constexpr int kBucketBase = (127 - 46) << kMantissaBits;  // the id of mass 2^-46
constexpr int kBuckets = (46 << kMantissaBits) + 1;       // ids 0 .. 46 * 32 (mass 1: the max)

// ---- pass 1 -------------------------------------------------------------------------------
struct Scan {
  float max = kNegInf;
  bool nan = false;
};

// x = src / t over the row (stored to x_out with Store), its max and whether it holds NaN; with
// WithTopK, the values >= its threshold are offered to topk. Blocks of 4W: four max accumulators
// hide the latency, and one test per block finds the (rare) values to offer.
template <DType D, bool Divide, bool Store, bool WithTopK>
Scan scan_row(const void* src, int64_t V, float t, float* x_out, TopK* topk) {
  const Vec vt(t);
  Vec threshold(WithTopK ? topk->threshold : kPosInf);
  Mask nan = Mask::first(0);
  auto load_x = [&](int64_t i, auto c) {
    Vec v = load_as<D>(src, i, c);
    nan = nan | (v != v);
    if constexpr (Divide) v = v / vt;
    if constexpr (Store) store(v, x_out + i, c);
    return v;
  };
  auto offer = [&](Vec v, int64_t i, Mask in) {
    float lane[W];
    v.store(lane);
    for (unsigned bits = in.bits(); bits; bits &= bits - 1) {
      const int j = __builtin_ctz(bits);
      if (lane[j] >= topk->threshold) topk->add(lane[j], i + j);
    }
  };
  Vec m0(kNegInf), m1(kNegInf), m2(kNegInf), m3(kNegInf);
  int64_t i = 0;
  for (; i + 4 * W <= V; i += 4 * W) {
    const Vec v0 = load_x(i, Full{}), v1 = load_x(i + W, Full{}), v2 = load_x(i + 2 * W, Full{}),
              v3 = load_x(i + 3 * W, Full{});
    m0 = max(m0, v0), m1 = max(m1, v1), m2 = max(m2, v2), m3 = max(m3, v3);
    if constexpr (WithTopK) {
      const Mask a0 = v0 >= threshold, a1 = v1 >= threshold, a2 = v2 >= threshold, a3 = v3 >= threshold;
      if ((a0 | a1 | a2 | a3).any()) {
        offer(v0, i, a0), offer(v1, i + W, a1), offer(v2, i + 2 * W, a2), offer(v3, i + 3 * W, a3);
        threshold = Vec(topk->threshold);
      }
    }
  }
  for_chunks(V - i, [&](int64_t j, auto c) {
    const Vec v = load_x(i + j, c);
    m0 = max(m0, select(live(c), v, Vec(kNegInf)));
    if constexpr (WithTopK) offer(v, i + j, (v >= threshold) & live(c));
  });
  Scan s;
  s.max = max(max(m0, m1), max(m2, m3)).reduce_max();
  s.nan = nan.any();
  return s;
}

template <DType D>
Scan scan(const void* src, int64_t V, float t, float* x_out, TopK* topk) {
  const bool divide = t != 1.0f;
  if (topk) return divide ? scan_row<D, true, false, true>(src, V, t, nullptr, topk)
                          : scan_row<D, false, false, true>(src, V, t, nullptr, topk);
  if (x_out) return divide ? scan_row<D, true, true, false>(src, V, t, x_out, nullptr)
                           : scan_row<D, false, true, false>(src, V, t, x_out, nullptr);
  return divide ? scan_row<D, true, false, false>(src, V, t, nullptr, nullptr)
                : scan_row<D, false, false, false>(src, V, t, nullptr, nullptr);
}

// Whether src (as float) holds +inf (the error path of a row whose max is +inf).
template <DType D>
bool has_pos_inf(const void* src, int64_t V) {
  Mask found = Mask::first(0);
  for_chunks(V, [&](int64_t i, auto c) { found = found | ((load_as<D>(src, i, c) == Vec(kPosInf)) & live(c)); });
  return found.any();
}

// The first index whose value (src as float) equals `value`, which the row holds.
template <DType D>
int64_t first_equal(const void* src, int64_t V, float value) {
  int64_t found = -1;
  for_chunks(V, [&](int64_t i, auto c) {
    const unsigned bits = ((load_as<D>(src, i, c) == Vec(value)) & live(c)).bits();
    if (bits && found < 0) found = i + __builtin_ctz(bits);
  });
  return found < 0 ? 0 : found;
}

// ---- the dense path -----------------------------------------------------------------------

// Kept lanes of x[i, i + W): x > cut.value, or x == cut.value at an index >= cut.index.
inline Mask kept_lanes(Vec v, int64_t i, const Cut& cut) {
  Mask keep = v > Vec(cut.value);
  const Mask tie = v == Vec(cut.value);
  if (tie.any()) {  // ties of the cut value (rare): kept from cut.index on; rows are < 2^31 long
    const IVec index = IVec::iota() + IVec(static_cast<int32_t>(i));
    keep = keep | (tie & (index > IVec(static_cast<int32_t>(std::min<int64_t>(cut.index, INT32_MAX)) - 1)));
  }
  return keep;
}

// The buckets of the top-p mass histogram, by the bits of the mass e = exp(x - max) in (0, 1]: its
// exponent and kMantissaBits of its mantissa, so a bucket spans a factor 2^(1/32) of mass (0.022 in
// x) and the order of buckets is the order of values. Masses below 2^-46 (x more than 32 below the
// max, with masses < 1e-14 of the top token's) and zero masses (hidden tokens) share bucket 0.
inline IVec bucket_ids(Vec e) {
  return min(max(shr<23 - kMantissaBits>(e.as_int()) - IVec(kBucketBase), IVec(0)), IVec(kBuckets - 1));
}

// e[i] = exp(x[i] - max) where x[i] >= lower, else 0; with ids, also each token's bucket. Returns
// Z = sum(e): float sums over blocks of 1024 tokens, then float64.
template <bool WithIds>
double exp_pass(const float* x, int64_t V, float max, float lower, float* e, uint16_t* ids) {
  const Vec vmax(max), vlower(lower), log2e(kLog2e);
  double z = 0.0;
  for (int64_t block = 0; block < V; block += 1024) {
    Vec zb = Vec::zero();
    for_chunks(std::min<int64_t>(1024, V - block), [&](int64_t j, auto c) {
      const int64_t i = block + j;
      const Vec v = load(x + i, c);
      const Vec ev = select((v >= vlower) & live(c), exp2_nonpositive((v - vmax) * log2e), Vec::zero());
      store(ev, e + i, c);
      zb = zb + ev;
      if constexpr (WithIds) store_u16(bucket_ids(ev), ids + i, c);
    });
    z += zb.reduce_add();
  }
  return z;
}

// The top-p cut of a row whose e, bucket ids and Z exp_pass computed: the mass histogram over the
// buckets (one scalar add per token, no branch), the bucket where the mass counted from the top
// reaches p Z, and the ranking of that bucket's tokens only.
Cut histogram_cut(const float* x, const float* e, const uint16_t* ids, int64_t V, float lower, double z, double top_p,
                  Scratch& s) {
  // Two histograms (even and odd tokens) halve the chains through one bucket's running sum.
  s.mass.assign(2 * kBuckets, 0.0);
  double *mass = s.mass.data(), *odd = mass + kBuckets;
  int64_t i = 0;
  for (; i + 2 <= V; i += 2) {
    mass[ids[i]] += e[i];
    odd[ids[i + 1]] += e[i + 1];
  }
  if (i < V) mass[ids[i]] += e[i];
  for (int b = 0; b < kBuckets; ++b) mass[b] += odd[b];
  const double target = top_p * z;
  double before = 0.0;
  int b = kBuckets - 1;
  while (b > 0 && before + mass[b] < target) before += mass[b--];
  std::vector<Token>& tokens = s.tokens;
  tokens.clear();
  for_chunks(V, [&](int64_t i, auto c) {  // bucket 0 also holds the hidden tokens (x < lower): not listed
    const Mask in = (load_u16(ids + i, c) == IVec(b)) & (load(x + i, c) >= Vec(lower)) & live(c);
    for (unsigned bits = in.bits(); bits; bits &= bits - 1) {
      const int64_t j = i + __builtin_ctz(bits);
      tokens.push_back({x[j], j, e[j]});
    }
  });
  Cut cut;
  cut_in(tokens, before, target, cut);
  return cut;
}

// The first kept token, in index order, whose running kept mass exceeds target; -1 if none does
// (float64 rounding), and then `last` is the last kept token with mass.
int64_t draw_dense(const float* x, const float* e, int64_t V, const Cut& cut, double target, int64_t& last) {
  constexpr int64_t kBlock = 4 * W;
  double acc = 0.0;
  int64_t i = 0;
  for (; i + kBlock <= V; i += kBlock) {  // skip whole blocks; block sums are float
    Vec sum = Vec::zero();
    unsigned live_lanes[4];
    for (int u = 0; u < 4; ++u) {
      const Vec ev = select(kept_lanes(Vec::load(x + i + u * W), i + u * W, cut), Vec::load(e + i + u * W), Vec::zero());
      live_lanes[u] = (ev > Vec::zero()).bits();
      sum = sum + ev;
    }
    const double block = sum.reduce_add();
    if (acc + block > target) break;  // the crossing block: walked below in float64
    for (int u = 3; u >= 0; --u)
      if (live_lanes[u]) {
        last = i + u * W + 31 - __builtin_clz(live_lanes[u]);
        break;
      }
    acc += block;
  }
  for (; i < V; ++i) {  // the crossing block, and on if rounding made it fall short
    if (e[i] <= 0.0f || !kept(x[i], i, cut)) continue;
    last = i;
    acc += e[i];
    if (acc > target) return i;
  }
  return -1;
}

void filter_dense(const float* x, int64_t V, const Cut& cut, float* out) {
  for_chunks(V, [&](int64_t i, auto c) {
    const Vec v = load(x + i, c);
    store(select(kept_lanes(v, i, cut), v, Vec(kNegInf)), out + i, c);
  });
}

// ---- one row ------------------------------------------------------------------------------
template <DType D>
int32_t process_row(const void* src, int64_t V, const RowParams& prm, uint64_t seed, int64_t row, int64_t* token_out,
                    float* filter_out, Scratch& s) {
  const bool greedy = prm.temperature == 0.0f;
  const float t = greedy ? 1.0f : prm.temperature;
  const bool k_on = !greedy && prm.top_k > 0 && prm.top_k < V;
  const bool p_on = !greedy && prm.top_p < 1.0;
  // x is stored when the dense path will read it and the logits are not x already
  const bool x_is_src = D == DType::F32 && t == 1.0f;
  auto stored_x = [&] {
    s.x.resize(V);
    return s.x.data();
  };
  if (k_on) s.topk.reset(prm.top_k);
  Scan sc = scan<D>(src, V, t, x_is_src || k_on || greedy ? nullptr : stored_x(), k_on ? &s.topk : nullptr);
  if (sc.nan) return kNaN;
  if (sc.max == kPosInf) return has_pos_inf<D>(src, V) ? kPositiveInf : kOverflow;
  if (sc.max == kNegInf) return kNoFinite;
  const float max = sc.max;

  if (greedy) {  // the first index of the maximum; top_k / top_p ignored
    const int64_t arg = first_equal<D>(src, V, max);
    if (token_out) *token_out = arg;
    if (filter_out) {
      std::fill(filter_out, filter_out + V, kNegInf);
      filter_out[arg] = max;
    }
    return kOk;
  }

  const float kth = k_on ? s.topk.tighten() : kNegInf;  // the survivors: candidates >= kth, in index order
  std::vector<Token>& candidates = s.topk.candidates;
  if (k_on && static_cast<int64_t>(candidates.size()) <= kFewSurvivors) {  // the survivors, in index order
    double total = 0.0;
    for (Token& tok : candidates) total += (tok.e = std::exp(static_cast<double>(tok.x) - max));
    Cut cut{kth, 0, total};
    if (p_on) {
      std::vector<Token> ranked(candidates);
      cut_in(ranked, 0.0, prm.top_p * total, cut);
    }
    if (filter_out) {
      std::fill(filter_out, filter_out + V, kNegInf);
      for (const Token& tok : candidates)
        if (kept(tok.x, tok.index, cut)) filter_out[tok.index] = tok.x;
    }
    if (token_out) {
      const double target = row_uniform(seed, row) * cut.kept_mass;
      double acc = 0.0;
      int64_t last = -1;
      for (const Token& tok : candidates) {
        if (!kept(tok.x, tok.index, cut) || tok.e <= 0.0) continue;
        last = tok.index;
        acc += tok.e;
        if (acc > target) break;
      }
      *token_out = last >= 0 ? last : candidates.front().index;  // the top survivor is always kept
    }
    return kOk;
  }

  // The dense path (top-k off, or too many ties of kth to list).
  const float lower = kth;
  if (!x_is_src && k_on) scan<D>(src, V, t, stored_x(), nullptr);  // x was not stored
  const float* x = x_is_src ? static_cast<const float*>(src) : s.x.data();
  Cut cut{lower, 0, 0.0};
  if (token_out || p_on) {
    s.e.resize(V);
    if (p_on) s.ids.resize(V);
    const double z = p_on ? exp_pass<true>(x, V, max, lower, s.e.data(), s.ids.data())
                          : exp_pass<false>(x, V, max, lower, s.e.data(), nullptr);
    cut.kept_mass = z;
    if (p_on) cut = histogram_cut(x, s.e.data(), s.ids.data(), V, lower, z, prm.top_p, s);
  }
  if (filter_out) filter_dense(x, V, cut, filter_out);
  if (token_out) {
    int64_t last = -1;
    const int64_t token = draw_dense(x, s.e.data(), V, cut, row_uniform(seed, row) * cut.kept_mass, last);
    *token_out = token >= 0 ? token : last >= 0 ? last : first_equal<DType::F32>(x, V, max);
  }
  return kOk;
}

void run(const SamplingArgs& a) {
  const int64_t V = a.logits.size(1), row_bytes = a.logits.stride(0) * dtype_size(a.logits.dtype);
  parallel_for(a.logits.size(0), a.num_threads, [&](int64_t row) {
    thread_local Scratch scratch;
    const void* src = static_cast<const char*>(a.logits.data) + row * row_bytes;
    const RowParams prm{a.temperature.ptr<const float>()[row], a.top_k.ptr<const int64_t>()[row],
                        a.top_p.ptr<const double>()[row]};
    int64_t* token = a.tokens ? a.tokens.ptr<int64_t>() + row : nullptr;
    float* filtered = a.filtered ? a.filtered.ptr<float>() + row * V : nullptr;
    int32_t status;
    switch (a.logits.dtype) {
      case DType::BF16: status = process_row<DType::BF16>(src, V, prm, a.seed, row, token, filtered, scratch); break;
      case DType::F16: status = process_row<DType::F16>(src, V, prm, a.seed, row, token, filtered, scratch); break;
      default: status = process_row<DType::F32>(src, V, prm, a.seed, row, token, filtered, scratch); break;
    }
    a.status.ptr<int32_t>()[row] = status;
  });
}

// This level's entry kernels, one row of the table in common/for_each_isa.h.
constexpr Kernels kernels{run};

// The row pass of the fused linear cross-entropy, written once over common/vec.h (linear_cross_entropy.cpp
// includes this file once per ISA level through common/for_each_isa.h, hence no include guard).
//
// Row c of a chunk of logits x (V entries, the LM head's product of the chunk's rows of h), with
// target t (or ignore_index):
//
//   pass 1: max m and its first index (the argmax)        one read
//   pass 2: s = sum_v exp(x_v - m), lse = m + log s         one read, an exp per entry
//   loss = lse - x_t
//   pass 3 (when scales are given): x_v <- scale_c (exp(x_v - lse) - [v == t])   one read + write
//
// so the row's gradient d(scale_c loss_c)/d logits replaces its logits in place, and the chunk's
// head GEMMs (dh = dlogits W, dW += dlogitsᵀ h) read it from there (ops/linear_cross_entropy.py).
// A row is V * 4 bytes (128 KiB for V = 32000 in float32): it stays in L2 across the three passes.

template <DType D>
void row(const LinearCrossEntropyArgs& p, int64_t c) {
  const int64_t V = p.logits.size(1);
  void* x = static_cast<char*>(p.logits.data) + c * p.logits.stride(0) * dtype_size(p.logits.dtype);
  const int64_t t = p.targets.ptr<const int64_t>()[c];
  const bool ignored = t == p.ignore_index;
  const float scale = p.scales ? p.scales.ptr<const float>()[c] : 0.0f;
  if (ignored) {
    p.loss.ptr<float>()[c] = 0.0f;
    p.lse.ptr<float>()[c] = 0.0f;
    p.argmax.ptr<int64_t>()[c] = -1;
    if (p.scales) for_chunks(V, [&](int64_t v, auto ch) { store_as<D>(x, v, Vec::zero(), ch); });
    return;
  }
  const Vec neg_inf(-std::numeric_limits<float>::infinity());

  // pass 1: per lane the largest value and the first index holding it
  Vec best = neg_inf;
  IVec best_at(0);
  Mask nan = Mask::first(0);
  for_chunks(V, [&](int64_t v, auto ch) {
    const Vec xv = select(live(ch), load_as<D>(x, v, ch), neg_inf);
    nan = nan | (xv != xv);
    const Mask higher = xv > best;
    best = select(higher, xv, best);
    best_at = select(higher, IVec::iota() + IVec(static_cast<int32_t>(v)), best_at);
  });
  const float m = best.reduce_max();
  float lanes[W];
  int32_t at[W];
  best.store(lanes);
  best_at.store(at);
  int64_t argmax = 0;
  for (int j = 0, first = static_cast<int>(V); j < W; ++j)
    if (lanes[j] == m && at[j] < first) first = at[j], argmax = first;
  if (nan.any() || !(m < std::numeric_limits<float>::infinity())) {  // NaN or +inf: the loss is NaN
    const float q = std::numeric_limits<float>::quiet_NaN();
    p.loss.ptr<float>()[c] = q;
    p.lse.ptr<float>()[c] = q;
    p.argmax.ptr<int64_t>()[c] = argmax;
    if (p.scales) for_chunks(V, [&](int64_t v, auto ch) { store_as<D>(x, v, Vec(q), ch); });
    return;
  }

  // pass 2: the sum of exp(x - m)
  Vec sum = Vec::zero();
  const Vec vm(m);
  for_chunks(V, [&](int64_t v, auto ch) {
    const Vec e = exp_nonpositive(load_as<D>(x, v, ch) - vm);
    sum = sum + select(live(ch), e, Vec::zero());
  });
  const float lse = m + std::log(sum.reduce_add());
  const float picked = load_as_float(x, D, t);
  p.loss.ptr<float>()[c] = lse - picked;
  p.lse.ptr<float>()[c] = lse;
  p.argmax.ptr<int64_t>()[c] = argmax;
  if (!p.scales) return;

  // pass 3: the gradient scale (softmax - onehot), in place
  const Vec vlse(lse), vscale(scale);
  for_chunks(V, [&](int64_t v, auto ch) {
    store_as<D>(x, v, vscale * exp_nonpositive(load_as<D>(x, v, ch) - vlse), ch);
  });
  store_from_float(x, D, t, scale * (std::exp(picked - lse) - 1.0f));
}

template <DType D>
void rows(const LinearCrossEntropyArgs& p) {
  parallel_for(p.logits.size(0), p.num_threads, [&](int64_t c) { row<D>(p, c); });
}

void rows(const LinearCrossEntropyArgs& p) {
  switch (p.logits.dtype) {
    case DType::BF16: return rows<DType::BF16>(p);
    case DType::F16: return rows<DType::F16>(p);
    default: return rows<DType::F32>(p);
  }
}

// This level's entry kernels, one row of the table in common/for_each_isa.h.
constexpr Kernels kernels{rows};

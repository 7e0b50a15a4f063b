// Fused token sampling on the CPU: temperature -> top-k -> top-p -> one draw per row, without
// sorting the vocabulary. Semantics (ties, greedy, errors, the seeded draw) are the reference's:
// python/fusedlm/reference/sampling.py. The passes over a row are in sampling_kernels.h, compiled
// once per ISA level; the scalar bookkeeping they share (ranking, the cut, the draw's uniform) is
// here, compiled once (std::sort and the heap then inline their comparisons).
#include "cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/threading.h"

namespace fusedlm::cpu {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

enum Status : int32_t { kOk = 0, kNaN = 1, kPositiveInf = 2, kNoFinite = 3, kOverflow = 4 };

uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The row's uniform in [0, 1): the top 53 bits of the hash (reference: row_uniforms).
double row_uniform(uint64_t seed, int64_t row) {
  return static_cast<double>(splitmix64(seed + static_cast<uint64_t>(row + 1) * kGolden) >> 11) * 0x1.0p-53;
}

// A token that takes part in a cut: value, index, unnormalised mass.
struct Token {
  float x;
  int64_t index;
  double e;
};

// The ranking of top-p (reference): value descending, then the higher index first.
void rank(std::vector<Token>& tokens) {
  std::sort(tokens.begin(), tokens.end(),
            [](const Token& a, const Token& b) { return a.x != b.x ? a.x > b.x : a.index > b.index; });
}

// The kept set of a row is { x > cut.value } U { x == cut.value and index >= cut.index }.
struct Cut {
  float value = kNegInf;
  int64_t index = 0;
  double kept_mass = 0.0;  // unnormalised mass of the kept set
};

inline bool kept(float x, int64_t i, const Cut& cut) { return x > cut.value || (x == cut.value && i >= cut.index); }

// Walks `tokens` in ranking order, `before` the mass ranked above them, keeping each token whose
// mass before it is < target; the cut moves to the last kept token. Returns true when the walk
// stopped at a dropped token, false when it kept them all (then the cut is the lowest of them).
bool cut_in(std::vector<Token>& tokens, double before, double target, Cut& cut) {
  rank(tokens);
  for (const Token& tok : tokens) {
    if (!(before < target)) {
      cut.kept_mass = before;
      return true;
    }
    cut.value = tok.x;
    cut.index = tok.index;
    before += tok.e;
  }
  cut.kept_mass = before;
  return false;
}

// The k largest values of a row so far, kept loosely: candidates (value, index) in index order,
// each >= threshold, a lower bound of the k-th largest value seen. When the list reaches its
// limit it is cut back to the entries >= its own k-th largest value, which becomes the threshold.
// A value below the threshold at its time is below the row's k-th largest, so at the end every
// token >= the row's k-th largest (ties included) is in the list. Amortised O(1) per candidate.
struct TopK {
  int64_t k = 0;
  float threshold = kNegInf;
  std::vector<Token> candidates;
  std::vector<float> values;

  void reset(int64_t top_k) {
    k = top_k;
    threshold = kNegInf;
    candidates.clear();
  }
  void add(float x, int64_t index) {
    candidates.push_back({x, index, 0.0});
    if (static_cast<int64_t>(candidates.size()) >= 4 * k + 64) tighten();
  }
  // Cuts the list to its entries >= its k-th largest value; returns that value (-inf when the list
  // has fewer than k entries: only with NaN in the row, an error anyway).
  float tighten() {
    if (static_cast<int64_t>(candidates.size()) < k) return kNegInf;
    values.resize(candidates.size());
    for (size_t i = 0; i < candidates.size(); ++i) values[i] = candidates[i].x;
    std::nth_element(values.begin(), values.begin() + (k - 1), values.end(), std::greater<float>());
    threshold = values[k - 1];
    candidates.erase(std::remove_if(candidates.begin(), candidates.end(), [&](const Token& t) { return t.x < threshold; }),
                     candidates.end());
    return threshold;
  }
};

struct Kernels {  // the entry kernels of one ISA level (the last line of sampling_kernels.h)
  void (*run)(const SamplingArgs&);
};

struct RowParams {
  float temperature;
  int64_t top_k;
  double top_p;
};

// Per-thread buffers, reused row after row.
struct Scratch {
  std::vector<float> x, e;
  std::vector<Token> tokens;
  std::vector<double> mass;
  std::vector<uint16_t> ids;
  TopK topk;
};

}  // namespace

}  // namespace fusedlm::cpu

#define FUSEDLM_KERNELS "cpu/sampling_kernels.h"
#include "common/for_each_isa.h"

namespace fusedlm::cpu {

void sampling_run(const SamplingArgs& a) {
  check_sampling(a);
  active_kernels().run(a);
}

}  // namespace fusedlm::cpu

// A tensor as the kernels see it: address, element type, sizes and strides (in elements). Python
// builds one per tensor argument (fusedlm/ops/_checks.py: view) and fills an args struct per op
// with them by field name (common/args.h), so no kernel takes a long positional list. The entry
// points check their views once with the helpers below before any kernel reads a pointer.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace fusedlm {

struct View {
  static constexpr int kMaxDims = 6;
  void* data = nullptr;  // null: the argument is absent
  DType dtype = DType::F32;
  int ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};

  explicit operator bool() const { return data != nullptr; }
  template <class T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
  int64_t size(int d) const { return sizes[d]; }
  int64_t stride(int d) const { return strides[d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= sizes[d];
    return n;
  }
  bool contiguous() const {
    int64_t expected = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      if (sizes[d] != 1 && strides[d] != expected) return false;
      expected *= sizes[d];
    }
    return true;
  }
};

// The float types the kernels compute on.
inline const std::initializer_list<DType> kFloatTypes = {DType::F32, DType::BF16, DType::F16};

// Boundary checks: each throws std::invalid_argument (a ValueError in Python) naming the argument.
inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

inline std::string shape_of(const View& v) {
  std::string s = "[";
  for (int d = 0; d < v.ndim; ++d) s += (d ? ", " : "") + std::to_string(v.sizes[d]);
  return s + "]";
}

// `v` is present, has one of `dtypes` and exactly `sizes` (-1 matches any size).
inline void check_view(const View& v, const char* name, std::initializer_list<DType> dtypes,
                       std::initializer_list<int64_t> sizes) {
  require(static_cast<bool>(v), std::string(name) + " is missing");
  bool dtype_ok = false;
  for (DType d : dtypes) dtype_ok |= v.dtype == d;
  require(dtype_ok, std::string(name) + " has unexpected dtype " + dtype_name(v.dtype));
  bool shape_ok = v.ndim == static_cast<int>(sizes.size());
  int d = 0;
  for (int64_t s : sizes) shape_ok &= d < v.ndim && (s < 0 || v.sizes[d] == s), ++d;
  std::string want = "[";
  d = 0;
  for (int64_t s : sizes) want += (d++ ? ", " : "") + (s < 0 ? std::string("*") : std::to_string(s));
  require(shape_ok, std::string(name) + " must have shape " + want + "], got " + shape_of(v));
  for (d = 0; d < v.ndim; ++d) require(v.strides[d] >= 0, std::string(name) + " has a negative stride");
}

// As check_view, and the elements are laid out densely in row-major order.
inline void check_contiguous(const View& v, const char* name, std::initializer_list<DType> dtypes,
                             std::initializer_list<int64_t> sizes) {
  check_view(v, name, dtypes, sizes);
  require(v.contiguous(), std::string(name) + " must be contiguous");
}

}  // namespace fusedlm

// Host helpers of the CPU ops (recurrence_cpu.cpp, layer_norm_cpu.cpp): the compute-dtype copies
// of their arguments, the bfloat16/float16 rounding of the carried state, zoneout's keep rows, the
// recurrent dropout mask.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

#include "../recurrence.h"

namespace rnnfused::cpu {

// A fresh, contiguous copy in `dtype` (the states are updated in place and must never alias a
// caller's tensor).
inline at::Tensor state_copy(const at::Tensor& t, at::ScalarType dtype) {
  return at::empty(t.sizes(), t.options().dtype(dtype)).copy_(t);
}

// Contiguous view or copy in `dtype` (no copy when it already is).
inline at::Tensor compute_view(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

inline at::Tensor optional_compute_view(const c10::optional<at::Tensor>& t, at::ScalarType dtype) {
  return present(t) ? compute_view(*t, dtype) : at::Tensor();
}

// b_hh in the compute dtype, or zeros for a layer without bias (one add per gate is cheaper
// than a second copy of every pass).
inline at::Tensor bias_or_zeros(const c10::optional<at::Tensor>& b_hh, int64_t size, const at::Tensor& like,
                                at::ScalarType dtype) {
  return present(b_hh) ? compute_view(*b_hh, dtype) : at::zeros({size}, like.options().dtype(dtype));
}

template <typename T>
inline const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Rounds a float state to `storage` (bfloat16 / float16) in place; no-op for float32/float64.
template <typename T>
inline void round_to_storage(at::ScalarType storage, T* data, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    if (storage == at::kBFloat16) {
      for (int64_t i = 0; i < count; ++i) data[i] = static_cast<float>(static_cast<at::BFloat16>(data[i]));
    } else if (storage == at::kHalf) {
      for (int64_t i = 0; i < count; ++i) data[i] = static_cast<float>(static_cast<at::Half>(data[i]));
    }
  }
}

// Rows of keep weights: `at(row)` points at a row's first weight; `stride` is 0 for a scalar.
template <typename T>
struct KeepRows {
  const T* data = nullptr;
  int64_t width = 0, stride = 0;
  KeepRows(const at::Tensor& keep, int64_t width_)
      : data(keep.defined() ? keep.data_ptr<T>() : nullptr), width(width_), stride(keep.dim() == 0 ? 0 : 1) {}
  explicit operator bool() const { return data != nullptr; }
  const T* at(int64_t row) const { return data + row * width * stride; }
};

// Recurrent dropout: dst[i] = src[i] * mask[i] for the first `count` elements (the active rows of a
// step).
template <typename T>
inline void multiply_by_mask(int64_t count, const T* src, const T* mask, T* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = src[i] * mask[i];
}

// What a step multiplies by W_hh: the state rows, or their masked copy in `buffer`.
template <typename T>
inline const T* masked_previous(int64_t count, const T* state, const at::Tensor& mask, const at::Tensor& buffer) {
  if (!mask.defined()) return state;
  multiply_by_mask(count, state, mask.data_ptr<T>(), buffer.data_ptr<T>());
  return buffer.data_ptr<T>();
}

// Gradients leave in the dtype of the tensors they belong to.
inline at::Tensor to_dtype(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype); }

}  // namespace rnnfused::cpu

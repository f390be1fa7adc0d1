#pragma once
// Objects shared by the checkpoint tests and the fixture writer
// (smp_ckpt_fixture). tests/python/test_checkpoint_format.py builds the same
// objects in Python; keep the two in step.

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "smp/checkpoint/value.h"

namespace smp {
namespace ckpt {
namespace testing {

/// One tensor of each storable dtype with deterministic values.
inline Value::Pairs every_dtype() {
  Value::Pairs p;
  p.emplace_back("float32", at::arange(12, at::kFloat).reshape({3, 4}) * 0.5 - 1);
  p.emplace_back("float64", at::arange(6, at::kDouble) / 3);
  p.emplace_back("float16", at::arange(5, at::kHalf) * 0.25);
  p.emplace_back("bfloat16", at::arange(7, at::kBFloat16) - 3);
  p.emplace_back("int8", at::arange(-4, 4, at::kChar));
  p.emplace_back("uint8", at::arange(250, 256, at::kByte));
  p.emplace_back("int16", at::arange(-300, 300, 100, at::kShort));
  p.emplace_back("int32", at::arange(10, at::kInt).reshape({2, 5}) * 100000);
  p.emplace_back("int64", at::arange(4, at::kLong) * 4000000000LL);
  p.emplace_back("bool", at::arange(6, at::kLong).remainder(2).eq(0));
  p.emplace_back("complex64", at::complex(at::arange(3, at::kFloat), at::arange(3, at::kFloat) + 1));
  p.emplace_back("complex128",
                 at::complex(at::arange(2, at::kDouble), at::arange(2, at::kDouble) - 1));
  return p;
}

/// Nested plain data, tensors of every dtype, empty and 0-d tensors,
/// non-contiguous views, an OrderedDict with attributes (as state_dict()).
inline Value everything() {
  at::Tensor base = at::arange(24, at::kFloat).reshape({4, 6});
  Value sd = Value::ordered_dict({
      {"layer.weight", base.t()},                                       // transposed view
      {"layer.bias", at::arange(10, at::kDouble).slice(0, 1, 9, 3)},  // strided slice
      {"row", base.select(0, 2)},                                      // offset view
  });
  sd.set_attributes(Value::dict({{"_metadata", Value::ordered_dict({{"", Value::dict({{"version", 1}})}})}}));
  return Value::dict({
      {"none", Value()},
      {"true", true},
      {"false", false},
      {"ints", Value::list({0, 1, 255, 256, 65535, 65536, -1, -5, 2147483647, -2147483648LL,
                            2147483648LL, 4294967296LL, -4294967296LL, 9223372036854775807LL,
                            static_cast<std::int64_t>(-9223372036854775807LL - 1)})},
      {"floats", Value::list({0.0, -0.0, 1.5, -2.25, 1e300, 1e-300, 0.1, HUGE_VAL, -HUGE_VAL})},
      {"str", "caf\xc3\xa9 \xe2\x9c\x93 \"quoted\"\n"},
      {"empty_str", ""},
      {"bytes", Value::bytes(std::string("\x00\x01\x7f\x80\xff abc", 9))},
      {"empty_bytes", Value::bytes("")},
      {"tuple0", Value::tuple()},
      {"tuple1", Value::tuple({1})},
      {"tuple2", Value::tuple({1, "two"})},
      {"tuple3", Value::tuple({1, 2.0, Value()})},
      {"tuple5", Value::tuple({1, 2, 3, 4, 5})},
      {"list", Value::list({Value::list(), Value::dict(), Value::list({Value::tuple({})})})},
      {7, "int key"},
      {Value::tuple({1, "a"}), "tuple key"},
      {"dtypes", Value::dict(every_dtype())},
      {"empty", at::zeros({0, 3}, at::kFloat)},
      {"scalar", at::scalar_tensor(3.5, at::kDouble)},
      {"scalar_int", at::scalar_tensor(7, at::kLong)},
      {"state_dict", sd},
  });
}

/// The same tensor twice (tied weights), a second tensor object viewing the
/// same bytes, and an unrelated tensor.
inline Value tied() {
  at::Tensor w = at::arange(8, at::kFloat).reshape({2, 4});
  at::Tensor alias = w.view({2, 4});  // another TensorImpl, same storage and layout
  return Value::ordered_dict({
      {"encoder.weight", w},
      {"decoder.weight", w},
      {"alias", alias},
      {"other", at::ones({3}, at::kFloat)},
  });
}

}  // namespace testing
}  // namespace ckpt
}  // namespace smp

#pragma once
/// smp::ckpt::Value: the object tree a checkpoint file holds, the C++ mirror of
/// what `torch.save` pickles for state dicts and optimizer state dicts: None,
/// bool, int, float, str, bytes, list, tuple, dict / OrderedDict and tensors.
///
/// Values have value semantics (copying a Value copies its containers) except
/// for tensors, which are shared like at::Tensor itself: a tensor leaf copied
/// into two places of a tree is the same tensor, and the file stores it once
/// (tied weights). A tensor leaf may carry a ShardSpec, recorded in the file's
/// index so that a loader can reshard.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "smp/core/shard_spec.h"

namespace smp {
namespace ckpt {

class Value {
 public:
  enum class Kind { kNone, kBool, kInt, kFloat, kString, kBytes, kList, kTuple, kDict, kTensor };
  using Items = std::vector<Value>;
  using Pairs = std::vector<std::pair<Value, Value>>;

  /// None.
  Value() = default;
  Value(std::nullptr_t) {}
  Value(bool b) : kind_(Kind::kBool), int_(b ? 1 : 0) {}
  template <typename T,
            std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
  Value(T i) : kind_(Kind::kInt), int_(static_cast<std::int64_t>(i)) {}
  Value(double d) : kind_(Kind::kFloat), float_(d) {}
  /// A str (UTF-8).
  Value(const char* s) : kind_(Kind::kString), string_(s) {}
  Value(std::string s) : kind_(Kind::kString), string_(std::move(s)) {}
  /// A tensor leaf; `tensor` must be defined and strided (dense).
  Value(at::Tensor tensor, std::optional<ShardSpec> shard = std::nullopt);

  static Value none() { return Value(); }
  static Value boolean(bool b) { return Value(b); }
  static Value integer(std::int64_t i) { return Value(i); }
  static Value floating(double d) { return Value(d); }
  static Value string(std::string s) { return Value(std::move(s)); }
  /// Python bytes: any byte string.
  static Value bytes(std::string data);
  static Value list(Items items = {});
  static Value tuple(Items items = {});
  /// A plain dict (Python `dict`).
  static Value dict(Pairs pairs = {});
  /// A collections.OrderedDict (what nn.Module.state_dict() returns).
  static Value ordered_dict(Pairs pairs = {});
  static Value tensor(at::Tensor tensor, std::optional<ShardSpec> shard = std::nullopt);

  Kind kind() const { return kind_; }
  bool is_none() const { return kind_ == Kind::kNone; }
  bool is_bool() const { return kind_ == Kind::kBool; }
  bool is_int() const { return kind_ == Kind::kInt; }
  bool is_float() const { return kind_ == Kind::kFloat; }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_bytes() const { return kind_ == Kind::kBytes; }
  bool is_list() const { return kind_ == Kind::kList; }
  bool is_tuple() const { return kind_ == Kind::kTuple; }
  bool is_dict() const { return kind_ == Kind::kDict; }
  bool is_tensor() const { return kind_ == Kind::kTensor; }

  /// Typed accessors: each throws smp::Error naming the expected and actual
  /// kind when the value is of another kind.
  bool as_bool() const;
  std::int64_t as_int() const;
  /// A float, or an int converted to double.
  double as_float() const;
  const std::string& as_string() const;
  const std::string& as_bytes() const;
  /// Elements of a list or tuple.
  const Items& items() const;
  Items& items();
  /// Key/value pairs of a dict, in insertion order.
  const Pairs& pairs() const;
  Pairs& pairs();
  const at::Tensor& tensor() const;
  const std::optional<ShardSpec>& shard() const;
  void set_shard(std::optional<ShardSpec> shard);

  /// Number of elements (list, tuple) or pairs (dict); throws otherwise.
  std::size_t size() const;
  /// Dict only: true for collections.OrderedDict.
  bool ordered() const;
  /// OrderedDict only: instance attributes (`__dict__`) pickled with it, such
  /// as the `_metadata` of nn.Module.state_dict(). A dict, or None when the
  /// OrderedDict has no attributes.
  const Value& attributes() const;
  void set_attributes(Value attributes);

  /// Dict lookup by a str key; nullptr when absent. Throws when not a dict.
  const Value* find(const std::string& key) const;
  Value* find(const std::string& key);
  /// Dict lookup by a str key; throws smp::Error naming the key when absent.
  const Value& at(const std::string& key) const;
  /// Dict: replaces the value of an equal key, else appends the pair.
  void set(Value key, Value value);
  /// List: appends.
  void append(Value item);

  /// A Python-like rendering, for messages and test dumps. Tensors appear as
  /// tensor(float32, [2, 3], crc32=...) (see describe_tensor).
  std::string repr() const;

 private:
  Kind kind_ = Kind::kNone;
  std::int64_t int_ = 0;  // bool and int
  double float_ = 0.0;
  std::string string_;     // str and bytes
  Items items_;            // list and tuple; attributes_ holder for OrderedDict
  Pairs pairs_;
  bool ordered_ = false;
  at::Tensor tensor_;
  std::optional<ShardSpec> shard_;
};

/// "None", "bool", "int", "float", "str", "bytes", "list", "tuple", "dict", "tensor".
const char* to_string(Value::Kind kind);

/// Deep comparison: same kinds, same structure (dict pairs in the same order,
/// dict vs OrderedDict distinguished, attributes compared), floats and tensors
/// bitwise (tensors: same dtype, same shape, same bytes; NaNs with the same
/// bits are equal; device and strides are ignored). Shard specs are compared
/// when both sides carry one.
bool equal(const Value& a, const Value& b);

/// "tensor(float32, [2, 3], crc32=0x1234abcd)": dtype, shape and the CRC-32 of
/// the contiguous bytes; what test dumps use to compare tensors across
/// languages.
std::string describe_tensor(const at::Tensor& tensor);

/// The dtype name used in checkpoint indexes: "float32", "bfloat16", "int64",
/// "bool", ... Throws CheckpointError for dtypes checkpoints do not store.
const char* dtype_name(c10::ScalarType dtype);
/// Inverse of dtype_name; throws CheckpointError for unknown names.
c10::ScalarType dtype_from_name(const std::string& name);

}  // namespace ckpt
}  // namespace smp

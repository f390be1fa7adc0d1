#pragma once
/// A small JSON value, parser and serializer for the engine's own metadata
/// (the checkpoint index). Internal: not part of the installed API.
///
/// Objects keep their keys in insertion order, so that serializing is
/// deterministic. Integers that fit int64 stay integers; other numbers are
/// doubles. Strings are UTF-8; \uXXXX escapes (with surrogate pairs) are
/// decoded to UTF-8 and control characters are escaped on output.

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace smp {
namespace json {

/// Thrown by parse() and by the typed accessors. Carries no smp error class on
/// purpose: callers translate it into the error of their layer, adding the
/// file it came from.
class JsonError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Value {
 public:
  enum class Type { kNull, kBool, kInt, kDouble, kString, kArray, kObject };
  using Array = std::vector<Value>;
  using Object = std::vector<std::pair<std::string, Value>>;

  Value() = default;
  Value(std::nullptr_t) {}
  Value(bool b) : type_(Type::kBool), bool_(b) {}
  Value(int i) : type_(Type::kInt), int_(i) {}
  Value(std::int64_t i) : type_(Type::kInt), int_(i) {}
  Value(std::uint32_t i) : type_(Type::kInt), int_(i) {}
  /// Throws JsonError when i does not fit int64.
  static Value from_uint64(std::uint64_t i);
  Value(double d) : type_(Type::kDouble), double_(d) {}
  Value(const char* s) : type_(Type::kString), string_(s) {}
  Value(std::string s) : type_(Type::kString), string_(std::move(s)) {}

  static Value array(Array items = {});
  static Value object(Object members = {});

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_int() const { return type_ == Type::kInt; }
  bool is_number() const { return type_ == Type::kInt || type_ == Type::kDouble; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }

  /// Typed accessors; each throws JsonError naming the expected and the
  /// actual type when the value has another type.
  bool as_bool() const;
  std::int64_t as_int() const;
  /// An int64 that must be >= 0.
  std::uint64_t as_uint() const;
  double as_double() const;  // ints convert
  const std::string& as_string() const;
  const Array& as_array() const;
  Array& as_array();
  const Object& as_object() const;
  Object& as_object();

  /// Object member lookup; nullptr when absent (or when not an object).
  const Value* find(const std::string& key) const;
  /// Object member; throws JsonError "missing key 'k'" when absent.
  const Value& at(const std::string& key) const;
  /// Appends (or replaces) an object member; the value must be an object.
  void set(const std::string& key, Value value);
  /// Appends to an array.
  void push_back(Value value);

  /// Compact serialization (no whitespace). Doubles round-trip exactly
  /// (%.17g); NaN and infinities are written as null.
  std::string dump() const;

  friend bool operator==(const Value& a, const Value& b);
  friend bool operator!=(const Value& a, const Value& b) { return !(a == b); }

 private:
  void dump_to(std::string& out) const;

  Type type_ = Type::kNull;
  bool bool_ = false;
  std::int64_t int_ = 0;
  double double_ = 0.0;
  std::string string_;
  Array array_;
  Object object_;
};

/// "null", "bool", "int", "double", "string", "array", "object".
const char* to_string(Value::Type type);

/// Parses one JSON document (surrounding whitespace allowed). Throws
/// JsonError "... at line L column C" on malformed input. Nesting deeper than
/// 512 levels is refused.
Value parse(const std::string& text);

}  // namespace json
}  // namespace smp

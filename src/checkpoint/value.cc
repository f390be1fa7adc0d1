#include "smp/checkpoint/value.h"

#include "checkpoint/value_util.h"

#include <ATen/ATen.h>
#include <zlib.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <sstream>

#include "smp/core/error.h"

namespace smp {
namespace ckpt {

const char* to_string(Value::Kind kind) {
  switch (kind) {
    case Value::Kind::kNone: return "None";
    case Value::Kind::kBool: return "bool";
    case Value::Kind::kInt: return "int";
    case Value::Kind::kFloat: return "float";
    case Value::Kind::kString: return "str";
    case Value::Kind::kBytes: return "bytes";
    case Value::Kind::kList: return "list";
    case Value::Kind::kTuple: return "tuple";
    case Value::Kind::kDict: return "dict";
    case Value::Kind::kTensor: return "tensor";
  }
  return "?";
}

namespace {

[[noreturn]] void wrong_kind(const char* want, Value::Kind got) {
  SMP_THROW(Error, "checkpoint value: expected ", want, ", got ", to_string(got));
}

}  // namespace

Value::Value(at::Tensor tensor, std::optional<ShardSpec> shard)
    : kind_(Kind::kTensor), tensor_(std::move(tensor)), shard_(std::move(shard)) {
  SMP_CHECK(tensor_.defined(), Error,
            "checkpoint value: a tensor leaf must be a defined tensor; use Value() (None) for "
            "a missing tensor");
  SMP_CHECK(tensor_.layout() == at::kStrided, Error, "checkpoint value: tensor layout ",
            tensor_.layout(), " is not supported; convert it with .to_dense()");
}

Value Value::bytes(std::string data) {
  Value v;
  v.kind_ = Kind::kBytes;
  v.string_ = std::move(data);
  return v;
}

Value Value::list(Items items) {
  Value v;
  v.kind_ = Kind::kList;
  v.items_ = std::move(items);
  return v;
}

Value Value::tuple(Items items) {
  Value v;
  v.kind_ = Kind::kTuple;
  v.items_ = std::move(items);
  return v;
}

Value Value::dict(Pairs pairs) {
  Value v;
  v.kind_ = Kind::kDict;
  v.pairs_ = std::move(pairs);
  return v;
}

Value Value::ordered_dict(Pairs pairs) {
  Value v = dict(std::move(pairs));
  v.ordered_ = true;
  return v;
}

Value Value::tensor(at::Tensor tensor, std::optional<ShardSpec> shard) {
  return Value(std::move(tensor), std::move(shard));
}

bool Value::as_bool() const {
  if (kind_ != Kind::kBool) wrong_kind("bool", kind_);
  return int_ != 0;
}

std::int64_t Value::as_int() const {
  if (kind_ != Kind::kInt) wrong_kind("int", kind_);
  return int_;
}

double Value::as_float() const {
  if (kind_ == Kind::kInt) return static_cast<double>(int_);
  if (kind_ != Kind::kFloat) wrong_kind("float", kind_);
  return float_;
}

const std::string& Value::as_string() const {
  if (kind_ != Kind::kString) wrong_kind("str", kind_);
  return string_;
}

const std::string& Value::as_bytes() const {
  if (kind_ != Kind::kBytes) wrong_kind("bytes", kind_);
  return string_;
}

const Value::Items& Value::items() const {
  if (kind_ != Kind::kList && kind_ != Kind::kTuple) wrong_kind("list or tuple", kind_);
  return items_;
}

Value::Items& Value::items() {
  if (kind_ != Kind::kList && kind_ != Kind::kTuple) wrong_kind("list or tuple", kind_);
  return items_;
}

const Value::Pairs& Value::pairs() const {
  if (kind_ != Kind::kDict) wrong_kind("dict", kind_);
  return pairs_;
}

Value::Pairs& Value::pairs() {
  if (kind_ != Kind::kDict) wrong_kind("dict", kind_);
  return pairs_;
}

const at::Tensor& Value::tensor() const {
  if (kind_ != Kind::kTensor) wrong_kind("tensor", kind_);
  return tensor_;
}

const std::optional<ShardSpec>& Value::shard() const {
  if (kind_ != Kind::kTensor) wrong_kind("tensor", kind_);
  return shard_;
}

void Value::set_shard(std::optional<ShardSpec> shard) {
  if (kind_ != Kind::kTensor) wrong_kind("tensor", kind_);
  shard_ = std::move(shard);
}

std::size_t Value::size() const {
  if (kind_ == Kind::kDict) return pairs_.size();
  return items().size();
}

bool Value::ordered() const {
  if (kind_ != Kind::kDict) wrong_kind("dict", kind_);
  return ordered_;
}

const Value& Value::attributes() const {
  static const Value kNone;
  if (kind_ != Kind::kDict) wrong_kind("dict", kind_);
  return items_.empty() ? kNone : items_.front();
}

void Value::set_attributes(Value attributes) {
  if (kind_ != Kind::kDict) wrong_kind("dict", kind_);
  SMP_CHECK(ordered_, Error,
            "checkpoint value: only an OrderedDict can carry attributes (a plain dict cannot)");
  SMP_CHECK(attributes.is_none() || attributes.is_dict(), Error,
            "checkpoint value: OrderedDict attributes must be a dict or None, got ",
            to_string(attributes.kind()));
  items_.clear();
  if (!attributes.is_none()) items_.push_back(std::move(attributes));
}

const Value* Value::find(const std::string& key) const {
  for (const auto& kv : pairs()) {
    if (kv.first.is_string() && kv.first.string_ == key) return &kv.second;
  }
  return nullptr;
}

Value* Value::find(const std::string& key) {
  for (auto& kv : pairs()) {
    if (kv.first.is_string() && kv.first.string_ == key) return &kv.second;
  }
  return nullptr;
}

const Value& Value::at(const std::string& key) const {
  const Value* v = find(key);
  SMP_CHECK(v != nullptr, Error, "checkpoint value: dict has no key '", key, "'");
  return *v;
}

void Value::set(Value key, Value value) {
  for (auto& kv : pairs()) {
    if (equal(kv.first, key)) {
      kv.second = std::move(value);
      return;
    }
  }
  pairs_.emplace_back(std::move(key), std::move(value));
}

void Value::append(Value item) {
  if (kind_ != Kind::kList) wrong_kind("list", kind_);
  items_.push_back(std::move(item));
}

// ---- dtypes: the one table ----------------------------------------------------

namespace {

struct DtypeRow {
  c10::ScalarType dtype;
  const char* name;     // in checkpoint indexes
  const char* storage;  // torch.<storage> in data.pkl
};

constexpr DtypeRow kDtypes[] = {
    {at::kFloat, "float32", "FloatStorage"},
    {at::kDouble, "float64", "DoubleStorage"},
    {at::kHalf, "float16", "HalfStorage"},
    {at::kBFloat16, "bfloat16", "BFloat16Storage"},
    {at::kChar, "int8", "CharStorage"},
    {at::kByte, "uint8", "ByteStorage"},
    {at::kShort, "int16", "ShortStorage"},
    {at::kInt, "int32", "IntStorage"},
    {at::kLong, "int64", "LongStorage"},
    {at::kBool, "bool", "BoolStorage"},
    {at::kComplexFloat, "complex64", "ComplexFloatStorage"},
    {at::kComplexDouble, "complex128", "ComplexDoubleStorage"},
};

const DtypeRow* row_of(c10::ScalarType dtype) {
  for (const auto& r : kDtypes) {
    if (r.dtype == dtype) return &r;
  }
  return nullptr;
}

}  // namespace

const char* dtype_name(c10::ScalarType dtype) {
  if (const DtypeRow* r = row_of(dtype)) return r->name;
  SMP_THROW(CheckpointError, "dtype ", c10::toString(dtype),
            " cannot be stored in an smp checkpoint; supported: float32, float64, float16, "
            "bfloat16, int8, uint8, int16, int32, int64, bool, complex64, complex128");
}

c10::ScalarType dtype_from_name(const std::string& name) {
  for (const auto& r : kDtypes) {
    if (name == r.name) return r.dtype;
  }
  SMP_THROW(CheckpointError, "unknown checkpoint dtype '", name,
            "'; the file was written by a newer smp or is damaged");
}

namespace internal {

const char* storage_type_name(c10::ScalarType dtype) {
  const DtypeRow* r = row_of(dtype);
  return r == nullptr ? nullptr : r->storage;
}

bool dtype_from_storage_type(const std::string& name, c10::ScalarType* dtype) {
  for (const auto& r : kDtypes) {
    if (name == r.storage) {
      *dtype = r.dtype;
      return true;
    }
  }
  return false;
}

at::Tensor host_bytes(const at::Tensor& t) {
  at::Tensor h = t.detach();
  if (!h.device().is_cpu()) h = h.to(at::kCPU);
  h = h.resolve_conj().resolve_neg();
  return h.contiguous();
}

}  // namespace internal

// ---- comparison and rendering ---------------------------------------------

namespace {

bool shard_equal(const ShardSpec& a, const ShardSpec& b) {
  return a.global_shape == b.global_shape && a.split_dim == b.split_dim &&
         a.num_shards == b.num_shards && a.shard_index == b.shard_index;
}

bool tensor_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type()) return false;
  if (a.sizes() != b.sizes()) return false;
  const at::Tensor ha = internal::host_bytes(a);
  const at::Tensor hb = internal::host_bytes(b);
  const std::size_t n = static_cast<std::size_t>(ha.numel()) * ha.element_size();
  return n == 0 || std::memcmp(ha.data_ptr(), hb.data_ptr(), n) == 0;
}

void quote(const std::string& s, char q, std::ostringstream& os) {
  os << q;
  for (unsigned char c : s) {
    if (c == '\\' || c == static_cast<unsigned char>(q)) {
      os << '\\' << c;
    } else if (c == '\n') {
      os << "\\n";
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      os << buf;
    } else {
      os << c;
    }
  }
  os << q;
}

void bytes_repr(const std::string& s, std::ostringstream& os) {
  os << "b'";
  for (unsigned char c : s) {
    if (c == '\\' || c == '\'') {
      os << '\\' << c;
    } else if (c >= 0x20 && c < 0x7f) {
      os << c;
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      os << buf;
    }
  }
  os << "'";
}

std::string float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  // Shortest representation that round-trips, as Python's repr.
  char buf[40];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof(buf), "%.*g", prec, d);
    if (std::strtod(buf, nullptr) == d) break;
  }
  std::string s(buf);
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

void repr_to(const Value& v, std::ostringstream& os) {
  switch (v.kind()) {
    case Value::Kind::kNone: os << "None"; break;
    case Value::Kind::kBool: os << (v.as_bool() ? "True" : "False"); break;
    case Value::Kind::kInt: os << v.as_int(); break;
    case Value::Kind::kFloat: os << float_repr(v.as_float()); break;
    case Value::Kind::kString: quote(v.as_string(), '\'', os); break;
    case Value::Kind::kBytes: bytes_repr(v.as_bytes(), os); break;
    case Value::Kind::kList:
    case Value::Kind::kTuple: {
      const bool list = v.is_list();
      os << (list ? "[" : "(");
      const auto& items = v.items();
      for (std::size_t i = 0; i < items.size(); ++i) {
        if (i) os << ", ";
        repr_to(items[i], os);
      }
      if (!list && items.size() == 1) os << ",";
      os << (list ? "]" : ")");
      break;
    }
    case Value::Kind::kDict: {
      os << (v.ordered() ? "OrderedDict({" : "{");
      const auto& pairs = v.pairs();
      for (std::size_t i = 0; i < pairs.size(); ++i) {
        if (i) os << ", ";
        repr_to(pairs[i].first, os);
        os << ": ";
        repr_to(pairs[i].second, os);
      }
      os << (v.ordered() ? "})" : "}");
      if (v.ordered() && !v.attributes().is_none()) {
        os << ".__dict__=";
        repr_to(v.attributes(), os);
      }
      break;
    }
    case Value::Kind::kTensor: os << describe_tensor(v.tensor()); break;
  }
}

}  // namespace

std::string describe_tensor(const at::Tensor& tensor) {
  const at::Tensor h = internal::host_bytes(tensor);
  const std::size_t n = static_cast<std::size_t>(h.numel()) * h.element_size();
  uLong crc = crc32(0L, Z_NULL, 0);
  const auto* p = static_cast<const Bytef*>(n ? h.data_ptr() : nullptr);
  for (std::size_t done = 0; done < n;) {
    const std::size_t chunk = std::min<std::size_t>(n - done, 1u << 30);
    crc = crc32(crc, p + done, static_cast<uInt>(chunk));
    done += chunk;
  }
  std::ostringstream os;
  os << "tensor(" << dtype_name(h.scalar_type()) << ", [";
  for (int64_t i = 0; i < h.dim(); ++i) os << (i ? ", " : "") << h.size(i);
  char buf[16];
  std::snprintf(buf, sizeof(buf), "%08lx", static_cast<unsigned long>(crc));
  os << "], crc32=0x" << buf << ")";
  return os.str();
}

std::string Value::repr() const {
  std::ostringstream os;
  repr_to(*this, os);
  return os.str();
}

bool equal(const Value& a, const Value& b) {
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case Value::Kind::kNone: return true;
    case Value::Kind::kBool: return a.as_bool() == b.as_bool();
    case Value::Kind::kInt: return a.as_int() == b.as_int();
    case Value::Kind::kFloat: {
      const double x = a.as_float(), y = b.as_float();
      return std::memcmp(&x, &y, sizeof(double)) == 0;
    }
    case Value::Kind::kString: return a.as_string() == b.as_string();
    case Value::Kind::kBytes: return a.as_bytes() == b.as_bytes();
    case Value::Kind::kList:
    case Value::Kind::kTuple: {
      const auto& x = a.items();
      const auto& y = b.items();
      if (x.size() != y.size()) return false;
      for (std::size_t i = 0; i < x.size(); ++i) {
        if (!equal(x[i], y[i])) return false;
      }
      return true;
    }
    case Value::Kind::kDict: {
      if (a.ordered() != b.ordered()) return false;
      const auto& x = a.pairs();
      const auto& y = b.pairs();
      if (x.size() != y.size()) return false;
      for (std::size_t i = 0; i < x.size(); ++i) {
        if (!equal(x[i].first, y[i].first) || !equal(x[i].second, y[i].second)) return false;
      }
      return equal(a.attributes(), b.attributes());
    }
    case Value::Kind::kTensor: {
      if (!tensor_equal(a.tensor(), b.tensor())) return false;
      if (a.shard() && b.shard()) return shard_equal(*a.shard(), *b.shard());
      return true;
    }
  }
  return false;
}

}  // namespace ckpt
}  // namespace smp

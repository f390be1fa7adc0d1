#include "checkpoint/pickle_reader.h"

#include "checkpoint/value_util.h"

#include <ATen/ATen.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <unordered_map>
#include <unordered_set>

#include "checkpoint/pickle_writer.h"
#include "smp/core/error.h"

namespace smp {
namespace ckpt {
namespace internal {

namespace {

constexpr const char* kRefuseHint =
    "safe loading refuses to run code from a checkpoint; if you trust this file, load it with "
    "weights_only=False";


enum class GlobalKind {
  kRebuildTensor, kRebuildParameter, kOrderedDict, kStorageType, kCodecsEncode, kBytes
};

/// Counts the work of one expansion of the parse tree (a walk or a
/// conversion); throws when a file asks for more than its size justifies.
class Budget {
 public:
  Budget(std::size_t source_bytes, const std::string& file)
      : left_(expansion_budget(source_bytes)), source_bytes_(source_bytes), file_(file) {}
  void spend(std::uint64_t units) {
    if (units <= left_) {
      left_ -= units;
      return;
    }
    SMP_THROW(CorruptCheckpointError, "checkpoint file '", file_, "' is damaged or hostile: its ",
              source_bytes_, "-byte data.pkl expands to more than ",
              expansion_budget(source_bytes_),
              " objects and string bytes (shared memo references reused over and over); smp "
              "checkpoints hold trees. Restore it from a good copy, or do not load files from "
              "untrusted sources");
  }

 private:
  std::uint64_t left_;
  std::size_t source_bytes_;
  const std::string& file_;
};

NodePtr make(Node::Type t) {
  auto n = std::make_shared<Node>();
  n->type = t;
  return n;
}

const char* node_type_name(Node::Type t) {
  switch (t) {
    case Node::Type::kNone: return "None";
    case Node::Type::kBool: return "bool";
    case Node::Type::kInt: return "int";
    case Node::Type::kFloat: return "float";
    case Node::Type::kString: return "str";
    case Node::Type::kBytes: return "bytes";
    case Node::Type::kList: return "list";
    case Node::Type::kTuple: return "tuple";
    case Node::Type::kDict: return "dict";
    case Node::Type::kTensor: return "tensor";
    case Node::Type::kGlobal: return "global";
    case Node::Type::kStorage: return "storage";
  }
  return "?";
}

class Unpickler {
 public:
  Unpickler(const std::string& data, const std::string& file) : d_(data), file_(file) {}

  Unpickled run() {
    while (true) {
      if (pos_ >= d_.size()) corrupt("the pickle ends without a STOP opcode");
      op_pos_ = pos_;
      const unsigned char op = static_cast<unsigned char>(d_[pos_++]);
      switch (op) {
        case 0x80: {  // PROTO
          const unsigned proto = u8();
          if (proto > 5) corrupt("unknown pickle protocol " + std::to_string(proto));
          break;
        }
        case 0x95: skip(8); break;  // FRAME: framing only
        case '.': {                 // STOP
          Unpickled out;
          out.source_bytes = d_.size();
          out.root = pop();
          check_result(out.root);
          out.storages = std::move(storages_);
          return out;
        }
        case '(':  // MARK
          marks_.push_back(stack_.size());
          break;
        case '}': push(make(Node::Type::kDict)); break;
        case ']': push(make(Node::Type::kList)); break;
        case ')': push(make(Node::Type::kTuple)); break;
        case 'N': push(make(Node::Type::kNone)); break;
        case 0x88: push_bool(true); break;
        case 0x89: push_bool(false); break;
        case 'K': push_int(u8()); break;
        case 'M': {
          const std::uint32_t lo = u8(), hi = u8();
          push_int(lo | (hi << 8));
          break;
        }
        case 'J': push_int(static_cast<std::int32_t>(u32())); break;
        case 0x8a: push_int(long1(u8())); break;  // LONG1
        case 'G': {
          std::uint64_t u = 0;
          const unsigned char* p = bytes(8);
          for (int i = 0; i < 8; ++i) u = (u << 8) | p[i];
          auto n = make(Node::Type::kFloat);
          std::memcpy(&n->f, &u, sizeof(double));
          push(n);
          break;
        }
        case 'X': push_str(u32()); break;                // BINUNICODE
        case 0x8c: push_str(u8()); break;                // SHORT_BINUNICODE
        case 0x8d: push_str(u64()); break;               // BINUNICODE8
        case 'B': push_bytes(u32()); break;              // BINBYTES
        case 'C': push_bytes(u8()); break;               // SHORT_BINBYTES
        case 0x8e: push_bytes(u64()); break;             // BINBYTES8
        case 'q': memo_[u8()] = top(); break;            // BINPUT
        case 'r': memo_[u32()] = top(); break;           // LONG_BINPUT
        case 0x94: memo_[memo_next()] = top(); break;    // MEMOIZE
        case 'h': push(memo_get(u8())); break;           // BINGET
        case 'j': push(memo_get(u32())); break;          // LONG_BINGET
        case '0': pop(); break;                          // POP
        case '1': pop_mark(); break;                     // POP_MARK
        case 'c': {                                      // GLOBAL
          const std::string module = line();
          const std::string name = line();
          push_global(module, name);
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          NodePtr name = pop(), module = pop();
          if (name->type != Node::Type::kString || module->type != Node::Type::kString) {
            corrupt("STACK_GLOBAL needs two strings");
          }
          push_global(module->s, name->s);
          break;
        }
        case 't': {
          auto n = make(Node::Type::kTuple);
          n->items = pop_mark();
          push(n);
          break;
        }
        case 0x85:
        case 0x86:
        case 0x87: {
          const std::size_t k = op - 0x84u;
          if (stack_.size() < k + base()) corrupt("stack underflow");
          auto n = make(Node::Type::kTuple);
          n->items.assign(stack_.end() - static_cast<std::ptrdiff_t>(k), stack_.end());
          stack_.resize(stack_.size() - k);
          push(n);
          break;
        }
        case 'l': {  // LIST
          auto n = make(Node::Type::kList);
          n->items = pop_mark();
          push(n);
          break;
        }
        case 'd': {  // DICT
          auto n = make(Node::Type::kDict);
          auto items = pop_mark();
          set_items(n, items);
          push(n);
          break;
        }
        case 'a': {  // APPEND
          NodePtr item = pop();
          list_target("APPEND")->items.push_back(item);
          break;
        }
        case 'e': {  // APPENDS
          auto items = pop_mark();
          auto& dst = list_target("APPENDS")->items;
          dst.insert(dst.end(), items.begin(), items.end());
          break;
        }
        case 's': {  // SETITEM
          NodePtr v = pop(), k = pop();
          set_items(dict_target("SETITEM"), {k, v});
          break;
        }
        case 'u': {  // SETITEMS
          auto items = pop_mark();
          set_items(dict_target("SETITEMS"), items);
          break;
        }
        case 'Q': {  // BINPERSID
          NodePtr pid = pop();
          push(persistent_load(pid));
          break;
        }
        case 'R': {  // REDUCE
          NodePtr args = pop();
          NodePtr func = pop();
          push(reduce(func, args));
          break;
        }
        case 'b': {  // BUILD
          NodePtr state = pop();
          NodePtr inst = top();
          if (inst->type == Node::Type::kDict && inst->ordered &&
              (state->type == Node::Type::kDict || state->type == Node::Type::kNone)) {
            if (state->type == Node::Type::kDict && !state->pairs.empty()) inst->attributes = state;
            break;
          }
          if (inst->type == Node::Type::kTensor && state->type == Node::Type::kNone) break;
          refuse_op(op, "BUILD on a " + std::string(node_type_name(inst->type)));
        }
        default: refuse_op(op, "");
      }
    }
  }

 private:
  // ---- errors ----
  [[noreturn]] void corrupt(const std::string& why) const {
    SMP_THROW(CorruptCheckpointError, "checkpoint file '", file_, "' is damaged: data.pkl ", why,
              " (at byte ", op_pos_,
              "); restore it from a good copy or write the checkpoint again");
  }
  [[noreturn]] void refuse_global(const std::string& module, const std::string& name) const {
    SMP_THROW(UnsafeLoadError, "checkpoint file '", file_, "': data.pkl references the global '",
              module, " ", name, "' (at byte ", op_pos_, "), which is not a tensor, storage or "
              "container type; ", kRefuseHint);
  }
  [[noreturn]] void refuse_op(unsigned char op, const std::string& what) const {
    char buf[8];
    std::snprintf(buf, sizeof(buf), "0x%02x", op);
    SMP_THROW(UnsafeLoadError, "checkpoint file '", file_, "': data.pkl uses the pickle opcode ",
              buf, what.empty() ? "" : " (", what, what.empty() ? "" : ")", " at byte ", op_pos_,
              ", which safe loading does not support; ", kRefuseHint);
  }

  // ---- input ----
  const unsigned char* bytes(std::uint64_t n) {
    if (n > d_.size() - pos_) corrupt("is truncated");
    const auto* p = reinterpret_cast<const unsigned char*>(d_.data() + pos_);
    pos_ += static_cast<std::size_t>(n);
    return p;
  }
  void skip(std::uint64_t n) { bytes(n); }
  std::uint32_t u8() { return *bytes(1); }
  std::uint32_t u32() {
    const unsigned char* p = bytes(4);
    return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
           (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
  }
  std::uint64_t u64() {
    const std::uint64_t lo = u32();
    const std::uint64_t hi = u32();
    return lo | (hi << 32);
  }
  std::string line() {
    const std::size_t end = d_.find('\n', pos_);
    if (end == std::string::npos) corrupt("has an unterminated GLOBAL");
    std::string s = d_.substr(pos_, end - pos_);
    pos_ = end + 1;
    return s;
  }
  std::int64_t long1(std::uint32_t n) {
    const unsigned char* p = bytes(n);
    if (n == 0) return 0;
    if (n > 8) {
      // Accept sign-extension bytes only.
      const unsigned char ext = (p[7] & 0x80) ? 0xFF : 0x00;
      for (std::uint32_t i = 8; i < n; ++i) {
        if (p[i] != ext) {
          SMP_THROW(CheckpointError, "checkpoint file '", file_,
                    "': data.pkl holds an integer wider than 64 bits (at byte ", op_pos_,
                    "), which smp checkpoints cannot represent");
        }
      }
      n = 8;
    }
    std::uint64_t u = 0;
    for (std::uint32_t i = 0; i < n; ++i) u |= static_cast<std::uint64_t>(p[i]) << (8 * i);
    if (n < 8 && (p[n - 1] & 0x80)) u |= ~std::uint64_t{0} << (8 * n);
    return static_cast<std::int64_t>(u);
  }

  // ---- stack ----
  std::size_t base() const { return marks_.empty() ? 0 : marks_.back(); }
  void push(NodePtr n) { stack_.push_back(std::move(n)); }
  NodePtr pop() {
    if (stack_.size() <= base()) corrupt("pops an empty stack");
    NodePtr n = std::move(stack_.back());
    stack_.pop_back();
    return n;
  }
  NodePtr top() const {
    if (stack_.size() <= base()) corrupt("reads an empty stack");
    return stack_.back();
  }
  std::vector<NodePtr> pop_mark() {
    if (marks_.empty()) corrupt("has no MARK to pop");
    const std::size_t m = marks_.back();
    marks_.pop_back();
    std::vector<NodePtr> items(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return items;
  }
  std::uint32_t memo_next() { return static_cast<std::uint32_t>(memo_.size()); }
  NodePtr memo_get(std::uint32_t idx) const {
    auto it = memo_.find(idx);
    if (it == memo_.end()) corrupt("reads memo entry " + std::to_string(idx) + " before it is set");
    return it->second;
  }

  void push_bool(bool v) {
    auto n = make(Node::Type::kBool);
    n->b = v;
    push(n);
  }
  void push_int(std::int64_t v) {
    auto n = make(Node::Type::kInt);
    n->i = v;
    push(n);
  }
  void push_str(std::uint64_t len) {
    const unsigned char* p = bytes(len);
    auto n = make(Node::Type::kString);
    n->s.assign(reinterpret_cast<const char*>(p), static_cast<std::size_t>(len));
    push(n);
  }
  void push_bytes(std::uint64_t len) {
    const unsigned char* p = bytes(len);
    auto n = make(Node::Type::kBytes);
    n->s.assign(reinterpret_cast<const char*>(p), static_cast<std::size_t>(len));
    push(n);
  }

  void push_global(const std::string& module, const std::string& name) {
    GlobalKind kind;
    c10::ScalarType dtype = at::kFloat;
    if (module == "torch._utils" && name == "_rebuild_tensor_v2") {
      kind = GlobalKind::kRebuildTensor;
    } else if (module == "torch._utils" && name == "_rebuild_parameter") {
      kind = GlobalKind::kRebuildParameter;
    } else if (module == "collections" && name == "OrderedDict") {
      kind = GlobalKind::kOrderedDict;
    } else if (module == "torch" && dtype_from_storage_type(name, &dtype)) {
      kind = GlobalKind::kStorageType;
    } else if (module == "_codecs" && name == "encode") {
      kind = GlobalKind::kCodecsEncode;
    } else if ((module == "__builtin__" || module == "builtins") && name == "bytes") {
      kind = GlobalKind::kBytes;
    } else {
      refuse_global(module, name);
    }
    auto n = make(Node::Type::kGlobal);
    n->s = module + " " + name;
    n->i = static_cast<std::int64_t>(kind);
    n->tensor.storage = static_cast<std::size_t>(dtype);  // storage dtype for kStorageType
    push(n);
  }

  NodePtr list_target(const char* op) const {
    NodePtr t = top();
    if (t->type != Node::Type::kList) {
      corrupt(std::string(op) + " targets a " + node_type_name(t->type) + ", not a list");
    }
    return t;
  }
  NodePtr dict_target(const char* op) const {
    NodePtr t = top();
    if (t->type != Node::Type::kDict) {
      corrupt(std::string(op) + " targets a " + node_type_name(t->type) + ", not a dict");
    }
    return t;
  }
  void set_items(const NodePtr& dict, const std::vector<NodePtr>& items) {
    if (items.size() % 2) corrupt("sets a dict item without a value");
    for (std::size_t i = 0; i < items.size(); i += 2) {
      check_plain(items[i]);
      check_plain(items[i + 1]);
      dict->pairs.emplace_back(items[i], items[i + 1]);
    }
  }
  void check_plain(const NodePtr& n) const {
    if (n->type == Node::Type::kGlobal) {
      SMP_THROW(UnsafeLoadError, "checkpoint file '", file_, "': data.pkl stores the global '",
                n->s, "' itself as a value (at byte ", op_pos_, "); ", kRefuseHint);
    }
    if (n->type == Node::Type::kStorage) {
      SMP_THROW(UnsafeLoadError, "checkpoint file '", file_,
                "': data.pkl stores a bare storage (at byte ", op_pos_,
                "); smp reads tensors, not storages; ", kRefuseHint);
    }
  }
  void check_result(const NodePtr& n) const { check_plain(n); }

  std::int64_t int_arg(const NodePtr& n, const char* what) const {
    if (n->type != Node::Type::kInt) {
      corrupt(std::string("has a ") + node_type_name(n->type) + " where " + what +
              " must be an int");
    }
    return n->i;
  }
  std::vector<std::int64_t> int_tuple(const NodePtr& n, const char* what) const {
    if (n->type != Node::Type::kTuple && n->type != Node::Type::kList) {
      corrupt(std::string("has a ") + node_type_name(n->type) + " where " + what +
              " must be a tuple");
    }
    std::vector<std::int64_t> out;
    for (const auto& x : n->items) out.push_back(int_arg(x, what));
    return out;
  }

  NodePtr persistent_load(const NodePtr& pid) {
    if (pid->type != Node::Type::kTuple || pid->items.size() != 5 ||
        pid->items[0]->type != Node::Type::kString || pid->items[0]->s != "storage") {
      SMP_THROW(UnsafeLoadError, "checkpoint file '", file_,
                "': data.pkl has a persistent id that is not a ('storage', type, key, location, "
                "numel) tuple (at byte ", op_pos_, "); ", kRefuseHint);
    }
    const NodePtr& type = pid->items[1];
    if (type->type != Node::Type::kGlobal ||
        static_cast<GlobalKind>(type->i) != GlobalKind::kStorageType) {
      corrupt("has a persistent id whose storage type is not a torch storage class");
    }
    const NodePtr& key = pid->items[2];
    const NodePtr& location = pid->items[3];
    if (key->type != Node::Type::kString || location->type != Node::Type::kString) {
      corrupt("has a persistent id whose key or location is not a str");
    }
    const std::int64_t numel = int_arg(pid->items[4], "a storage size");
    if (numel < 0) corrupt("has a storage with a negative size");
    const auto dtype = static_cast<c10::ScalarType>(type->tensor.storage);
    auto it = storage_index_.find(key->s);
    std::size_t index;
    if (it != storage_index_.end()) {
      index = it->second;
      const UnpickledStorage& s = storages_[index];
      if (s.dtype != dtype || s.numel != static_cast<std::uint64_t>(numel)) {
        corrupt("uses storage '" + key->s + "' with two different types or sizes");
      }
    } else {
      index = storages_.size();
      UnpickledStorage s;
      s.key = key->s;
      s.dtype = dtype;
      s.numel = static_cast<std::uint64_t>(numel);
      s.location = location->s;
      storages_.push_back(std::move(s));
      storage_index_.emplace(key->s, index);
    }
    auto n = make(Node::Type::kStorage);
    n->storage = index;
    return n;
  }

  NodePtr reduce(const NodePtr& func, const NodePtr& args) {
    if (func->type != Node::Type::kGlobal) {
      SMP_THROW(UnsafeLoadError, "checkpoint file '", file_, "': data.pkl calls a ",
                node_type_name(func->type), " (REDUCE at byte ", op_pos_,
                "), which is not an allowed function; ", kRefuseHint);
    }
    if (args->type != Node::Type::kTuple) corrupt("calls a function without an argument tuple");
    const auto& a = args->items;
    switch (static_cast<GlobalKind>(func->i)) {
      case GlobalKind::kOrderedDict: {
        if (!a.empty()) corrupt("calls OrderedDict with arguments");
        auto n = make(Node::Type::kDict);
        n->ordered = true;
        return n;
      }
      case GlobalKind::kRebuildTensor: {
        if (a.size() < 6 || a.size() > 7) corrupt("calls _rebuild_tensor_v2 with a wrong arity");
        if (a[0]->type != Node::Type::kStorage) {
          corrupt("calls _rebuild_tensor_v2 on something that is not a storage");
        }
        auto n = make(Node::Type::kTensor);
        n->tensor.storage = a[0]->storage;
        n->tensor.storage_offset = int_arg(a[1], "a storage offset");
        n->tensor.size = int_tuple(a[2], "a tensor size");
        n->tensor.stride = int_tuple(a[3], "a tensor stride");
        if (n->tensor.size.size() != n->tensor.stride.size()) {
          corrupt("has a tensor whose size and stride differ in length");
        }
        if (a[4]->type != Node::Type::kBool) corrupt("has a non-bool requires_grad");
        n->tensor.requires_grad = a[4]->b;
        if (a[5]->type != Node::Type::kDict || !a[5]->pairs.empty()) {
          SMP_THROW(UnsafeLoadError, "checkpoint file '", file_,
                    "': data.pkl has a tensor with backward hooks (at byte ", op_pos_,
                    "); hooks are code, and ", kRefuseHint);
        }
        validate_view(n->tensor);
        return n;
      }
      case GlobalKind::kRebuildParameter: {
        if (a.size() != 3 || a[0]->type != Node::Type::kTensor ||
            a[1]->type != Node::Type::kBool) {
          corrupt("calls _rebuild_parameter with wrong arguments");
        }
        if (a[2]->type != Node::Type::kDict || !a[2]->pairs.empty()) {
          SMP_THROW(UnsafeLoadError, "checkpoint file '", file_,
                    "': data.pkl has a parameter with backward hooks (at byte ", op_pos_,
                    "); hooks are code, and ", kRefuseHint);
        }
        auto n = std::make_shared<Node>(*a[0]);
        n->tensor.requires_grad = a[1]->b;
        return n;
      }
      case GlobalKind::kCodecsEncode: {
        if (a.size() != 2 || a[0]->type != Node::Type::kString ||
            a[1]->type != Node::Type::kString || (a[1]->s != "latin1" && a[1]->s != "latin-1")) {
          SMP_THROW(CheckpointError, "checkpoint file '", file_,
                    "': data.pkl calls _codecs.encode with arguments other than (str, 'latin1') "
                    "(at byte ", op_pos_, "); smp reads only the bytes encoding torch.save uses");
        }
        auto n = make(Node::Type::kBytes);
        n->s = latin1(a[0]->s);
        return n;
      }
      case GlobalKind::kBytes: {
        if (!a.empty()) corrupt("calls bytes with arguments");
        return make(Node::Type::kBytes);
      }
      case GlobalKind::kStorageType:
        SMP_THROW(UnsafeLoadError, "checkpoint file '", file_, "': data.pkl calls '", func->s,
                  "' (at byte ", op_pos_, "); legacy storage construction is not supported; ",
                  kRefuseHint);
    }
    corrupt("calls an unknown function");
  }

  std::string latin1(const std::string& utf8) const {
    std::string out;
    out.reserve(utf8.size());
    const auto* p = reinterpret_cast<const unsigned char*>(utf8.data());
    for (std::size_t i = 0; i < utf8.size();) {
      if (p[i] < 0x80) {
        out += static_cast<char>(p[i++]);
      } else if ((p[i] & 0xE0) == 0xC0 && i + 1 < utf8.size()) {
        const unsigned cp = ((p[i] & 0x1Fu) << 6) | (p[i + 1] & 0x3Fu);
        if (cp > 0xFF) corrupt("encodes bytes with a character outside latin-1");
        out += static_cast<char>(cp);
        i += 2;
      } else {
        corrupt("encodes bytes with a character outside latin-1");
      }
    }
    return out;
  }

  void validate_view(const UnpickledTensor& t) const {
    const UnpickledStorage& s = storages_.at(t.storage);
    if (t.storage_offset < 0) corrupt("has a tensor with a negative storage offset");
    if (t.size.size() != t.stride.size()) corrupt("has a tensor whose size and stride differ in length");
    std::int64_t numel = 1;
    std::int64_t last = t.storage_offset;
    bool overflow = false;
    for (std::size_t i = 0; i < t.size.size(); ++i) {
      if (t.size[i] < 0 || t.stride[i] < 0) corrupt("has a tensor with a negative size or stride");
      std::int64_t reach = 0;
      overflow |= __builtin_mul_overflow(numel, t.size[i], &numel);
      if (t.size[i] > 0) {
        overflow |= __builtin_mul_overflow(t.size[i] - 1, t.stride[i], &reach);
        overflow |= __builtin_add_overflow(last, reach, &last);
      }
    }
    if (overflow) {
      corrupt("has a tensor whose size x stride overflows 64 bits (storage '" + s.key + "')");
    }
    if (numel > 0 && static_cast<std::uint64_t>(last) >= s.numel) {
      corrupt("has a tensor that reaches past the end of its storage '" + s.key + "'");
    }
  }

  const std::string& d_;
  const std::string& file_;
  std::size_t pos_ = 0;
  std::size_t op_pos_ = 0;
  std::vector<NodePtr> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<std::uint32_t, NodePtr> memo_;
  std::vector<UnpickledStorage> storages_;
  std::map<std::string, std::size_t> storage_index_;
};

// ---- conversion -----------------------------------------------------------

std::string key_component(const NodePtr& key) {
  if (key->type == Node::Type::kString) return key->s;
  if (key->type == Node::Type::kInt) return std::to_string(key->i);
  // Same rendering as the writer's path_component (Value::repr).
  struct Local {
    static Value plain(const NodePtr& n, std::size_t depth = 0) {
      if (depth > kMaxNesting) return Value("<...>");
      switch (n->type) {
        case Node::Type::kNone: return Value();
        case Node::Type::kBool: return Value(n->b);
        case Node::Type::kInt: return Value(n->i);
        case Node::Type::kFloat: return Value(n->f);
        case Node::Type::kString: return Value(n->s);
        case Node::Type::kBytes: return Value::bytes(n->s);
        case Node::Type::kTuple: {
          Value::Items items;
          for (const auto& x : n->items) items.push_back(plain(x, depth + 1));
          return Value::tuple(std::move(items));
        }
        default: return Value("<" + std::string(node_type_name(n->type)) + ">");
      }
    }
  };
  return Local::plain(key).repr();
}

void walk(const NodePtr& n, std::vector<std::string>& path,
          std::unordered_set<const Node*>& active, Budget& budget,
          const std::function<void(const std::vector<std::string>&, const UnpickledTensor&)>& fn,
          const std::string& file) {
  budget.spend(1);
  if (n->type == Node::Type::kTensor) {
    fn(path, n->tensor);
    return;
  }
  if (n->type != Node::Type::kList && n->type != Node::Type::kTuple &&
      n->type != Node::Type::kDict) {
    return;
  }
  if (!active.insert(n.get()).second || active.size() > kMaxNesting) {
    SMP_THROW(CheckpointError, "checkpoint file '", file, "': the object at '", join_path(path),
              "' contains itself (or nests deeper than 5000 levels); smp checkpoints hold trees");
  }
  if (n->type == Node::Type::kDict) {
    for (const auto& kv : n->pairs) {
      path.push_back(key_component(kv.first));
      budget.spend(path.back().size());
      walk(kv.second, path, active, budget, fn, file);
      path.pop_back();
    }
    if (n->attributes) {
      path.push_back("__dict__");
      walk(n->attributes, path, active, budget, fn, file);
      path.pop_back();
    }
  } else {
    for (std::size_t i = 0; i < n->items.size(); ++i) {
      path.push_back(std::to_string(i));
      walk(n->items[i], path, active, budget, fn, file);
      path.pop_back();
    }
  }
  active.erase(n.get());
}

class Converter {
 public:
  Converter(const std::vector<at::Tensor>& storages, const std::string& file,
            std::size_t source_bytes)
      : storages_(storages), file_(file), budget_(source_bytes, file) {}

  Value convert(const NodePtr& n) {
    budget_.spend(1 + ((n->type == Node::Type::kString || n->type == Node::Type::kBytes)
                           ? n->s.size()
                           : 0));
    switch (n->type) {
      case Node::Type::kNone: return Value();
      case Node::Type::kBool: return Value(n->b);
      case Node::Type::kInt: return Value(n->i);
      case Node::Type::kFloat: return Value(n->f);
      case Node::Type::kString: return Value(n->s);
      case Node::Type::kBytes: return Value::bytes(n->s);
      case Node::Type::kTensor: return Value(tensor(n));
      case Node::Type::kGlobal:
      case Node::Type::kStorage:
        SMP_THROW(UnsafeLoadError, "checkpoint file '", file_, "': data.pkl holds a bare ",
                  node_type_name(n->type), "; ", kRefuseHint);
      default: break;
    }
    if (!active_.insert(n.get()).second || active_.size() > kMaxNesting) {
      SMP_THROW(CheckpointError, "checkpoint file '", file_,
                "': an object contains itself (or nests deeper than 5000 levels); smp "
                "checkpoints hold trees");
    }
    Value out;
    if (n->type == Node::Type::kDict) {
      Value::Pairs pairs;
      pairs.reserve(n->pairs.size());
      for (const auto& kv : n->pairs) pairs.emplace_back(convert(kv.first), convert(kv.second));
      out = n->ordered ? Value::ordered_dict(std::move(pairs)) : Value::dict(std::move(pairs));
      if (n->attributes) out.set_attributes(convert(n->attributes));
    } else {
      Value::Items items;
      items.reserve(n->items.size());
      for (const auto& x : n->items) items.push_back(convert(x));
      out = n->type == Node::Type::kList ? Value::list(std::move(items))
                                         : Value::tuple(std::move(items));
    }
    active_.erase(n.get());
    return out;
  }

 private:
  at::Tensor tensor(const NodePtr& n) {
    auto it = tensors_.find(n.get());
    if (it != tensors_.end()) return it->second;
    const UnpickledTensor& t = n->tensor;
    const at::Tensor& storage = storages_.at(t.storage);
    at::Tensor out = storage.as_strided(t.size, t.stride, t.storage_offset);
    if (t.requires_grad) out.set_requires_grad(true);
    tensors_.emplace(n.get(), out);
    return out;
  }

  const std::vector<at::Tensor>& storages_;
  const std::string& file_;
  Budget budget_;
  std::unordered_set<const Node*> active_;
  std::unordered_map<const Node*, at::Tensor> tensors_;
};

}  // namespace

Unpickled unpickle(const std::string& data, const std::string& file) {
  return Unpickler(data, file).run();
}

void for_each_tensor(
    const Unpickled& u, const std::string& file,
    const std::function<void(const std::vector<std::string>&, const UnpickledTensor&)>& fn) {
  std::vector<std::string> path;
  std::unordered_set<const Node*> active;
  Budget budget(u.source_bytes, file);
  walk(u.root, path, active, budget, fn, file);
}

Value to_value(const Unpickled& u, const std::vector<at::Tensor>& storages,
               const std::string& file) {
  return Converter(storages, file, u.source_bytes).convert(u.root);
}

Node::~Node() {
  // Children owned only by this node are emptied before they die, so no
  // destructor recurses: the work list holds what is still to be taken apart.
  std::vector<NodePtr> work;
  auto take = [&work](Node& n) {
    for (auto& x : n.items) work.push_back(std::move(x));
    for (auto& kv : n.pairs) {
      work.push_back(std::move(kv.first));
      work.push_back(std::move(kv.second));
    }
    if (n.attributes) work.push_back(std::move(n.attributes));
    n.items.clear();
    n.pairs.clear();
  };
  take(*this);
  while (!work.empty()) {
    NodePtr p = std::move(work.back());
    work.pop_back();
    if (p && p.use_count() == 1) take(*p);
  }
}

}  // namespace internal
}  // namespace ckpt
}  // namespace smp

#include "checkpoint/pickle_writer.h"

#include "checkpoint/value_util.h"

#include <cstring>
#include <map>
#include <tuple>
#include <unordered_map>

#include "smp/core/error.h"

namespace smp {
namespace ckpt {
namespace internal {

std::string path_component(const Value& key) {
  if (key.is_string()) return key.as_string();
  if (key.is_int()) return std::to_string(key.as_int());
  return key.repr();
}

std::string join_path(const std::vector<std::string>& path) {
  if (path.empty()) return "<root>";
  std::string out;
  for (std::size_t i = 0; i < path.size(); ++i) {
    if (i) out += '/';
    out += path[i];
  }
  return out;
}

namespace {


bool valid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    std::size_t len;
    std::uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > n) return false;
    for (std::size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        cp > 0x10FFFF) {
      return false;
    }
    // Surrogates are accepted: Python pickles str with 'surrogatepass'.
    i += len;
  }
  return true;
}

/// Identity of a tensor's bytes: storage, offset, layout, dtype, device.
using ViewKey = std::tuple<const void*, std::int64_t, std::vector<std::int64_t>,
                           std::vector<std::int64_t>, int, std::string>;

class Pickler {
 public:
  Pickled run(const Value& object) {
    out_.data += '\x80';
    out_.data += '\x02';
    save(object);
    out_.data += '.';
    return std::move(out_);
  }

 private:
  std::string& b() { return out_.data; }

  void put(std::uint32_t idx) {
    if (idx < 256) {
      b() += 'q';
      b() += static_cast<char>(idx);
    } else {
      b() += 'r';
      for (int i = 0; i < 4; ++i) b() += static_cast<char>((idx >> (8 * i)) & 0xFF);
    }
  }
  std::uint32_t memoize() {
    const std::uint32_t idx = memo_++;
    put(idx);
    return idx;
  }
  void get(std::uint32_t idx) {
    if (idx < 256) {
      b() += 'h';
      b() += static_cast<char>(idx);
    } else {
      b() += 'j';
      for (int i = 0; i < 4; ++i) b() += static_cast<char>((idx >> (8 * i)) & 0xFF);
    }
  }

  void global(const std::string& module, const std::string& name) {
    const std::string full = module + "\n" + name + "\n";
    auto it = globals_.find(full);
    if (it != globals_.end()) {
      get(it->second);
      return;
    }
    b() += 'c';
    b() += full;
    globals_[full] = memoize();
  }

  void save_int(std::int64_t v) {
    if (v >= 0 && v <= 0xFF) {
      b() += 'K';
      b() += static_cast<char>(v);
    } else if (v >= 0 && v <= 0xFFFF) {
      b() += 'M';
      b() += static_cast<char>(v & 0xFF);
      b() += static_cast<char>((v >> 8) & 0xFF);
    } else if (v >= -2147483648LL && v <= 2147483647LL) {
      b() += 'J';
      const auto u = static_cast<std::uint32_t>(static_cast<std::int32_t>(v));
      for (int i = 0; i < 4; ++i) b() += static_cast<char>((u >> (8 * i)) & 0xFF);
    } else {
      // LONG1: minimal little-endian two's complement, as pickle.encode_long.
      const std::uint64_t mag = v < 0 ? static_cast<std::uint64_t>(-(v + 1)) + 1
                                      : static_cast<std::uint64_t>(v);
      int bit_length = 0;
      for (std::uint64_t m = mag; m; m >>= 1) ++bit_length;
      std::size_t n = static_cast<std::size_t>(bit_length >> 3) + 1;
      unsigned char bytes[9];
      const auto u = static_cast<std::uint64_t>(v);
      for (int i = 0; i < 8; ++i) bytes[i] = static_cast<unsigned char>((u >> (8 * i)) & 0xFF);
      bytes[8] = v < 0 ? 0xFF : 0x00;
      if (v < 0 && n > 1 && bytes[n - 1] == 0xFF && (bytes[n - 2] & 0x80) != 0) --n;
      b() += '\x8a';
      b() += static_cast<char>(n);
      b().append(reinterpret_cast<const char*>(bytes), n);
    }
  }

  void save_float(double d) {
    std::uint64_t u;
    std::memcpy(&u, &d, sizeof(u));
    b() += 'G';
    for (int i = 7; i >= 0; --i) b() += static_cast<char>((u >> (8 * i)) & 0xFF);
  }

  void save_str_raw(const std::string& utf8) {
    b() += 'X';
    const auto n = static_cast<std::uint32_t>(utf8.size());
    SMP_CHECK(utf8.size() <= 0xFFFFFFFFu, CheckpointError, "string of ", utf8.size(),
              " bytes at '", join_path(path_), "' is too long for a checkpoint (4 GiB max)");
    for (int i = 0; i < 4; ++i) b() += static_cast<char>((n >> (8 * i)) & 0xFF);
    b() += utf8;
  }

  void save_str(const std::string& s) {
    SMP_CHECK(valid_utf8(s), CheckpointError, "the str at '", join_path(path_),
              "' is not valid UTF-8; torch.load could not read it back. Store binary data as "
              "bytes (Value::bytes)");
    save_str_raw(s);
    memoize();
  }

  void save_bytes(const std::string& data) {
    // Protocol 2 pickles bytes as _codecs.encode(data.decode('latin1'), 'latin1').
    global("_codecs", "encode");
    std::string utf8;
    utf8.reserve(data.size() * 2);
    for (unsigned char c : data) {
      if (c < 0x80) {
        utf8 += static_cast<char>(c);
      } else {
        utf8 += static_cast<char>(0xC0 | (c >> 6));
        utf8 += static_cast<char>(0x80 | (c & 0x3F));
      }
    }
    save_str_raw(utf8);
    memoize();
    save_str_raw("latin1");
    memoize();
    b() += '\x86';  // TUPLE2
    memoize();
    b() += 'R';
    memoize();
  }

  void save_items(const Value::Items& items, bool list) {
    if (list) {
      b() += ']';
      memoize();
      for (std::size_t start = 0; start < items.size(); start += 1000) {
        const std::size_t end = std::min(items.size(), start + 1000);
        if (end - start > 1) b() += '(';
        for (std::size_t i = start; i < end; ++i) {
          path_.push_back(std::to_string(i));
          save(items[i]);
          path_.pop_back();
        }
        b() += end - start > 1 ? 'e' : 'a';
      }
      return;
    }
    if (items.empty()) {
      b() += ')';
      return;
    }
    if (items.size() > 3) b() += '(';
    for (std::size_t i = 0; i < items.size(); ++i) {
      path_.push_back(std::to_string(i));
      save(items[i]);
      path_.pop_back();
    }
    switch (items.size()) {
      case 1: b() += '\x85'; break;
      case 2: b() += '\x86'; break;
      case 3: b() += '\x87'; break;
      default: b() += 't'; break;
    }
    memoize();
  }

  void save_pairs(const Value::Pairs& pairs) {
    for (std::size_t start = 0; start < pairs.size(); start += 1000) {
      const std::size_t end = std::min(pairs.size(), start + 1000);
      if (end - start > 1) b() += '(';
      for (std::size_t i = start; i < end; ++i) {
        save(pairs[i].first);
        path_.push_back(path_component(pairs[i].first));
        save(pairs[i].second);
        path_.pop_back();
      }
      b() += end - start > 1 ? 'u' : 's';
    }
  }

  void save_dict(const Value& v) {
    if (!v.ordered()) {
      b() += '}';
      memoize();
      save_pairs(v.pairs());
      return;
    }
    global("collections", "OrderedDict");
    b() += ')';
    b() += 'R';
    memoize();
    save_pairs(v.pairs());
    if (!v.attributes().is_none()) {
      path_.push_back("__dict__");
      save(v.attributes());
      path_.pop_back();
      b() += 'b';  // BUILD
    }
  }

  void save_tensor(const Value& v) {
    const at::Tensor& t = v.tensor();
    const c10::ScalarType dtype = t.scalar_type();
    const char* stype = storage_type_name(dtype);
    SMP_CHECK(stype != nullptr, CheckpointError, "tensor at '", join_path(path_), "' has dtype ",
              c10::toString(dtype),
              ", which smp checkpoints do not store; convert it (e.g. .to(torch.float32))");

    PickledTensor leaf;
    leaf.path = path_;
    leaf.shape = t.sizes().vec();
    leaf.shard = v.shard();

    const void* impl = t.unsafeGetTensorImpl();
    auto seen = tensors_.find(impl);
    if (seen != tensors_.end()) {
      get(seen->second.first);
      leaf.storage = seen->second.second;
      out_.tensors.push_back(std::move(leaf));
      return;
    }

    const void* storage_id = t.storage().unsafeGetStorageImpl();
    ViewKey view{storage_id, t.storage_offset(), t.sizes().vec(), t.strides().vec(),
                 static_cast<int>(dtype), t.device().str()};
    std::size_t storage_index;
    auto shared = views_.find(view);
    if (shared != views_.end()) {
      storage_index = shared->second;
    } else {
      storage_index = out_.storages.size();
      PickledStorage s;
      s.key = std::to_string(storage_index);
      s.tensor = t;
      s.dtype = dtype;
      s.numel = static_cast<std::uint64_t>(t.numel());
      s.nbytes = s.numel * t.element_size();
      out_.storages.push_back(std::move(s));
      views_.emplace(std::move(view), storage_index);
    }
    const PickledStorage& s = out_.storages[storage_index];

    global("torch._utils", "_rebuild_tensor_v2");
    b() += '(';
    b() += '(';
    if (storage_memo_) {
      get(*storage_memo_);
    } else {
      save_str_raw("storage");
      storage_memo_ = memoize();
    }
    global("torch", stype);
    save_str_raw(s.key);
    memoize();
    if (cpu_memo_) {
      get(*cpu_memo_);
    } else {
      save_str_raw("cpu");
      cpu_memo_ = memoize();
    }
    save_int(static_cast<std::int64_t>(s.numel));
    b() += 't';
    memoize();
    b() += 'Q';  // BINPERSID
    save_int(0);  // storage_offset
    // size and contiguous stride
    const auto sizes = t.sizes();
    std::vector<Value> size_items, stride_items;
    std::vector<std::int64_t> strides(sizes.size());
    std::int64_t acc = 1;
    for (std::size_t i = sizes.size(); i-- > 0;) {
      strides[i] = acc;
      acc *= std::max<std::int64_t>(sizes[i], 1);
    }
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      size_items.emplace_back(sizes[i]);
      stride_items.emplace_back(strides[i]);
    }
    save_items(size_items, false);
    save_items(stride_items, false);
    b() += t.requires_grad() ? '\x88' : '\x89';
    global("collections", "OrderedDict");
    b() += ')';
    b() += 'R';
    memoize();
    b() += 't';
    memoize();
    b() += 'R';
    const std::uint32_t idx = memoize();
    tensors_.emplace(impl, std::make_pair(idx, storage_index));
    leaf.storage = storage_index;
    out_.tensors.push_back(std::move(leaf));
  }

  void save(const Value& v) {
    if (++depth_ > 5000) {
      SMP_THROW(CheckpointError, "object nested deeper than 5000 levels at '",
                join_path(path_), "' cannot be checkpointed");
    }
    switch (v.kind()) {
      case Value::Kind::kNone: b() += 'N'; break;
      case Value::Kind::kBool: b() += v.as_bool() ? '\x88' : '\x89'; break;
      case Value::Kind::kInt: save_int(v.as_int()); break;
      case Value::Kind::kFloat: save_float(v.as_float()); break;
      case Value::Kind::kString: save_str(v.as_string()); break;
      case Value::Kind::kBytes: save_bytes(v.as_bytes()); break;
      case Value::Kind::kList: save_items(v.items(), true); break;
      case Value::Kind::kTuple: save_items(v.items(), false); break;
      case Value::Kind::kDict: save_dict(v); break;
      case Value::Kind::kTensor: save_tensor(v); break;
    }
    --depth_;
  }

  Pickled out_;
  std::uint32_t memo_ = 0;
  int depth_ = 0;
  std::vector<std::string> path_;
  std::map<std::string, std::uint32_t> globals_;
  std::optional<std::uint32_t> storage_memo_;
  std::optional<std::uint32_t> cpu_memo_;
  std::unordered_map<const void*, std::pair<std::uint32_t, std::size_t>> tensors_;
  std::map<ViewKey, std::size_t> views_;
};

}  // namespace

Pickled pickle_object(const Value& object) { return Pickler().run(object); }

}  // namespace internal
}  // namespace ckpt
}  // namespace smp

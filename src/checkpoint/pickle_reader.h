#pragma once
/// A restricted unpickler for the data.pkl of torch.save archives (internal).
///
/// It executes nothing. It knows the opcodes torch.save emits for state dicts
/// and optimizer state dicts (protocol 2, plus the few protocol 3/4 ones that
/// carry plain data) and exactly these globals, interpreted by the reader
/// itself: torch._utils._rebuild_tensor_v2 / _rebuild_parameter (tensors),
/// collections.OrderedDict, torch.<T>Storage (storage types of persistent ids),
/// _codecs.encode and builtins.bytes (bytes). Any other global or opcode throws
/// CheckpointError naming the file and the offending global or opcode.

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "smp/checkpoint/value.h"

namespace smp {
namespace ckpt {
namespace internal {

/// A storage referenced by a persistent id: record "data/<key>".
struct UnpickledStorage {
  std::string key;
  c10::ScalarType dtype;
  std::uint64_t numel = 0;
  std::string location;
};

/// A tensor of the pickle: a view of one storage.
struct UnpickledTensor {
  std::size_t storage = 0;
  std::int64_t storage_offset = 0;
  std::vector<std::int64_t> size;
  std::vector<std::int64_t> stride;
  bool requires_grad = false;
};

/// A node of the unpickled object graph. Containers hold shared nodes, so a
/// memoized object referenced twice is one node (tied tensors stay tied).
struct Node {
  Node() = default;
  Node(const Node&) = default;
  Node& operator=(const Node&) = default;
  /// Iterative: a hostile pickle nests objects arbitrarily deep, and a
  /// recursive destruction of the tree would overflow the stack.
  ~Node();

  enum class Type {
    kNone, kBool, kInt, kFloat, kString, kBytes, kList, kTuple, kDict, kTensor,
    // Intermediate objects that never reach a result.
    kGlobal, kStorage
  };
  Type type = Type::kNone;
  bool b = false;
  std::int64_t i = 0;
  double f = 0.0;
  std::string s;  // str, bytes, global "module name"
  std::vector<std::shared_ptr<Node>> items;
  std::vector<std::pair<std::shared_ptr<Node>, std::shared_ptr<Node>>> pairs;
  bool ordered = false;
  std::shared_ptr<Node> attributes;  // OrderedDict BUILD state
  UnpickledTensor tensor;
  std::size_t storage = 0;  // kStorage
};
using NodePtr = std::shared_ptr<Node>;

struct Unpickled {
  NodePtr root;
  std::vector<UnpickledStorage> storages;
  /// Size of the pickle; bounds the work of expanding shared (memo) nodes.
  std::size_t source_bytes = 0;
};

/// Objects nest at most this deep (deeper: CheckpointError naming the file).
constexpr std::size_t kMaxNesting = 5000;

/// The most nodes (plus bytes of strings) the expansion of a pickle of
/// `source_bytes` bytes may visit: memo references let a few bytes stand for
/// a whole subtree, so a tiny file could otherwise expand exponentially.
inline std::uint64_t expansion_budget(std::size_t source_bytes) {
  return (std::uint64_t{1} << 20) + 64 * static_cast<std::uint64_t>(source_bytes);
}

/// Parses a pickle. `file` names the checkpoint in error messages.
Unpickled unpickle(const std::string& data, const std::string& file);

/// Calls `fn(path, tensor)` for every tensor leaf, depth first (a tied tensor
/// once per leaf), with the same path components as the writer uses.
void for_each_tensor(
    const Unpickled& u, const std::string& file,
    const std::function<void(const std::vector<std::string>&, const UnpickledTensor&)>& fn);

/// Builds the Value; `storages[k]` is storage k as a 1-D tensor of its dtype.
/// The same tensor node becomes the same at::Tensor (tied weights stay tied).
Value to_value(const Unpickled& u, const std::vector<at::Tensor>& storages,
               const std::string& file);

}  // namespace internal
}  // namespace ckpt
}  // namespace smp

#include "smp/core/shard_spec.h"

#include <algorithm>
#include <sstream>

#include "smp/core/error.h"

namespace smp {

std::vector<std::int64_t> split_sizes(std::int64_t total, int parts) {
  SMP_CHECK(parts >= 1 && total >= 0, ConfigError, "cannot split ", total, " into ", parts,
            " parts");
  std::vector<std::int64_t> sizes(parts, total / parts);
  for (int i = 0; i < total % parts; ++i) ++sizes[i];
  return sizes;
}

std::int64_t split_offset(std::int64_t total, int parts, int index) {
  SMP_CHECK(index >= 0 && index < parts, ConfigError, "shard index ", index, " outside 0..",
            parts - 1);
  const std::int64_t base = total / parts, rem = total % parts;
  return index * base + std::min<std::int64_t>(index, rem);
}

ShardSpec ShardSpec::replicated(std::vector<std::int64_t> global_shape) {
  ShardSpec s;
  s.global_shape = std::move(global_shape);
  return s;
}

ShardSpec ShardSpec::split(std::vector<std::int64_t> global_shape, int dim, int num_shards,
                           int shard_index) {
  const int ndim = static_cast<int>(global_shape.size());
  if (dim < 0) dim += ndim;
  SMP_CHECK(dim >= 0 && dim < ndim, ConfigError, "split dimension ", dim,
            " is out of range for a tensor of ", ndim, " dimensions");
  SMP_CHECK(num_shards >= 1 && shard_index >= 0 && shard_index < num_shards, ConfigError,
            "shard index ", shard_index, " is outside 0..", num_shards - 1);
  ShardSpec s;
  s.global_shape = std::move(global_shape);
  s.split_dim = dim;
  s.num_shards = num_shards;
  s.shard_index = shard_index;
  return s;
}

std::int64_t ShardSpec::offset() const {
  if (is_replicated()) return 0;
  return split_offset(global_shape[split_dim], num_shards, shard_index);
}

std::vector<std::int64_t> ShardSpec::local_shape() const {
  std::vector<std::int64_t> shape = global_shape;
  if (!is_replicated()) shape[split_dim] = split_sizes(global_shape[split_dim], num_shards)[shard_index];
  return shape;
}

std::string ShardSpec::describe() const {
  std::ostringstream os;
  os << "[";
  for (std::size_t i = 0; i < global_shape.size(); ++i) os << (i ? ", " : "") << global_shape[i];
  os << "]";
  if (is_replicated()) {
    os << " replicated";
  } else {
    os << " split dim " << split_dim << " shard " << shard_index << "/" << num_shards << " (offset "
       << offset() << ", size " << local_shape()[split_dim] << ")";
  }
  return os.str();
}

}  // namespace smp

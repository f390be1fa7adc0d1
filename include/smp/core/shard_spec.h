#pragma once
/// The sharding data model: how one process's piece of a tensor relates to the
/// whole. A tensor is either replicated or split along one dimension into
/// `num_shards` contiguous pieces; uneven splits give the remainder to the
/// lowest shard indices (as smp v1 does across tensor-parallel ranks).
/// Checkpoints record a ShardSpec per tensor so that they can be resharded.

#include <cstdint>
#include <string>
#include <vector>

namespace smp {

/// Sizes of `parts` contiguous pieces of `total`, the remainder going to the
/// lowest indices: split_sizes(10, 4) = {3, 3, 2, 2}.
std::vector<std::int64_t> split_sizes(std::int64_t total, int parts);
/// Offset of piece `index` in that split.
std::int64_t split_offset(std::int64_t total, int parts, int index);

struct ShardSpec {
  std::vector<std::int64_t> global_shape;
  /// Dimension the tensor is split along; -1 when replicated.
  int split_dim = -1;
  int num_shards = 1;
  int shard_index = 0;

  static ShardSpec replicated(std::vector<std::int64_t> global_shape);
  /// Throws ConfigError when dim is out of range or index >= num_shards.
  static ShardSpec split(std::vector<std::int64_t> global_shape, int dim, int num_shards,
                         int shard_index);

  bool is_replicated() const { return split_dim < 0 || num_shards == 1; }
  /// Start of this shard along split_dim (0 when replicated).
  std::int64_t offset() const;
  /// This shard's shape.
  std::vector<std::int64_t> local_shape() const;
  /// "[1024, 512] split dim 1 shard 1/4 (offset 128, size 128)"
  std::string describe() const;
};

}  // namespace smp

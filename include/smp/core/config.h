#pragma once
/// The smp configuration (smp.init): the keys of the SageMaker model parallel
/// library v1, their defaults, types and validation.

#include <cstdint>
#include <map>
#include <string>
#include <variant>
#include <vector>

namespace smp {

/// One configuration value as given by the user (Python dict or JSON).
using ConfigValue = std::variant<bool, std::int64_t, double, std::string>;
using ConfigMap = std::map<std::string, ConfigValue>;

/// Name of the environment variable whose JSON object overrides the user's
/// config keys (as SageMaker passes hyperparameters).
inline constexpr const char* kConfigEnvVar = "SM_HP_MP_PARAMETERS";

struct Config {
  int pipeline_parallel_degree = 1;  ///< alias "partitions"
  int tensor_parallel_degree = 1;
  bool ddp = false;
  int microbatches = 1;
  std::string pipeline = "interleaved";  ///< "interleaved" | "simple"
  std::string placement_strategy = "cluster";  ///< "cluster" | "spread" | permutation of DPT
  bool shard_optimizer_state = false;
  bool prescaled_batch = false;
  bool auto_partition = true;
  int default_partition = 0;
  int active_microbatches = 0;  ///< resolved to pipeline_parallel_degree + 2 when not given
  bool fp16 = false;
  bool bf16 = false;
  // Keys smp v1 accepts that tune its own internals. Accepted and validated so that
  // existing scripts run; see docs/api.md for which of them have an effect.
  std::string optimize = "speed";  ///< "speed" | "memory"
  double memory_weight = 0.8;
  bool horovod = false;
  int ddp_port = 0;
  std::string ddp_dist_backend = "auto";  ///< "auto" | "nccl" | "gloo"
  int tensor_parallel_seed = 0;
  bool delayed_parameter_initialization = false;
  bool offload_activations = false;
  int activation_loading_horizon = 4;
  bool contiguous = true;
  bool load_partition = false;
  // Further keys of smp v1's parameter list. Those that ask for a feature smp
  // does not have (sharded_data_parallel_degree > 1, offload_activations,
  // horovod, herring, _sharded_data_parallelism_config) raise
  // NotSupportedError naming the key; the others are accepted without effect
  // and listed in no_effect_keys.
  bool skip_tracing = false;
  bool checkpoint_attentions = false;
  bool static_mode = false;
  bool fast_mode = false;
  bool match_weights = false;           ///< "_match_weights"
  bool fp32_grad_accumulation = false;  ///< "_fp32_grad_accumulation"
  int sharded_data_parallel_degree = 1;
  std::int64_t sdp_reduce_bucket_size = 500000000;
  std::int64_t sdp_param_persistence_threshold = 1000000;
  std::int64_t sdp_max_live_parameters = 1000000000;
  bool sdp_hierarchical_allgather = true;
  double sdp_gradient_clipping = 1.0;
  std::string sharded_data_parallelism_config;  ///< "_sharded_data_parallelism_config"
  bool deterministic_server = false;
  bool shard_offloaded_activations = true;  ///< "_shard_offloaded_activations"
  int task_level_activation_loading_horizon = 4;
  bool herring = false;
  std::string partition_file;
  bool predefined_hooks = true;
  double tolerance = 1.2;

  /// Keys the user gave (sorted) that smp accepts for compatibility with smp v1
  /// but that change nothing here; see no_effect_reason().
  std::vector<std::string> no_effect_keys;

  /// Why `key` has no effect in smp (empty for keys that do).
  static std::string no_effect_reason(const std::string& key);

  /// Builds a config from user keys, then applies the JSON object in
  /// SM_HP_MP_PARAMETERS (if set) on top. Throws ConfigError naming the key,
  /// the bad value and the valid choices (every unknown key at once), and
  /// NotSupportedError naming a key that asks for a feature smp lacks.
  static Config from_map(const ConfigMap& user, bool read_env = true);

  /// Parses a flat JSON object of strings, numbers and booleans. `source`
  /// names where it came from in error messages.
  static ConfigMap parse_json(const std::string& json, const std::string& source);

  /// Every key from_map accepts, sorted.
  static std::vector<std::string> valid_keys();

  /// The resolved configuration as a map (all keys, canonical names).
  ConfigMap to_map() const;

  /// Checks this config against the world size: a multiple of pp*tp, and ddp
  /// when there is more than one model replica. Throws ConfigError.
  void validate_world(int world_size) const;
};

/// Renders a value for messages: strings quoted, booleans true/false.
std::string to_string(const ConfigValue& value);

}  // namespace smp

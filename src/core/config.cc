#include "smp/core/config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

#include "smp/core/error.h"
#include "smp/core/placement.h"

namespace smp {
namespace {

// ---- typed setters ------------------------------------------------------

std::string type_name(const ConfigValue& v) {
  switch (v.index()) {
    case 0: return "bool";
    case 1: return "int";
    case 2: return "float";
    default: return "str";
  }
}

[[noreturn]] void bad_type(const std::string& key, const ConfigValue& v, const char* want) {
  SMP_THROW(ConfigError, "smp config key '", key, "' must be ", want, ", got ", type_name(v), " ",
            to_string(v));
}

int as_int(const std::string& key, const ConfigValue& v) {
  if (const auto* i = std::get_if<std::int64_t>(&v)) return static_cast<int>(*i);
  if (const auto* d = std::get_if<double>(&v)) {
    if (std::floor(*d) == *d) return static_cast<int>(*d);
  }
  bad_type(key, v, "an integer");
}

std::int64_t as_int64(const std::string& key, const ConfigValue& v) {
  if (const auto* i = std::get_if<std::int64_t>(&v)) return *i;
  if (const auto* d = std::get_if<double>(&v)) {
    // JSON writes v1's defaults as 5e8, 1e6: whole numbers given as floats.
    if (std::floor(*d) == *d && std::fabs(*d) < 9.0e18) return static_cast<std::int64_t>(*d);
  }
  bad_type(key, v, "an integer");
}

bool as_bool(const std::string& key, const ConfigValue& v) {
  if (const auto* b = std::get_if<bool>(&v)) return *b;
  if (const auto* s = std::get_if<std::string>(&v)) {
    // SageMaker hyperparameters sometimes arrive as strings.
    if (*s == "true" || *s == "True") return true;
    if (*s == "false" || *s == "False") return false;
  }
  bad_type(key, v, "a boolean");
}

double as_double(const std::string& key, const ConfigValue& v) {
  if (const auto* d = std::get_if<double>(&v)) return *d;
  if (const auto* i = std::get_if<std::int64_t>(&v)) return static_cast<double>(*i);
  bad_type(key, v, "a number");
}

std::string as_string(const std::string& key, const ConfigValue& v) {
  if (const auto* s = std::get_if<std::string>(&v)) return *s;
  bad_type(key, v, "a string");
}

void check_choice(const std::string& key, const std::string& value,
                  const std::vector<std::string>& choices) {
  if (std::find(choices.begin(), choices.end(), value) != choices.end()) return;
  std::string list;
  for (const auto& c : choices) list += (list.empty() ? "'" : ", '") + c + "'";
  SMP_THROW(ConfigError, "smp config key '", key, "' is '", value, "'; valid values: ", list);
}

void check_min(const std::string& key, int value, int min) {
  SMP_CHECK(value >= min, ConfigError, "smp config key '", key, "' is ", value, "; it must be >= ",
            min);
}

using Setter = std::function<void(Config&, const std::string&, const ConfigValue&)>;

const std::map<std::string, Setter>& setters() {
  static const std::map<std::string, Setter> table = {
      {"pipeline_parallel_degree",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.pipeline_parallel_degree = as_int(k, v);
         check_min(k, c.pipeline_parallel_degree, 1);
       }},
      {"partitions",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.pipeline_parallel_degree = as_int(k, v);
         check_min(k, c.pipeline_parallel_degree, 1);
       }},
      {"tensor_parallel_degree",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.tensor_parallel_degree = as_int(k, v);
         check_min(k, c.tensor_parallel_degree, 1);
       }},
      {"ddp", [](Config& c, const std::string& k, const ConfigValue& v) { c.ddp = as_bool(k, v); }},
      {"microbatches",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.microbatches = as_int(k, v);
         check_min(k, c.microbatches, 1);
       }},
      {"pipeline",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.pipeline = as_string(k, v);
         check_choice(k, c.pipeline, {"interleaved", "simple"});
       }},
      {"placement_strategy",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.placement_strategy = as_string(k, v);
         Placement::parse(c.placement_strategy);  // validates
       }},
      {"shard_optimizer_state",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.shard_optimizer_state = as_bool(k, v);
       }},
      {"prescaled_batch",
       [](Config& c, const std::string& k, const ConfigValue& v) { c.prescaled_batch = as_bool(k, v); }},
      {"auto_partition",
       [](Config& c, const std::string& k, const ConfigValue& v) { c.auto_partition = as_bool(k, v); }},
      {"default_partition",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.default_partition = as_int(k, v);
         check_min(k, c.default_partition, 0);
       }},
      {"active_microbatches",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.active_microbatches = as_int(k, v);
         check_min(k, c.active_microbatches, 1);
       }},
      {"fp16", [](Config& c, const std::string& k, const ConfigValue& v) { c.fp16 = as_bool(k, v); }},
      {"fp16_params",
       [](Config& c, const std::string& k, const ConfigValue& v) { c.fp16 = as_bool(k, v); }},
      {"bf16", [](Config& c, const std::string& k, const ConfigValue& v) { c.bf16 = as_bool(k, v); }},
      {"optimize",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.optimize = as_string(k, v);
         check_choice(k, c.optimize, {"speed", "memory"});
       }},
      {"memory_weight",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.memory_weight = as_double(k, v);
         SMP_CHECK(c.memory_weight >= 0.0 && c.memory_weight <= 1.0, ConfigError,
                   "smp config key 'memory_weight' is ", c.memory_weight,
                   "; it must be between 0 and 1");
       }},
      {"horovod", [](Config& c, const std::string& k, const ConfigValue& v) { c.horovod = as_bool(k, v); }},
      {"ddp_port",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.ddp_port = as_int(k, v);
         SMP_CHECK(c.ddp_port >= 0 && c.ddp_port < 65536, ConfigError,
                   "smp config key 'ddp_port' is ", c.ddp_port, "; it must be a TCP port (0-65535)");
       }},
      {"ddp_dist_backend",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.ddp_dist_backend = as_string(k, v);
         check_choice(k, c.ddp_dist_backend, {"auto", "nccl", "gloo", "smddp"});
         // smp v1's SageMaker collective library; smp picks its backend as with "auto".
         if (c.ddp_dist_backend == "smddp") c.ddp_dist_backend = "auto";
       }},
      {"tensor_parallel_seed",
       [](Config& c, const std::string& k, const ConfigValue& v) { c.tensor_parallel_seed = as_int(k, v); }},
      {"delayed_parameter_initialization",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.delayed_parameter_initialization = as_bool(k, v);
       }},
      {"offload_activations",
       [](Config& c, const std::string& k, const ConfigValue& v) { c.offload_activations = as_bool(k, v); }},
      {"activation_loading_horizon",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.activation_loading_horizon = as_int(k, v);
         check_min(k, c.activation_loading_horizon, 1);
       }},
      {"contiguous", [](Config& c, const std::string& k, const ConfigValue& v) { c.contiguous = as_bool(k, v); }},
      {"load_partition",
       [](Config& c, const std::string& k, const ConfigValue& v) { c.load_partition = as_bool(k, v); }},
      {"skip_tracing",
       [](Config& c, const std::string& k, const ConfigValue& v) { c.skip_tracing = as_bool(k, v); }},
      {"checkpoint_attentions",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.checkpoint_attentions = as_bool(k, v);
       }},
      {"static_mode",
       [](Config& c, const std::string& k, const ConfigValue& v) { c.static_mode = as_bool(k, v); }},
      {"fast_mode",
       [](Config& c, const std::string& k, const ConfigValue& v) { c.fast_mode = as_bool(k, v); }},
      {"_match_weights",
       [](Config& c, const std::string& k, const ConfigValue& v) { c.match_weights = as_bool(k, v); }},
      {"_fp32_grad_accumulation",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.fp32_grad_accumulation = as_bool(k, v);
       }},
      {"sharded_data_parallel_degree",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.sharded_data_parallel_degree = as_int(k, v);
         check_min(k, c.sharded_data_parallel_degree, 1);
       }},
      {"sdp_reduce_bucket_size",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.sdp_reduce_bucket_size = as_int64(k, v);
       }},
      {"sdp_param_persistence_threshold",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.sdp_param_persistence_threshold = as_int64(k, v);
       }},
      {"sdp_max_live_parameters",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.sdp_max_live_parameters = as_int64(k, v);
       }},
      {"sdp_hierarchical_allgather",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.sdp_hierarchical_allgather = as_bool(k, v);
       }},
      {"sdp_gradient_clipping",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.sdp_gradient_clipping = as_double(k, v);
       }},
      {"_sharded_data_parallelism_config",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.sharded_data_parallelism_config = as_string(k, v);
       }},
      {"deterministic_server",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.deterministic_server = as_bool(k, v);
       }},
      {"_shard_offloaded_activations",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.shard_offloaded_activations = as_bool(k, v);
       }},
      {"task_level_activation_loading_horizon",
       [](Config& c, const std::string& k, const ConfigValue& v) {
         c.task_level_activation_loading_horizon = as_int(k, v);
         check_min(k, c.task_level_activation_loading_horizon, 1);
       }},
      {"herring", [](Config& c, const std::string& k, const ConfigValue& v) { c.herring = as_bool(k, v); }},
      {"partition_file",
       [](Config& c, const std::string& k, const ConfigValue& v) { c.partition_file = as_string(k, v); }},
      {"predefined_hooks",
       [](Config& c, const std::string& k, const ConfigValue& v) { c.predefined_hooks = as_bool(k, v); }},
      {"tolerance",
       [](Config& c, const std::string& k, const ConfigValue& v) { c.tolerance = as_double(k, v); }},
  };
  return table;
}

// Keys of smp v1 that smp accepts but that change nothing here, with the reason.
const std::map<std::string, std::string>& no_effect_table() {
  static const std::map<std::string, std::string> table = {
      {"skip_tracing", "smp does not trace the model: stages are planned from the module tree"},
      {"checkpoint_attentions",
       "use smp.set_activation_checkpointing(module) for activation checkpointing"},
      {"static_mode", "an optimization of smp v1's execution server, which smp does not have"},
      {"fast_mode", "an optimization of smp v1's execution server, which smp does not have"},
      {"deterministic_server", "smp has no execution server; its pipeline schedule is fixed"},
      {"_match_weights", "smp's distributed modules always slice the original weights"},
      {"_fp32_grad_accumulation", "gradients accumulate in the parameters' dtype"},
      {"sdp_reduce_bucket_size", "sharded data parallelism is not supported"},
      {"sdp_param_persistence_threshold", "sharded data parallelism is not supported"},
      {"sdp_max_live_parameters", "sharded data parallelism is not supported"},
      {"sdp_hierarchical_allgather", "sharded data parallelism is not supported"},
      {"sdp_gradient_clipping",
       "sharded data parallelism is not supported; clip with torch.nn.utils.clip_grad_norm_"},
      {"_shard_offloaded_activations", "activation offloading is not supported"},
      {"task_level_activation_loading_horizon", "activation offloading is not supported"},
      {"activation_loading_horizon", "activation offloading is not supported"},
      {"partition_file", "a TensorFlow option of smp v1"},
      {"contiguous", "a TensorFlow option of smp v1"},
      {"load_partition", "a TensorFlow option of smp v1"},
      {"predefined_hooks",
       "smp has no built-in Hugging Face module hooks; register replacements with "
       "smp.tp_register_with_module"},
      {"tolerance", "pipeline stages are balanced by parameter count"},
      {"memory_weight", "pipeline stages are balanced by parameter count"},
      {"optimize", "smp's distributed transformer has one implementation"},
      {"delayed_parameter_initialization",
       "parameters are created when the module is built; see smp.delay_param_initialization"},
      {"ddp_port", "torch.distributed is initialized on smp's own store"},
  };
  return table;
}

// Keys whose value asks for a feature smp does not have: throws
// NotSupportedError naming the key and the alternative.
void check_supported(const Config& c, const ConfigMap& given) {
  auto value_of = [&given](const char* key) { return to_string(given.at(key)); };
  SMP_CHECK(c.sharded_data_parallel_degree == 1, NotSupportedError,
            "smp config key 'sharded_data_parallel_degree' is ",
            value_of("sharded_data_parallel_degree"),
            ": sharded data parallelism (smp v1's ZeRO-2D / MiCS) is not supported; use "
            "\"shard_optimizer_state\": True with \"ddp\": True (optimizer state sharded over "
            "RDP_GROUP) and tensor_parallel_degree / pipeline_parallel_degree to split the model");
  SMP_CHECK(c.sharded_data_parallelism_config.empty(), NotSupportedError,
            "smp config key '_sharded_data_parallelism_config' is ",
            value_of("_sharded_data_parallelism_config"),
            ": sharded data parallelism (ZeRO-2D) is not supported; remove the key and use "
            "\"shard_optimizer_state\": True with \"ddp\": True");
  SMP_CHECK(!c.offload_activations, NotSupportedError,
            "smp config key 'offload_activations' is true: activation offloading to the CPU is "
            "not supported; remove the key (or set it to false) and save activation memory with "
            "smp.set_activation_checkpointing(module) or a smaller 'active_microbatches'");
  SMP_CHECK(!c.horovod, NotSupportedError,
            "smp config key 'horovod' is true: data parallelism through Horovod is not "
            "supported; use \"ddp\": True");
  SMP_CHECK(!c.herring, NotSupportedError,
            "smp config key 'herring' is true: the herring data-parallel backend is not "
            "supported; use \"ddp\": True");
}

// ---- flat JSON -----------------------------------------------------------

[[noreturn]] void bad_json(const std::string& source, const std::string& text,
                           const std::string& what) {
  SMP_THROW(ConfigError, "cannot parse ", source, " as a JSON object of smp config keys: ", what,
            " in '", text, "'");
}

ConfigMap parse_flat_json(const std::string& text, const std::string& source) {
  nlohmann::ordered_json doc;
  try {
    doc = nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::ordered_json::exception& e) {
    bad_json(source, text, e.what());
  }
  if (!doc.is_object()) bad_json(source, text, std::string("expected an object, got ") + doc.type_name());
  ConfigMap out;
  for (const auto& kv : doc.items()) {
    const auto& v = kv.value();
    if (v.is_string()) {
      out[kv.key()] = v.get<std::string>();
    } else if (v.is_boolean()) {
      out[kv.key()] = v.get<bool>();
    } else if (v.is_number_unsigned()) {
      const auto u = v.get<std::uint64_t>();
      if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
        bad_json(source, text, "bad number " + v.dump() + " for key '" + kv.key() + "'");
      }
      out[kv.key()] = static_cast<std::int64_t>(u);
    } else if (v.is_number_integer()) {
      out[kv.key()] = v.get<std::int64_t>();
    } else if (v.is_number_float()) {
      out[kv.key()] = v.get<double>();
    } else {
      bad_json(source, text, "value of key '" + kv.key() + "' must be a string, number or boolean");
    }
  }
  return out;
}

}  // namespace

std::string to_string(const ConfigValue& value) {
  std::ostringstream os;
  std::visit(
      [&os](const auto& v) {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, bool>) {
          os << (v ? "true" : "false");
        } else if constexpr (std::is_same_v<T, std::string>) {
          os << "'" << v << "'";
        } else {
          os << v;
        }
      },
      value);
  return os.str();
}

std::string Config::no_effect_reason(const std::string& key) {
  const auto& table = no_effect_table();
  auto it = table.find(key);
  return it == table.end() ? std::string() : it->second;
}

std::vector<std::string> Config::valid_keys() {
  std::vector<std::string> keys;
  for (const auto& kv : setters()) keys.push_back(kv.first);
  return keys;  // std::map keeps them sorted
}

ConfigMap Config::parse_json(const std::string& json, const std::string& source) {
  return parse_flat_json(json, source);
}

Config Config::from_map(const ConfigMap& user, bool read_env) {
  ConfigMap merged = user;
  if (read_env) {
    if (const char* env = std::getenv(kConfigEnvVar); env != nullptr && *env != '\0') {
      for (auto& kv : parse_json(env, std::string("environment variable ") + kConfigEnvVar)) {
        merged[kv.first] = kv.second;
      }
    }
  }
  const auto& table = setters();
  std::vector<std::string> unknown;
  for (const auto& [key, value] : merged) {
    if (table.count(key) == 0) unknown.push_back("'" + key + "' (value " + to_string(value) + ")");
  }
  if (!unknown.empty()) {
    std::string names, list;
    for (const auto& u : unknown) names += (names.empty() ? "" : ", ") + u;
    for (const auto& k : valid_keys()) list += (list.empty() ? "" : ", ") + k;
    SMP_THROW(ConfigError, "unknown smp config key", unknown.size() > 1 ? "s " : " ", names,
              "; valid keys: ", list);
  }
  Config cfg;
  bool has_active = false;
  for (const auto& [key, value] : merged) {
    table.at(key)(cfg, key, value);
    if (key == "active_microbatches") has_active = true;
    if (no_effect_table().count(key)) cfg.no_effect_keys.push_back(key);
  }
  check_supported(cfg, merged);
  SMP_CHECK(!(merged.count("partitions") && merged.count("pipeline_parallel_degree") &&
              as_int("partitions", merged.at("partitions")) !=
                  as_int("pipeline_parallel_degree", merged.at("pipeline_parallel_degree"))),
            ConfigError, "smp config keys 'partitions' (",
            to_string(merged.at("partitions")), ") and 'pipeline_parallel_degree' (",
            to_string(merged.at("pipeline_parallel_degree")),
            ") disagree; 'partitions' is an alias, give only one of them");
  SMP_CHECK(!(cfg.fp16 && cfg.bf16), ConfigError,
            "smp config sets both 'fp16' and 'bf16' to true; choose one");
  if (!has_active) cfg.active_microbatches = cfg.pipeline_parallel_degree + 2;
  SMP_CHECK(cfg.auto_partition || cfg.default_partition < cfg.pipeline_parallel_degree, ConfigError,
            "smp config key 'default_partition' is ", cfg.default_partition,
            " but there are only ", cfg.pipeline_parallel_degree,
            " partitions (pipeline_parallel_degree); use a value below ",
            cfg.pipeline_parallel_degree);
  if (cfg.tensor_parallel_degree > 1) {
    SMP_CHECK(cfg.ddp, ConfigError, "smp config sets tensor_parallel_degree=",
              cfg.tensor_parallel_degree,
              " without ddp; tensor parallelism needs \"ddp\": True in the smp config");
  }
  return cfg;
}

ConfigMap Config::to_map() const {
  return {
      {"pipeline_parallel_degree", std::int64_t{pipeline_parallel_degree}},
      {"tensor_parallel_degree", std::int64_t{tensor_parallel_degree}},
      {"ddp", ddp},
      {"microbatches", std::int64_t{microbatches}},
      {"pipeline", pipeline},
      {"placement_strategy", placement_strategy},
      {"shard_optimizer_state", shard_optimizer_state},
      {"prescaled_batch", prescaled_batch},
      {"auto_partition", auto_partition},
      {"default_partition", std::int64_t{default_partition}},
      {"active_microbatches", std::int64_t{active_microbatches}},
      {"fp16", fp16},
      {"bf16", bf16},
      {"optimize", optimize},
      {"memory_weight", memory_weight},
      {"horovod", horovod},
      {"ddp_port", std::int64_t{ddp_port}},
      {"ddp_dist_backend", ddp_dist_backend},
      {"tensor_parallel_seed", std::int64_t{tensor_parallel_seed}},
      {"delayed_parameter_initialization", delayed_parameter_initialization},
      {"offload_activations", offload_activations},
      {"activation_loading_horizon", std::int64_t{activation_loading_horizon}},
      {"contiguous", contiguous},
      {"load_partition", load_partition},
      {"skip_tracing", skip_tracing},
      {"checkpoint_attentions", checkpoint_attentions},
      {"static_mode", static_mode},
      {"fast_mode", fast_mode},
      {"_match_weights", match_weights},
      {"_fp32_grad_accumulation", fp32_grad_accumulation},
      {"sharded_data_parallel_degree", std::int64_t{sharded_data_parallel_degree}},
      {"sdp_reduce_bucket_size", sdp_reduce_bucket_size},
      {"sdp_param_persistence_threshold", sdp_param_persistence_threshold},
      {"sdp_max_live_parameters", sdp_max_live_parameters},
      {"sdp_hierarchical_allgather", sdp_hierarchical_allgather},
      {"sdp_gradient_clipping", sdp_gradient_clipping},
      {"_sharded_data_parallelism_config", sharded_data_parallelism_config},
      {"deterministic_server", deterministic_server},
      {"_shard_offloaded_activations", shard_offloaded_activations},
      {"task_level_activation_loading_horizon", std::int64_t{task_level_activation_loading_horizon}},
      {"herring", herring},
      {"partition_file", partition_file},
      {"predefined_hooks", predefined_hooks},
      {"tolerance", tolerance},
  };
}

void Config::validate_world(int world_size) const {
  const int mp = pipeline_parallel_degree * tensor_parallel_degree;
  SMP_CHECK(world_size % mp == 0, ConfigError, "world size ", world_size,
            " is not a multiple of pipeline_parallel_degree (", pipeline_parallel_degree,
            ") x tensor_parallel_degree (", tensor_parallel_degree, ") = ", mp,
            "; launch a multiple of ", mp, " processes or change the degrees");
  SMP_CHECK(world_size == mp || ddp, ConfigError, "world size ", world_size,
            " is larger than pipeline_parallel_degree x tensor_parallel_degree = ", mp,
            ", which makes ", world_size / mp,
            " model replicas; data parallelism across them needs \"ddp\": True in the smp config");
}

}  // namespace smp

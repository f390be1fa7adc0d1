#include "smp/core/config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <sstream>

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
         check_choice(k, c.ddp_dist_backend, {"auto", "nccl", "gloo"});
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
  };
  return table;
}

// ---- flat JSON -----------------------------------------------------------

class JsonParser {
 public:
  JsonParser(const std::string& text, const std::string& source) : s_(text), source_(source) {}

  ConfigMap parse_object() {
    ConfigMap out;
    skip_ws();
    expect('{');
    skip_ws();
    if (peek() == '}') {
      ++i_;
      finish();
      return out;
    }
    while (true) {
      skip_ws();
      std::string key = parse_string();
      skip_ws();
      expect(':');
      skip_ws();
      out[key] = parse_value(key);
      skip_ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      expect('}');
      break;
    }
    finish();
    return out;
  }

 private:
  [[noreturn]] void fail(const std::string& what) {
    SMP_THROW(ConfigError, "cannot parse ", source_, " as a JSON object of smp config keys: ", what,
              " at offset ", i_, " in '", s_, "'");
  }
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void skip_ws() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  void finish() {
    skip_ws();
    if (i_ != s_.size()) fail("trailing characters");
  }
  std::string parse_string() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      if (s_[i_] == '\\') {
        ++i_;
        if (i_ >= s_.size()) fail("unterminated escape");
        char e = s_[i_];
        switch (e) {
          case 'n': out += '\n'; break;
          case 't': out += '\t'; break;
          case '"': out += '"'; break;
          case '\\': out += '\\'; break;
          case '/': out += '/'; break;
          default: fail(std::string("unsupported escape \\") + e);
        }
        ++i_;
      } else {
        out += s_[i_++];
      }
    }
    expect('"');
    return out;
  }
  ConfigValue parse_value(const std::string& key) {
    char c = peek();
    if (c == '"') return parse_string();
    if (s_.compare(i_, 4, "true") == 0) {
      i_ += 4;
      return true;
    }
    if (s_.compare(i_, 5, "false") == 0) {
      i_ += 5;
      return false;
    }
    if (c == '-' || std::isdigit(static_cast<unsigned char>(c))) {
      std::size_t start = i_;
      bool is_float = false;
      ++i_;
      while (i_ < s_.size()) {
        char d = s_[i_];
        if (std::isdigit(static_cast<unsigned char>(d))) {
          ++i_;
        } else if (d == '.' || d == 'e' || d == 'E' || d == '+' || d == '-') {
          is_float = true;
          ++i_;
        } else {
          break;
        }
      }
      std::string num = s_.substr(start, i_ - start);
      try {
        if (is_float) return std::stod(num);
        return static_cast<std::int64_t>(std::stoll(num));
      } catch (const std::exception&) {
        fail("bad number '" + num + "' for key '" + key + "'");
      }
    }
    fail("value of key '" + key + "' must be a string, number or boolean");
  }

  const std::string& s_;
  const std::string& source_;
  std::size_t i_ = 0;
};

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

std::vector<std::string> Config::valid_keys() {
  std::vector<std::string> keys;
  for (const auto& kv : setters()) keys.push_back(kv.first);
  return keys;  // std::map keeps them sorted
}

ConfigMap Config::parse_json(const std::string& json, const std::string& source) {
  return JsonParser(json, source).parse_object();
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
  Config cfg;
  bool has_active = false;
  for (const auto& [key, value] : merged) {
    auto it = table.find(key);
    if (it == table.end()) {
      std::string list;
      for (const auto& k : valid_keys()) list += (list.empty() ? "" : ", ") + k;
      SMP_THROW(ConfigError, "unknown smp config key '", key, "' (value ", to_string(value),
                "); valid keys: ", list);
    }
    it->second(cfg, key, value);
    if (key == "active_microbatches") has_active = true;
  }
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

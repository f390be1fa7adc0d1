#include "smp/core/config.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <string>

#include "smp/core/error.h"

namespace smp {
namespace {

std::string config_error(const ConfigMap& m, bool env = false) {
  try {
    Config::from_map(m, env);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

TEST(Config, Defaults) {
  Config c = Config::from_map({}, false);
  EXPECT_EQ(c.pipeline_parallel_degree, 1);
  EXPECT_EQ(c.tensor_parallel_degree, 1);
  EXPECT_FALSE(c.ddp);
  EXPECT_EQ(c.microbatches, 1);
  EXPECT_EQ(c.pipeline, "interleaved");
  EXPECT_EQ(c.placement_strategy, "cluster");
  EXPECT_TRUE(c.auto_partition);
  EXPECT_EQ(c.active_microbatches, 3);  // partitions + 2
}

TEST(Config, PartitionsAlias) {
  Config c = Config::from_map({{"partitions", std::int64_t{4}}, {"ddp", true}}, false);
  EXPECT_EQ(c.pipeline_parallel_degree, 4);
  EXPECT_EQ(c.active_microbatches, 6);
  EXPECT_TRUE(contains(config_error({{"partitions", std::int64_t{4}},
                                     {"pipeline_parallel_degree", std::int64_t{2}}}),
                       "disagree"));
}

TEST(Config, UnknownKeyListsValidKeys) {
  std::string e = config_error({{"pipline_parallel_degree", std::int64_t{2}}});
  EXPECT_TRUE(contains(e, "unknown smp config key 'pipline_parallel_degree'")) << e;
  EXPECT_TRUE(contains(e, "pipeline_parallel_degree")) << e;
  EXPECT_TRUE(contains(e, "tensor_parallel_degree")) << e;
}

TEST(Config, EveryUnknownKeyIsNamed) {
  std::string e = config_error({{"pipline_parallel_degree", std::int64_t{2}},
                                {"microbatchez", std::int64_t{4}},
                                {"ddp", true}});
  EXPECT_TRUE(contains(e, "unknown smp config keys 'microbatchez' (value 4), "
                          "'pipline_parallel_degree' (value 2)")) << e;
  EXPECT_TRUE(contains(e, "valid keys:")) << e;
}

TEST(Config, AcceptsSmpV1Keys) {
  // Keys of smp v1's parameter list that GPT-2 and other v1 scripts pass.
  Config c = Config::from_map({{"skip_tracing", true},
                               {"checkpoint_attentions", false},
                               {"static_mode", true},
                               {"fast_mode", true},
                               {"_match_weights", true},
                               {"_fp32_grad_accumulation", false},
                               {"sharded_data_parallel_degree", std::int64_t{1}},
                               {"sdp_reduce_bucket_size", 5e8},
                               {"sdp_param_persistence_threshold", std::int64_t{1000000}},
                               {"sdp_max_live_parameters", 1e9},
                               {"sdp_hierarchical_allgather", true},
                               {"sdp_gradient_clipping", 1.0},
                               {"deterministic_server", true},
                               {"offload_activations", false},
                               {"activation_loading_horizon", std::int64_t{4}},
                               {"tensor_parallel_seed", std::int64_t{7}},
                               {"predefined_hooks", true},
                               {"ddp_dist_backend", std::string("smddp")}},
                              false);
  EXPECT_TRUE(c.skip_tracing);
  EXPECT_TRUE(c.match_weights);
  EXPECT_EQ(c.sdp_reduce_bucket_size, 500000000);
  EXPECT_EQ(c.sdp_max_live_parameters, 1000000000);
  EXPECT_EQ(c.tensor_parallel_seed, 7);
  EXPECT_EQ(c.ddp_dist_backend, "auto");
  EXPECT_EQ(std::get<bool>(c.to_map().at("_match_weights")), true);
  // Keys without effect are reported (sorted); keys that have one are not.
  EXPECT_NE(std::find(c.no_effect_keys.begin(), c.no_effect_keys.end(), "skip_tracing"),
            c.no_effect_keys.end());
  EXPECT_EQ(std::find(c.no_effect_keys.begin(), c.no_effect_keys.end(), "tensor_parallel_seed"),
            c.no_effect_keys.end());
  EXPECT_FALSE(Config::no_effect_reason("static_mode").empty());
  EXPECT_TRUE(Config::no_effect_reason("microbatches").empty());
  // Every key from_map accepts appears in the resolved map.
  const ConfigMap m = Config::from_map({}, false).to_map();
  for (const auto& key : Config::valid_keys()) {
    if (key == "partitions" || key == "fp16_params") continue;  // aliases
    EXPECT_EQ(m.count(key), 1u) << key;
  }
}

std::string not_supported(const ConfigMap& m) {
  try {
    Config::from_map(m, false);
  } catch (const NotSupportedError& e) {
    return e.what();
  }
  return "";
}

TEST(Config, UnsupportedFeatureKeysRaiseNotSupported) {
  std::string e = not_supported({{"sharded_data_parallel_degree", std::int64_t{2}}, {"ddp", true}});
  EXPECT_TRUE(contains(e, "smp config key 'sharded_data_parallel_degree' is 2")) << e;
  EXPECT_TRUE(contains(e, "shard_optimizer_state")) << e;
  e = not_supported({{"offload_activations", true}});
  EXPECT_TRUE(contains(e, "smp config key 'offload_activations' is true")) << e;
  EXPECT_TRUE(contains(e, "set_activation_checkpointing")) << e;
  EXPECT_TRUE(contains(not_supported({{"horovod", true}}), "'horovod'"));
  EXPECT_TRUE(contains(not_supported({{"herring", true}}), "'herring'"));
  EXPECT_TRUE(contains(not_supported({{"_sharded_data_parallelism_config",
                                       std::string("zero.json")}}),
                       "'_sharded_data_parallelism_config'"));
}

TEST(Config, BadValues) {
  EXPECT_TRUE(contains(config_error({{"pipeline", std::string("fast")}}), "'interleaved', 'simple'"));
  EXPECT_TRUE(contains(config_error({{"placement_strategy", std::string("DDT")}}), "'DDT'"));
  EXPECT_TRUE(contains(config_error({{"microbatches", std::int64_t{0}}}), "must be >= 1"));
  EXPECT_TRUE(contains(config_error({{"ddp", std::int64_t{3}}}), "must be a boolean"));
  EXPECT_TRUE(contains(config_error({{"tensor_parallel_degree", std::string("2")}}),
                       "must be an integer"));
  std::string e = config_error({{"tensor_parallel_degree", std::int64_t{2}}});
  EXPECT_TRUE(contains(e, "tensor_parallel_degree=2 without ddp")) << e;
}

TEST(Config, WorldValidation) {
  Config c = Config::from_map({{"pipeline_parallel_degree", std::int64_t{2}},
                               {"tensor_parallel_degree", std::int64_t{2}},
                               {"ddp", true}},
                              false);
  EXPECT_NO_THROW(c.validate_world(8));
  try {
    c.validate_world(6);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_TRUE(contains(e.what(), "world size 6 is not a multiple")) << e.what();
  }
  Config no_ddp = Config::from_map({{"pipeline_parallel_degree", std::int64_t{2}}}, false);
  EXPECT_NO_THROW(no_ddp.validate_world(2));
  try {
    no_ddp.validate_world(4);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_TRUE(contains(e.what(), "\"ddp\": True")) << e.what();
  }
}

TEST(Config, EnvironmentOverridesUserKeys) {
  setenv(kConfigEnvVar, R"({"pipeline_parallel_degree": 4, "ddp": true, "pipeline": "simple"})", 1);
  Config c = Config::from_map({{"pipeline_parallel_degree", std::int64_t{2}}, {"microbatches", std::int64_t{8}}});
  unsetenv(kConfigEnvVar);
  EXPECT_EQ(c.pipeline_parallel_degree, 4);
  EXPECT_EQ(c.microbatches, 8);
  EXPECT_EQ(c.pipeline, "simple");
  EXPECT_TRUE(c.ddp);
}

TEST(Config, EnvironmentBadJsonNamesVariable) {
  setenv(kConfigEnvVar, R"({"ddp": tru})", 1);
  std::string e = config_error({}, true);
  unsetenv(kConfigEnvVar);
  EXPECT_TRUE(contains(e, kConfigEnvVar)) << e;
}

TEST(Config, JsonParser) {
  ConfigMap m = Config::parse_json(R"( { "a": 1, "b": -2.5, "c": "x\"y", "d": false } )", "test");
  EXPECT_EQ(std::get<std::int64_t>(m["a"]), 1);
  EXPECT_DOUBLE_EQ(std::get<double>(m["b"]), -2.5);
  EXPECT_EQ(std::get<std::string>(m["c"]), "x\"y");
  EXPECT_EQ(std::get<bool>(m["d"]), false);
  EXPECT_TRUE(Config::parse_json("{}", "test").empty());
  EXPECT_THROW(Config::parse_json("[1]", "test"), ConfigError);
  EXPECT_THROW(Config::parse_json(R"({"a": 1} x)", "test"), ConfigError);
}

}  // namespace
}  // namespace smp

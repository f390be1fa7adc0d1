#include "smp/core/config.h"

#include <gtest/gtest.h>
#include <stdlib.h>

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

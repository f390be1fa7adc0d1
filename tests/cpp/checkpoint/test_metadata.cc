// Metadata (src/checkpoint/metadata.cc): the JSON of the tensor index and of
// the manifest: round trips, and every malformed record is a
// CorruptCheckpointError naming the file and what is wrong.
#include <gtest/gtest.h>

#include <string>

#include "checkpoint/metadata.h"
#include "smp/checkpoint/format.h"
#include "smp/checkpoint/manifest.h"
#include "smp/core/error.h"

namespace smp {
namespace ckpt {
namespace {

/// The message of the exception of type E that fn throws, or "<no ...>".
template <typename E, typename Fn>
std::string thrown(Fn&& fn) {
  try {
    fn();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<other exception> ") + e.what();
  }
  return "<no error>";
}

#define EXPECT_HAS(text, needle) \
  EXPECT_NE(std::string(text).find(needle), std::string::npos) << (text)

Index sample_index() {
  Index ix;
  ix.info["save_id"] = "caf\xc3\xa9 \"quoted\"\n";
  TensorEntry e;
  e.path = {"model", "layer.weight"};
  e.key = "0";
  e.dtype = c10::ScalarType::BFloat16;
  e.shape = {2, 3};
  e.stride = {3, 1};
  e.offset = (std::uint64_t{1} << 40) + 64;  // beyond 32 bits
  e.nbytes = 12;
  e.crc32 = 0xfedcba98u;
  e.shard = ShardSpec{{4, 3}, 0, 2, 1};
  ix.tensors.push_back(e);
  e.path = {"7"};
  e.shard.reset();
  ix.tensors.push_back(e);
  return ix;
}

TEST(Metadata, IndexRoundTrips) {
  const Index ix = sample_index();
  const std::string text = internal::index_to_json(ix);
  // The layout of the record: keys in a fixed order, compact.
  EXPECT_EQ(text.rfind("{\"format\":\"smp.checkpoint\",\"format_version\":1,\"smp_version\":", 0), 0u)
      << text;
  const Index back = internal::index_from_json(text, "f.pt");
  EXPECT_EQ(back.info, ix.info);
  ASSERT_EQ(back.tensors.size(), 2u);
  const TensorEntry& t = back.tensors[0];
  EXPECT_EQ(t.path, ix.tensors[0].path);
  EXPECT_EQ(t.dtype, c10::ScalarType::BFloat16);
  EXPECT_EQ(t.shape, (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(t.offset, ix.tensors[0].offset);
  EXPECT_EQ(t.crc32, 0xfedcba98u);
  ASSERT_TRUE(t.shard.has_value());
  EXPECT_EQ(t.shard->global_shape, (std::vector<std::int64_t>{4, 3}));
  EXPECT_EQ(t.shard->shard_index, 1);
  EXPECT_FALSE(back.tensors[1].shard.has_value());
  EXPECT_EQ(internal::index_to_json(back), text);
}

TEST(Metadata, MalformedIndexIsCorruptNamingTheFile) {
  const std::string good = internal::index_to_json(sample_index());
  auto corrupt = [](const std::string& text) {
    return thrown<CorruptCheckpointError>([&] { internal::index_from_json(text, "/ck/f.pt"); });
  };
  const std::string head = "checkpoint file '/ck/f.pt' is damaged: its smp/index.json record is malformed (";
  EXPECT_HAS(corrupt(good.substr(0, good.size() / 2)), head);      // truncated
  EXPECT_HAS(corrupt("[1, 2]"), "expected an object holding 'format'");
  EXPECT_HAS(corrupt("{}"), "missing key 'format'");
  EXPECT_HAS(corrupt("{\"format\": \"zip\"}"), "format is 'zip', expected 'smp.checkpoint'");
  std::string s = good;
  s.replace(s.find("\"nbytes\":12"), 11, "\"nbytes\":-1");
  EXPECT_HAS(corrupt(s), "'nbytes' is negative");
  s = good;
  s.replace(s.find("\"key\":\"0\""), 9, "\"key\":0");
  EXPECT_HAS(corrupt(s), "'key': expected a string, got number");
  s = good;
  s.replace(s.find("\"stride\":[3,1]"), 14, "\"stride\":[3]");
  EXPECT_HAS(corrupt(s), "shape and stride differ in length");
  s = good;
  s.replace(s.find("\"shape\":[2,3]"), 13, "\"shape\":[2.5,3]");
  EXPECT_HAS(corrupt(s), "'shape': expected an integer, got number");

  s = good;
  s.replace(s.find("\"format_version\":1"), 18, "\"format_version\":9");
  const std::string newer = thrown<CheckpointError>([&] { internal::index_from_json(s, "f.pt"); });
  EXPECT_HAS(newer, "index format_version 9, newer than this smp");
}

TEST(Metadata, MalformedManifestIsCorruptNamingTheFile) {
  Manifest m;
  m.save_id = "id";
  m.files.push_back({"ck_0_0", 0, 0, std::nullopt, 0, 5, true});
  const std::string with_crc = m.to_json();
  EXPECT_EQ(Manifest::from_json(with_crc, "m.json").to_json(), with_crc);
  // The checksum: one changed byte of a name or a rank is noticed.
  const std::size_t crc_at = with_crc.find(",\"crc32\":");
  ASSERT_NE(crc_at, std::string::npos) << with_crc;
  for (const char* from : {"ck_0_0", "\"tp_rank\":0"}) {
    std::string flipped = with_crc;
    const std::size_t at = flipped.find(from) + std::string(from).size() - 1;
    flipped[at] = static_cast<char>(flipped[at] ^ 1);
    EXPECT_HAS(thrown<CorruptCheckpointError>([&] { Manifest::from_json(flipped, "/ck/m.json"); }),
               "checkpoint manifest '/ck/m.json' is damaged: its crc32 is");
  }
  // Manifests without a checksum (written before it existed) are read; the
  // schema checks below run on one.
  const std::string good = with_crc.substr(0, crc_at) + "}";
  EXPECT_EQ(Manifest::from_json(good, "m.json").to_json(), with_crc);
  auto corrupt = [](const std::string& text) {
    return thrown<CorruptCheckpointError>([&] { Manifest::from_json(text, "/ck/m.json"); });
  };
  EXPECT_HAS(corrupt("{\"format\": \"smp.manifest\", "), "checkpoint manifest '/ck/m.json' is damaged (");
  std::string s = good;
  s.replace(s.find("\"v3\":false"), 10, "\"v3\":0");
  EXPECT_HAS(corrupt(s), "'v3': expected a boolean, got number");
  s = good;
  s.replace(s.find("\"world_rank\":0,"), 15, "");
  EXPECT_HAS(corrupt(s), "missing key 'world_rank'");
  EXPECT_HAS(corrupt("{\"format\": \"other\"}"), "is not an smp manifest (format 'other')");
}

}  // namespace
}  // namespace ckpt
}  // namespace smp

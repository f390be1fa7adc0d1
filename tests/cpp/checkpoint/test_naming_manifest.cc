// Naming, manifests and single-process smp::ckpt::save / load: file names,
// manifest JSON round trips and error texts, full saves without the runtime,
// and partial saves of a single-process job.
#include <gtest/gtest.h>

#include "test_util.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "smp/checkpoint/manifest.h"
#include "smp/checkpoint/naming.h"
#include "smp/checkpoint/save.h"
#include "smp/core/error.h"
#include "smp/runtime.h"

namespace smp {
namespace ckpt {
namespace {


class CkptDir : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::make_temp_dir("smp_naming");
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override {
    if (smp::is_initialized()) smp::shutdown();
    test::remove_tree(dir_);
  }
  std::string file(const std::string& name) const { return dir_ + "/" + name; }
  std::string dir_;
};

template <typename Fn>
std::string error_text(Fn&& fn) {
  try {
    fn();
  } catch (const smp::Error& e) {
    return e.what();
  }
  return "<no error>";
}

Value sample(int seed) {
  Value d = Value::ordered_dict();
  d.set("w", Value(at::arange(12, at::kFloat).reshape({3, 4}) + seed));
  d.set("step", Value(seed));
  d.set("betas", Value::tuple({Value(0.9), Value(0.999)}));
  return d;
}

TEST(Naming, PartialNamesAreSmpV1s) {
  EXPECT_EQ(partial_file_name("/c/ckpt.pt", {1, 2, std::nullopt}), "/c/ckpt.pt_1_2");
  EXPECT_EQ(partial_file_name("/c/ckpt", {1, 2, 3}), "/c/ckpt_1_2_3");
  EXPECT_EQ(partial_file_name("/c/model", {0, 1, std::nullopt}, ".pt"), "/c/model_0_1.pt");
  EXPECT_EQ(manifest_file_name("/c/ckpt.pt"), "/c/ckpt.pt.smp_manifest.json");
  EXPECT_EQ(temporary_file_name("/c/ckpt_0_0", "abc"), "/c/ckpt_0_0.tmp-abc");
  EXPECT_EQ(alternate_pt_name("a/ckpt.pt"), "a/ckpt");
  EXPECT_EQ(alternate_pt_name("a/ckpt"), "a/ckpt.pt");
}

TEST(Naming, LoadCandidatesInOrder) {
  const std::vector<std::string> want = {
      "ck.pt_1_0_2", "ck.pt_1_0_2.pt", "ck.pt_1_0", "ck.pt_1_0.pt",
      "ck_1_0_2",    "ck_1_0_2.pt",    "ck_1_0",    "ck_1_0.pt"};
  EXPECT_EQ(partial_candidates("ck.pt", 1, 0, 2), want);
  EXPECT_EQ(partial_candidates("ck", 1, 0, 2).front(), "ck_1_0_2");
  EXPECT_EQ(partial_candidates("ck", 1, 0, 2)[4], "ck.pt_1_0_2");
}

TEST_F(CkptDir, FilesWithPrefixListsOnlyThatCheckpoint) {
  for (const char* n : {"ck_0_0", "ck_0_1.pt", "ck.smp_manifest.json", "other_0_0", "ckx"}) {
    std::ofstream(file(n)) << "x";
  }
  const auto found = files_with_prefix(file("ck.pt"));
  ASSERT_EQ(found.size(), 3u);
  EXPECT_EQ(found[0], file("ck.smp_manifest.json"));
  EXPECT_EQ(found[1], file("ck_0_0"));
  EXPECT_EQ(found[2], file("ck_0_1.pt"));
  EXPECT_TRUE(file_exists(file("ck_0_0")));
  EXPECT_FALSE(file_exists(file("nope")));
  EXPECT_FALSE(file_exists(dir_));
}

TEST_F(CkptDir, ManifestRoundTripAndErrors) {
  Manifest m;
  m.save_id = "0123456789abcdef";
  m.v3 = true;
  m.suffix = ".pt";
  m.world_size = 8;
  m.pp_size = 2;
  m.tp_size = 2;
  m.rdp_size = 2;
  m.files.push_back({"ck_0_0_0.pt", 0, 0, 0, 0, 1234, true});
  m.files.push_back({"ck_1_1_1.pt", 1, 1, 1, 7, 99, false});
  const std::string path = file("ck.smp_manifest.json");
  write_manifest(path, m);
  auto back = read_manifest(path);
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->save_id, m.save_id);
  EXPECT_TRUE(back->v3);
  EXPECT_EQ(back->suffix, ".pt");
  EXPECT_EQ(back->world_size, 8);
  ASSERT_EQ(back->files.size(), 2u);
  EXPECT_EQ(back->files[1].name, "ck_1_1_1.pt");
  EXPECT_EQ(back->files[1].rdp_rank, 1);
  EXPECT_EQ(back->files[1].world_rank, 7);
  EXPECT_EQ(back->files[1].bytes, 99u);
  EXPECT_FALSE(back->files[1].smp_index);
  ASSERT_NE(back->find(1, 1, 1), nullptr);
  EXPECT_EQ(back->find(1, 1, 0), nullptr);
  EXPECT_FALSE(read_manifest(file("absent.json")).has_value());

  std::ofstream(file("bad.json")) << "{\"format\": \"smp.manifest\", ";
  const std::string bad = error_text([&] { read_manifest(file("bad.json")); });
  EXPECT_NE(bad.find("checkpoint manifest '" + file("bad.json") + "' is damaged"),
            std::string::npos) << bad;
  try {
    read_manifest(file("bad.json"));
  } catch (const CorruptCheckpointError&) {
  } catch (...) {
    ADD_FAILURE() << "expected CorruptCheckpointError";
  }
  std::string newer = m.to_json();
  newer.replace(newer.find("\"format_version\":1"), 18, "\"format_version\":9");
  std::ofstream(file("newer.json")) << newer;
  const std::string nv = error_text([&] { read_manifest(file("newer.json")); });
  EXPECT_NE(nv.find("format_version 9, newer than this smp"), std::string::npos) << nv;
}

TEST_F(CkptDir, FullSaveNeedsNoRuntimeAndPartialDoes) {
  ASSERT_FALSE(smp::is_initialized());
  SaveOptions full;
  full.partial = false;
  const SaveStats st = save(sample(3), file("full.pt"), full);
  EXPECT_EQ(st.file, file("full.pt"));
  EXPECT_GT(st.bytes, 0u);
  LoadOptions lo;
  lo.partial = false;
  LoadStats ls;
  EXPECT_TRUE(equal(load(file("full.pt"), lo, &ls), sample(3)));
  EXPECT_EQ(ls.file, file("full.pt"));
  EXPECT_TRUE(ls.smp_index);
  EXPECT_NE(describe(st).find("GB/s"), std::string::npos);
  EXPECT_NE(describe(ls).find("open/verify"), std::string::npos);
  for (const auto& e : test::list_dir(dir_)) {
    EXPECT_EQ(e.find(".tmp-"), std::string::npos) << e;
  }
  const std::string err = error_text([&] { save(sample(1), file("p"), SaveOptions{}); });
  EXPECT_NE(err.find("needs smp.init() first"), std::string::npos) << err;
  const std::string lerr = error_text([&] { load(file("p")); });
  EXPECT_NE(lerr.find("needs smp.init() first"), std::string::npos) << lerr;
  const std::string missing = error_text([&] { load(file("nothing.pt"), lo); });
  EXPECT_NE(missing.find("No such file or directory"), std::string::npos) << missing;
}

TEST_F(CkptDir, PartialSaveSingleProcess) {
  smp::init();
  const std::string f = file("ck.pt");
  const SaveStats st = save(sample(5), f);
  EXPECT_EQ(st.file, f + "_0_0");
  EXPECT_FALSE(st.skipped);
  auto m = read_manifest(f + ".smp_manifest.json");
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->save_id, st.save_id);
  ASSERT_EQ(m->files.size(), 1u);
  EXPECT_EQ(m->files[0].name, "ck.pt_0_0");
  LoadStats ls;
  EXPECT_TRUE(equal(load(f, {}, &ls), sample(5)));
  EXPECT_EQ(ls.save_id, st.save_id);
  // Given without ".pt", the same checkpoint is found.
  EXPECT_TRUE(equal(load(file("ck")), sample(5)));
  // The file's index carries the save id and the layout.
  Reader r(f + "_0_0");
  EXPECT_EQ(r.index().info.at("save_id"), st.save_id);
  EXPECT_EQ(r.index().info.at("pp_size"), "1");
}

TEST_F(CkptDir, TimeoutFromEnvironment) {
  ::unsetenv("SMP_CHECKPOINT_TIMEOUT");
  EXPECT_EQ(default_checkpoint_timeout_s(), 60.0);
  ::setenv("SMP_CHECKPOINT_TIMEOUT", "2.5", 1);
  EXPECT_EQ(default_checkpoint_timeout_s(), 2.5);
  ::setenv("SMP_CHECKPOINT_TIMEOUT", "soon", 1);
  const std::string err = error_text([] { default_checkpoint_timeout_s(); });
  EXPECT_NE(err.find("SMP_CHECKPOINT_TIMEOUT is 'soon'"), std::string::npos) << err;
  ::unsetenv("SMP_CHECKPOINT_TIMEOUT");
}

}  // namespace
}  // namespace ckpt
}  // namespace smp

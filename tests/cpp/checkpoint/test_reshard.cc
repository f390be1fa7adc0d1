// smp::ckpt::ReshardSource: a partial checkpoint written part by part (tp 2,
// an uneven split along dim 1, names in the index info) loads on another
// layout by byte ranges; missing parts and unnamed files are named.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "test_util.h"

#include "smp/checkpoint/format.h"
#include "smp/checkpoint/manifest.h"
#include "smp/checkpoint/naming.h"
#include "smp/checkpoint/reshard.h"
#include "smp/core/error.h"

namespace smp {
namespace ckpt {
namespace {

class Reshard : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = test::make_temp_dir("smp-reshard-test"); }
  std::string dir_;

  // Full tensor [4, 5] (values 0..19) split along dim 1 over 2 parts: 3 + 2 columns.
  at::Tensor full() const { return at::arange(20, at::kFloat).reshape({4, 5}); }

  std::string write(bool names = true, int parts = 2) {
    const std::string f = dir_ + "/ckpt";
    Manifest m;
    m.save_id = "sid";
    m.tp_size = 2;
    m.world_size = 2;
    for (int r = 0; r < parts; ++r) {
      const ShardSpec spec = ShardSpec::split({4, 5}, 1, 2, r);
      at::Tensor local = full().narrow(1, spec.offset(), spec.local_shape()[1]).contiguous();
      Value model = Value::dict();
      model.set("w", Value::tensor(local, spec));
      model.set("b", Value::tensor(at::full({3}, 7.0f), ShardSpec::replicated({3})));
      Value root = Value::dict();
      root.set("model", std::move(model));
      root.set("epoch", 3);
      WriteOptions w;
      w.fsync = false;
      w.info["save_id"] = "sid";
      if (names) {
        w.info[kTensorNamesInfoKey] = encode_tensor_names(
            {{{"model", "w"}, "model/w"}, {{"model", "b"}, "model/b"}});
      }
      PartName part;
      part.tp_rank = r;
      const std::string name = partial_file_name(f, part);
      write_file(name, root, w);
      ManifestFile mf;
      mf.name = name.substr(dir_.size() + 1);
      mf.tp_rank = r;
      mf.world_rank = r;
      m.files.push_back(mf);
    }
    write_manifest(manifest_file_name(f), m);
    return f;
  }
};

TEST_F(Reshard, LoadsReplicatedAndOtherSplitsFromRanges) {
  const ReshardSource src(write());
  EXPECT_EQ(src.saved().parts.size(), 2u);
  EXPECT_EQ(src.parts_holding("model/b"), (std::vector<std::size_t>{0, 1}));
  // tp 1: the whole tensor.
  {
    TargetRank t;
    TargetTensor w;
    w.name = "model/w";
    w.spec = ShardSpec::replicated({4, 5});
    t.tensors.push_back(w);
    at::Tensor out = at::zeros({4, 5});
    const ReshardStats st = src.load(t, {out.data_ptr()});
    EXPECT_TRUE(at::equal(out, full()));
    EXPECT_EQ(st.bytes, 80u);
    EXPECT_EQ(st.parts_read, 2u);
  }
  // tp 4 along dim 1 (2, 1, 1, 1 columns) and tp 3 along dim 0, tiny buffer.
  for (int r = 0; r < 4; ++r) {
    TargetRank t;
    TargetTensor w;
    w.name = "model/w";
    w.spec = ShardSpec::split({4, 5}, 1, 4, r);
    t.tensors.push_back(w);
    at::Tensor out = at::zeros({4, w.spec.local_shape()[1]});
    ReshardOptions o;
    o.buffer_bytes = 1;
    o.threads = 2;
    src.load(t, {out.data_ptr()}, o);
    EXPECT_TRUE(at::equal(out, full().narrow(1, w.spec.offset(), w.spec.local_shape()[1])))
        << "tp rank " << r;
  }
  for (int r = 0; r < 3; ++r) {
    TargetRank t;
    TargetTensor w;
    w.name = "model/w";
    w.spec = ShardSpec::split({4, 5}, 0, 3, r);
    t.tensors.push_back(w);
    at::Tensor out = at::zeros({w.spec.local_shape()[0], 5});
    src.load(t, {out.data_ptr()});
    EXPECT_TRUE(at::equal(out, full().narrow(0, w.spec.offset(), w.spec.local_shape()[0])));
  }
}

TEST_F(Reshard, MissingPieceNamesTensorAndRange) {
  const ReshardSource src(write(true, /*parts=*/1));
  TargetRank t;
  TargetTensor w;
  w.name = "model/w";
  w.spec = ShardSpec::replicated({4, 5});
  t.tensors.push_back(w);
  at::Tensor out = at::zeros({4, 5});
  try {
    src.load(t, {out.data_ptr()});
    FAIL() << "no error";
  } catch (const CheckpointError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("model/w"), std::string::npos) << msg;
    EXPECT_NE(msg.find("tp_rank 1"), std::string::npos) << msg;
  }
}

TEST_F(Reshard, FilesWithoutNamesAreRefusedWithTheFile) {
  const std::string f = write(/*names=*/false);
  try {
    ReshardSource src(f);
    FAIL() << "no error";
  } catch (const CheckpointError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("ckpt_0_0"), std::string::npos) << msg;
    EXPECT_NE(msg.find("saving layout"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace ckpt
}  // namespace smp

// The pipelined save (staging pool, parallel writers, O_DIRECT) and the
// asynchronous save (snapshot isolation, errors reaching the caller), on the CPU.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <functional>
#include <string>

#include "checkpoint/io.h"
#include "smp/checkpoint/format.h"
#include "smp/checkpoint/save.h"
#include "smp/core/error.h"
#include "test_util.h"

namespace smp {
namespace ckpt {
namespace {

class CheckpointPipeline : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::make_temp_dir("smp-ckpt-pipeline");
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override { test::remove_tree(dir_); }
  std::string file(const std::string& name) const { return dir_ + "/" + name; }
  std::string dir_;
};

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const CheckpointError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("unexpected exception type: ") + e.what();
  }
  return "no exception";
}

Value sample_state() {
  const at::Tensor big = at::rand({9, 1024, 1024}, at::kFloat);  // 36 MiB: 3 chunks
  const at::Tensor wide = at::rand({300, 700}, at::kDouble);
  return Value::dict({{"big", big},
                      {"strided", wide.t()},  // not contiguous
                      {"half", at::rand({5, 1001}).to(at::kHalf)},
                      {"scalar", at::tensor(3.5)},
                      {"empty", at::empty({0, 4})},
                      {"tied", big},
                      {"step", 7}});
}

TEST_F(CheckpointPipeline, StagedWritesMatchDirectWrites) {
  const Value obj = sample_state();
  WriteOptions plain;
  plain.threads = 2;
  write_file(file("plain.pt"), obj, plain);
  const Index want = Reader(file("plain.pt")).index();
  for (int threads : {1, 4}) {
    for (bool direct : {false, true}) {
      SCOPED_TRACE("threads " + std::to_string(threads) + (direct ? " O_DIRECT" : ""));
      WriteOptions wo;
      wo.threads = threads;
      wo.stage_host_tensors = true;              // every tensor through the pool
      wo.pool_bytes = 2 * internal::kIoChunk;  // two slots: the copies must wait for writers
      wo.o_direct = direct;
      const WriteStats s = write_file(file("staged.pt"), obj, wo);
      EXPECT_EQ(s.records, 5u);
      Reader r(file("staged.pt"));
      EXPECT_TRUE(equal(obj, r.read_object()));
      ASSERT_EQ(r.index().tensors.size(), want.tensors.size());
      for (std::size_t i = 0; i < want.tensors.size(); ++i) {
        EXPECT_EQ(r.index().tensors[i].crc32, want.tensors[i].crc32) << i;
        EXPECT_EQ(r.index().tensors[i].offset, want.tensors[i].offset) << i;
      }
    }
  }
}

TEST_F(CheckpointPipeline, IoDefaultsComeFromTheEnvironment) {
  ::setenv("SMP_CKPT_THREADS", "3", 1);
  ::setenv("SMP_CKPT_POOL_MB", "64", 1);
  ::setenv("SMP_CKPT_O_DIRECT", "1", 1);
  IoDefaults d = io_defaults();
  EXPECT_EQ(d.threads, 3);
  EXPECT_EQ(d.pool_bytes, std::size_t{64} << 20);
  EXPECT_TRUE(d.o_direct);
  ::setenv("SMP_CKPT_THREADS", "lots", 1);
  try {
    io_defaults();
    ADD_FAILURE() << "no exception";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("SMP_CKPT_THREADS is 'lots'"), std::string::npos);
  }
  ::unsetenv("SMP_CKPT_THREADS");
  ::unsetenv("SMP_CKPT_POOL_MB");
  ::unsetenv("SMP_CKPT_O_DIRECT");
  d = io_defaults();
  EXPECT_GE(d.threads, 1);
  EXPECT_GE(d.pool_bytes, internal::kIoChunk);
  EXPECT_FALSE(d.o_direct);
}

TEST_F(CheckpointPipeline, AsyncSaveWritesTheSnapshotNotLaterChanges) {
  const at::Tensor w = at::rand({1024, 1024});
  const at::Tensor b = at::rand({1000});
  const at::Tensor w0 = w.clone(), b0 = b.clone();
  const Value obj = Value::dict({{"w", w}, {"b", b}, {"tied", w}, {"w_t", w.t()}});
  SaveOptions o;
  o.partial = false;
  AsyncSave h = async_save(obj, file("async.pt"), o);
  // Training goes on: the parameters change right after the call.
  w.add_(1.0);
  b.zero_();
  const SaveStats st = h.wait();
  EXPECT_TRUE(h.done());
  EXPECT_EQ(st.file, file("async.pt"));
  EXPECT_GE(h.snapshot_bytes(), static_cast<std::uint64_t>(w.nbytes() + b.nbytes()));
  LoadOptions lo;
  lo.partial = false;
  const Value back = load(file("async.pt"), lo);
  EXPECT_TRUE(at::equal(back.at("w").tensor(), w0));
  EXPECT_TRUE(at::equal(back.at("b").tensor(), b0));
  EXPECT_TRUE(at::equal(back.at("w_t").tensor(), w0.t()));
  // Tied stays tied: the same tensor object once in the file.
  EXPECT_EQ(back.at("w").tensor().unsafeGetTensorImpl(),
            back.at("tied").tensor().unsafeGetTensorImpl());
  // The snapshot arena is reused: a second save of the same size allocates nothing new.
  AsyncSave h2 = async_save(obj, file("async2.pt"), o);
  h2.wait();
  EXPECT_TRUE(at::equal(load(file("async2.pt"), lo).at("w").tensor(), w));
}

TEST_F(CheckpointPipeline, BackgroundErrorReachesWaitOnceNamingFileAndRank) {
  SaveOptions o;
  o.partial = false;
  const std::string bad = file("no_such_dir/model.pt");
  AsyncSave h = async_save(Value::dict({{"x", at::ones({4})}}), bad, o);
  const std::string msg = error_of([&] { h.wait(); });
  EXPECT_NE(msg.find("asynchronous smp.save of '" + bad + "' failed in the background on rank 0"),
            std::string::npos) << msg;
  EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
  // Reported once: the next save goes ahead.
  EXPECT_EQ(error_of([&] { h.wait(); }), "no exception");
  EXPECT_EQ(error_of([&] { save(Value(1), file("ok.pt"), o); }), "no exception");
}

TEST_F(CheckpointPipeline, BackgroundErrorReachesTheNextSave) {
  SaveOptions o;
  o.partial = false;
  const std::string bad = file("no_such_dir/model.pt");
  AsyncSave h = async_save(Value::dict({{"x", at::ones({4})}}), bad, o);
  const std::string msg = error_of([&] { save(Value(1), file("next.pt"), o); });
  EXPECT_NE(msg.find("'" + bad + "' failed in the background on rank 0"), std::string::npos)
      << msg;
  // The failed save did not block the next one for ever, and wait() is quiet now.
  EXPECT_EQ(error_of([&] { h.wait(); }), "no exception");
  EXPECT_FALSE(save_in_flight());
}

}  // namespace
}  // namespace ckpt
}  // namespace smp

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <csignal>
#include <cstdio>
#include <fstream>
#include <string>

#include "checkpoint/io.h"
#include "checkpoint/zip_reader.h"
#include "checkpoint/zip_writer.h"
#include "fixtures.h"
#include "smp/checkpoint/format.h"
#include "test_util.h"
#include "smp/core/error.h"

namespace smp {
namespace ckpt {
namespace {

using namespace std::string_literals;

class CheckpointFormat : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::make_temp_dir("smp-ckpt-test");
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override {
    test::remove_tree(dir_);
  }
  std::string file(const std::string& name) const { return dir_ + "/" + name; }

  std::string dir_;
};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void spit(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
}

/// The message of the CheckpointError (or subclass) `fn` throws.
template <typename E = CheckpointError, typename F>
std::string error_of(F&& fn) {
  try {
    fn();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("unexpected exception type: ") + e.what();
  }
  return "no exception";
}

#define EXPECT_HAS(haystack, needle) \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << (haystack)

std::uint32_t crc_of(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return static_cast<std::uint32_t>(
      crc32(0, static_cast<const Bytef*>(c.data_ptr()), static_cast<uInt>(c.nbytes())));
}

TEST_F(CheckpointFormat, RoundTripsNestedObjectWithEveryDtype) {
  const Value obj = testing::everything();
  const WriteStats stats = write_file(file("all.pt"), obj);
  EXPECT_EQ(stats.bytes, test::file_size(file("all.pt")));
  EXPECT_GT(stats.tensors, 12u);
  EXPECT_FALSE(test::path_exists(file("all.pt.tmp-" + std::to_string(::getpid()))));

  Reader r(file("all.pt"));
  EXPECT_TRUE(r.has_index());
  const Value back = r.read_object();
  EXPECT_TRUE(equal(obj, back)) << "wrote " << obj.repr() << "\nread  " << back.repr();

  // Views come back contiguous with the same values; OrderedDict attributes survive.
  const Value& sd = back.at("state_dict");
  EXPECT_TRUE(sd.ordered());
  EXPECT_TRUE(sd.at("layer.weight").tensor().is_contiguous());
  EXPECT_TRUE(at::equal(sd.at("layer.weight").tensor(), at::arange(24, at::kFloat).reshape({4, 6}).t()));
  EXPECT_EQ(sd.attributes().at("_metadata").pairs().size(), 1u);
  EXPECT_EQ(back.at("scalar").tensor().dim(), 0);
  EXPECT_EQ(back.at("empty").tensor().sizes(), (std::vector<std::int64_t>{0, 3}));
  EXPECT_EQ(back.at("bytes").as_bytes(), std::string("\x00\x01\x7f\x80\xff abc", 9));
}

TEST_F(CheckpointFormat, IndexLocatesEveryTensorByteRange) {
  const Value obj = testing::everything();
  WriteOptions opt;
  opt.info = {{"tag", "step-7"}, {"who", "test"}};
  write_file(file("idx.pt"), obj, opt);
  Reader r(file("idx.pt"));
  const Index& index = r.index();
  EXPECT_EQ(index.format_version, 1);
  EXPECT_EQ(index.info.at("tag"), "step-7");
  const TensorEntry* w = index.find({"state_dict", "layer.weight"});
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->dtype, at::kFloat);
  EXPECT_EQ(w->shape, (std::vector<std::int64_t>{6, 4}));
  EXPECT_EQ(w->stride, (std::vector<std::int64_t>{4, 1}));
  ASSERT_NE(index.find({"dtypes", "bfloat16"}), nullptr);
  EXPECT_EQ(index.find({"7"}), nullptr);  // "int key" is a str, not a tensor

  for (const TensorEntry& e : index.tensors) {
    EXPECT_EQ(e.offset % 4096, 0u) << e.key;
    std::string bytes(e.nbytes, '\0');
    r.read_tensor_bytes(e, 0, e.nbytes, bytes.data());
    EXPECT_EQ(static_cast<std::uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(bytes.data()),
                                               static_cast<uInt>(bytes.size()))),
              e.crc32)
        << e.key;
    const at::Tensor t = r.read_tensor(e);
    EXPECT_EQ(crc_of(t), e.crc32);
    EXPECT_EQ(t.sizes().vec(), e.shape);
  }
  // A middle range of one tensor: elements 5..8 of layer.weight (t() of arange(24).reshape(4, 6)).
  float got[3];
  r.read_tensor_bytes(*w, 5 * 4, 12, got);
  const at::Tensor expect = at::arange(24, at::kFloat).reshape({4, 6}).t().contiguous().flatten();
  for (int i = 0; i < 3; ++i) EXPECT_EQ(got[i], expect[5 + i].item<float>());

  EXPECT_HAS(error_of([&] { r.read_tensor_bytes(*w, 90, 10, got); }), "outside tensor 'state_dict/layer.weight' (96 bytes)");
}

TEST_F(CheckpointFormat, BigTensorsWithOneAndFourThreads) {
  const at::Tensor big = at::rand({16, 1024, 1024}, at::kFloat);  // 64 MiB
  const at::Tensor half = at::rand({3, 1000, 1001}, at::kFloat).to(at::kHalf);
  const Value obj = Value::dict({{"big", big}, {"half", half}, {"small", at::ones({3})}});
  for (int threads : {1, 4}) {
    SCOPED_TRACE("threads " + std::to_string(threads));
    WriteOptions wo;
    wo.threads = threads;
    const WriteStats s = write_file(file("big.pt"), obj, wo);
    EXPECT_EQ(s.tensor_bytes, static_cast<std::uint64_t>(big.nbytes() + half.nbytes() + 12));
    EXPECT_EQ(s.records, 3u);
    Reader r(file("big.pt"));
    ReadOptions ro;
    ro.threads = threads;
    EXPECT_TRUE(equal(obj, r.read_object(ro)));
    const TensorEntry* e = r.index().find({"big"});
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->crc32, crc_of(big));
    EXPECT_TRUE(at::equal(r.read_tensor(*e, ro), big));
    // A range that crosses the 16 MiB chunk boundary.
    std::vector<float> range(1000);
    const std::uint64_t at_byte = (std::uint64_t{16} << 20) - 2000;
    r.read_tensor_bytes(*e, at_byte, range.size() * 4, range.data());
    const float* src = big.data_ptr<float>() + at_byte / 4;
    EXPECT_EQ(0, std::memcmp(range.data(), src, range.size() * 4));
  }
}

TEST_F(CheckpointFormat, TiedTensorsAreStoredOnceAndStayTied) {
  const Value obj = testing::tied();
  const WriteStats s = write_file(file("tied.pt"), obj);
  EXPECT_EQ(s.tensors, 4u);
  EXPECT_EQ(s.records, 2u);  // w (and its alias) once, "other" once
  Reader r(file("tied.pt"));
  const Value back = r.read_object();
  EXPECT_TRUE(equal(obj, back));
  const at::Tensor& enc = back.at("encoder.weight").tensor();
  const at::Tensor& dec = back.at("decoder.weight").tensor();
  const at::Tensor& alias = back.at("alias").tensor();
  EXPECT_TRUE(enc.is_same(dec));          // one tensor object, as torch.load gives
  EXPECT_FALSE(enc.is_same(alias));
  EXPECT_TRUE(enc.is_alias_of(alias));    // shares the storage
  const Index& index = r.index();
  ASSERT_EQ(index.tensors.size(), 4u);
  EXPECT_EQ(index.tensors[0].key, index.tensors[1].key);
  EXPECT_EQ(index.tensors[0].key, index.tensors[2].key);
  EXPECT_NE(index.tensors[0].key, index.tensors[3].key);
}

TEST_F(CheckpointFormat, ShardSpecsTravelInTheIndex) {
  const Value obj = Value::dict({
      {"col", Value(at::ones({4, 3}), ShardSpec{{4, 10}, 1, 4, 1})},
      {"rep", Value(at::zeros({2}), ShardSpec{{2}, -1, 1, 0})},
      {"plain", at::ones({1})},
  });
  write_file(file("shard.pt"), obj);
  Reader r(file("shard.pt"));
  const TensorEntry* col = r.index().find({"col"});
  ASSERT_NE(col, nullptr);
  ASSERT_TRUE(col->shard.has_value());
  EXPECT_EQ(col->shard->global_shape, (std::vector<std::int64_t>{4, 10}));
  EXPECT_EQ(col->shard->split_dim, 1);
  EXPECT_EQ(col->shard->num_shards, 4);
  EXPECT_EQ(col->shard->shard_index, 1);
  EXPECT_FALSE(r.index().find({"plain"})->shard.has_value());
  const Value back = r.read_object();
  ASSERT_TRUE(back.at("col").shard().has_value());
  EXPECT_EQ(back.at("col").shard()->shard_index, 1);
  EXPECT_EQ(back.at("rep").shard()->split_dim, -1);
  EXPECT_FALSE(back.at("plain").shard().has_value());
}

TEST_F(CheckpointFormat, Zip64StructuresAreReadable) {
  const Value obj = testing::everything();
  WriteOptions wo;
  wo.force_zip64 = true;
  write_file(file("z64.pt"), obj, wo);
  Reader r(file("z64.pt"));
  EXPECT_TRUE(equal(obj, r.read_object()));
}

TEST_F(CheckpointFormat, AlignmentIsConfigurable) {
  WriteOptions wo;
  wo.alignment = 64;
  write_file(file("a64.pt"), testing::tied(), wo);
  Reader r(file("a64.pt"));
  for (const auto& e : r.index().tensors) EXPECT_EQ(e.offset % 64, 0u);
  EXPECT_LT(test::file_size(file("a64.pt")), 4096u);
  wo.alignment = 100;
  EXPECT_HAS(error_of([&] { write_file(file("bad.pt"), testing::tied(), wo); }),
             "WriteOptions.alignment 100");
}

// ---- errors ---------------------------------------------------------------

TEST_F(CheckpointFormat, TruncatedFileIsReported) {
  write_file(file("t.pt"), testing::tied());
  const std::string data = slurp(file("t.pt"));
  spit(file("t.pt"), data.substr(0, data.size() / 2));
  const std::string msg =
      error_of<CorruptCheckpointError>([&] { Reader r(file("t.pt")); });
  EXPECT_HAS(msg, file("t.pt"));
  EXPECT_HAS(msg, "is truncated: expected " + std::to_string(data.size()) + " bytes, found " +
                      std::to_string(data.size() / 2) + " bytes");
}

TEST_F(CheckpointFormat, FlippedTensorByteFailsTheChecksum) {
  const Value obj = Value::dict({{"model", Value::dict({{"w", at::arange(1000, at::kFloat)}})}});
  write_file(file("f.pt"), obj);
  std::uint64_t offset;
  {
    Reader r(file("f.pt"));
    offset = r.index().find({"model", "w"})->offset;
  }
  std::string data = slurp(file("f.pt"));
  data[offset + 123] ^= 0x10;
  spit(file("f.pt"), data);
  Reader r(file("f.pt"));
  const std::string msg = error_of<CorruptCheckpointError>([&] { r.read_object(); });
  EXPECT_HAS(msg, file("f.pt"));
  EXPECT_HAS(msg, "tensor 'model/w' (storage key '0'");
  EXPECT_HAS(msg, "fails its CRC-32 check");
  EXPECT_HAS(error_of<CorruptCheckpointError>([&] { r.read_tensor(r.index().tensors[0]); }),
             "fails its CRC-32 check");
  ReadOptions no_check;
  no_check.verify_checksums = false;
  EXPECT_NO_THROW(r.read_object(no_check));
}

TEST_F(CheckpointFormat, FlippedPickleByteFailsTheChecksum) {
  write_file(file("p.pt"), testing::tied());
  std::string data = slurp(file("p.pt"));
  std::uint64_t pkl_offset;
  {
    internal::ZipReader z(file("p.pt"));
    pkl_offset = z.find("p/data.pkl")->data_offset;
  }
  data[pkl_offset + 10] ^= 0x01;
  spit(file("p.pt"), data);
  Reader r(file("p.pt"));
  const std::string msg = error_of<CorruptCheckpointError>([&] { r.read_object(); });
  EXPECT_HAS(msg, "record 'p/data.pkl' fails its CRC-32 check");
}

TEST_F(CheckpointFormat, NotACheckpoint) {
  spit(file("notes.txt"), "these are not the weights you are looking for\n");
  std::string msg = error_of([&] { Reader r(file("notes.txt")); });
  EXPECT_HAS(msg, "'" + file("notes.txt") + "' is not an smp or torch checkpoint");
  spit(file("tiny"), "hi");
  EXPECT_HAS(error_of([&] { Reader r(file("tiny")); }), "is not an smp or torch checkpoint");
  spit(file("empty"), "");
  EXPECT_HAS(error_of([&] { Reader r(file("empty")); }), "is not an smp or torch checkpoint");
  EXPECT_HAS(error_of([&] { Reader r(dir_); }), "Is a directory");
}

TEST_F(CheckpointFormat, MissingFile) {
  const std::string msg = error_of([&] { Reader r(file("nope.pt")); });
  EXPECT_HAS(msg, file("nope.pt"));
  EXPECT_HAS(msg, "open failed: No such file or directory");
}

TEST_F(CheckpointFormat, UnwritableDirectory) {
  spit(file("regular"), "x");
  const std::string target = file("regular") + "/sub/ckpt.pt";
  const std::string msg = error_of([&] { write_file(target, testing::tied()); });
  EXPECT_HAS(msg, target + ".tmp-");
  EXPECT_HAS(msg, "Not a directory");

  test::make_dir(dir_ + "/ro");
  ::chmod(file("ro").c_str(), 0555);
  const std::string probe = file("ro") + "/probe";
  if (FILE* f = std::fopen(probe.c_str(), "w")) {  // root writes anyway
    std::fclose(f);
    std::remove(probe.c_str());
    ::chmod(file("ro").c_str(), 0755);
    GTEST_SKIP() << "running as root: a read-only directory is still writable";
  }
  EXPECT_HAS(error_of([&] { write_file(file("ro") + "/ckpt.pt", testing::tied()); }),
             "Permission denied");
  ::chmod(file("ro").c_str(), 0755);
}

TEST_F(CheckpointFormat, FailedWriteLeavesThePreviousFileIntact) {
  const Value old_obj = testing::tied();
  write_file(file("keep.pt"), old_obj);
  const std::string before = slurp(file("keep.pt"));

  // A file size limit makes the second write fail half way (EFBIG).
  struct rlimit saved {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = saved;
  lim.rlim_cur = 1 << 20;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &lim), 0);
  const Value big = Value::dict({{"w", at::ones({4 << 20}, at::kFloat)}});
  const std::string msg = error_of([&] { write_file(file("keep.pt"), big); });
  ::setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, old_handler);

  EXPECT_HAS(msg, "pwrite failed: File too large");
  EXPECT_EQ(slurp(file("keep.pt")), before);
  EXPECT_FALSE(test::path_exists(file("keep.pt.tmp-" + std::to_string(::getpid()))));
  EXPECT_TRUE(equal(Reader(file("keep.pt")).read_object(), old_obj));
}

TEST_F(CheckpointFormat, UnsupportedValuesNameTheirPath) {
  const Value bad_str = Value::dict({{"a", Value::list({"ok", std::string("\xff\xfe")})}});
  EXPECT_HAS(error_of([&] { write_file(file("s.pt"), bad_str); }), "the str at 'a/1' is not valid UTF-8");
  EXPECT_FALSE(test::path_exists(file("s.pt")));
}

/// Writes a ZIP archive whose data.pkl is `pickle`, as an attacker would.
void write_raw_checkpoint(const std::string& path, const std::string& pickle) {
  internal::ZipLayout layout(64);
  const std::size_t i = layout.add("evil/data.pkl", pickle.size());
  layout.set_crc(i, internal::crc32_update(0, pickle.data(), pickle.size()));
  internal::File f = internal::File::create(path);
  const std::string h = layout.local_header(i);
  f.pwrite_all(h.data(), h.size(), 0);
  f.pwrite_all(pickle.data(), pickle.size(), layout.entry(i).data_offset);
  const std::string d = layout.data_descriptor(i);
  f.pwrite_all(d.data(), d.size(), layout.entry(i).data_offset + pickle.size());
  const std::string cd = layout.central_directory();
  f.pwrite_all(cd.data(), cd.size(), layout.records_end());
  f.close();
}

std::string binunicode(const std::string& s) {
  std::string out = "X";
  const auto n = static_cast<std::uint32_t>(s.size());
  for (int i = 0; i < 4; ++i) out += static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + s;
}

TEST_F(CheckpointFormat, RestrictedUnpicklerRefusesCode) {
  const std::string marker = file("pwned");
  // GLOBAL 'os system', ("touch <marker>",), REDUCE: what pickle.loads would run.
  const std::string pickle = std::string("\x80\x02") + "cos\nsystem\n" +
                             binunicode("touch " + marker) + "\x85R.";
  write_raw_checkpoint(file("evil.pt"), pickle);
  Reader r(file("evil.pt"));
  EXPECT_FALSE(r.has_index());
  const std::string msg = error_of([&] { r.read_object(); });
  EXPECT_HAS(msg, file("evil.pt"));
  EXPECT_HAS(msg, "'os system'");
  EXPECT_HAS(msg, "safe loading refuses to run code from a checkpoint; if you trust this file, "
                  "load it with weights_only=False");
  EXPECT_HAS(error_of([&] { r.index(); }), "'os system'");
  // The refusal has its own class, so that callers can fall back by type.
  EXPECT_HAS(test::error_of<UnsafeLoadError>([&] { r.read_object(); }), "'os system'");
  EXPECT_FALSE(test::path_exists(marker));

  // Same with protocol 4's STACK_GLOBAL, and an opcode that builds objects.
  write_raw_checkpoint(file("evil4.pt"), std::string("\x80\x04") + binunicode("posix") +
                                             binunicode("system") + "\x93" +
                                             binunicode("touch " + marker) + "\x85R.");
  EXPECT_HAS(error_of([&] { Reader(file("evil4.pt")).read_object(); }), "'posix system'");
  write_raw_checkpoint(file("inst.pt"), std::string("\x80\x02") + "(ios\nsystem\nS'x'\n.");
  EXPECT_HAS(error_of([&] { Reader(file("inst.pt")).read_object(); }), "pickle opcode 0x69");
  EXPECT_FALSE(test::path_exists(marker));
}

TEST_F(CheckpointFormat, MalformedPickleIsCorruptNotACrash) {
  write_raw_checkpoint(file("m1.pt"), std::string("\x80\x02") + "}q\x00(X\x05\x00\x00\x00"s);
  EXPECT_HAS(error_of<CorruptCheckpointError>([&] { Reader(file("m1.pt")).read_object(); }),
             "data.pkl is truncated");
  write_raw_checkpoint(file("m2.pt"), std::string("\x80\x02") + "h\x09.");
  EXPECT_HAS(error_of<CorruptCheckpointError>([&] { Reader(file("m2.pt")).read_object(); }),
             "reads memo entry 9 before it is set");
  write_raw_checkpoint(file("m3.pt"), std::string("\x80\x02") + "u.");
  EXPECT_NE(error_of<CorruptCheckpointError>([&] { Reader(file("m3.pt")).read_object(); }),
            "no exception");
}

TEST_F(CheckpointFormat, MissingStorageRecord) {
  // A tensor whose storage record is absent.
  std::string p = std::string("\x80\x02") + "ctorch._utils\n_rebuild_tensor_v2\n((" +
                  binunicode("storage") + "ctorch\nFloatStorage\n" + binunicode("0") +
                  binunicode("cpu") + "K\x02tQK\x00K\x02\x85K\x01\x85\x89"s +
                  "ccollections\nOrderedDict\n)RtR.";
  write_raw_checkpoint(file("nostorage.pt"), p);
  Reader r(file("nostorage.pt"));
  const std::string msg = error_of<CorruptCheckpointError>([&] { r.read_object(); });
  EXPECT_HAS(msg, "data.pkl references storage '0' but the record 'evil/data/0' is missing");
  EXPECT_HAS(error_of<CorruptCheckpointError>([&] { r.index(); }), "is missing");
}

}  // namespace
}  // namespace ckpt
}  // namespace smp

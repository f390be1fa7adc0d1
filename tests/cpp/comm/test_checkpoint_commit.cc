// The checkpoint commit protocol under mpirun with 1, 2, 4 or 8 ranks: partial
// round trips on every pp x tp grid that fits, v3 naming, a save called by the
// wrong ranks (bounded failure naming the missing ranks), replacement of an
// earlier save, crash states (before / after the commit point) and the
// reader's errors for corrupt, missing, mixed and incomplete checkpoints.
#include <gtest/gtest.h>

#include "test_util.h"
#include <mpi.h>

#include <ATen/ATen.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "smp/checkpoint/format.h"
#include "smp/checkpoint/manifest.h"
#include "smp/checkpoint/naming.h"
#include "smp/checkpoint/save.h"
#include "smp/core/error.h"
#include "smp/runtime.h"

namespace smp {
namespace ckpt {
namespace {


int world_size() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

void mpi_barrier() { MPI_Barrier(MPI_COMM_WORLD); }

/// A directory shared by all ranks (created by rank 0).
std::string shared_dir() {
  char buf[256] = {};
  if (world_rank() == 0) {
    std::snprintf(buf, sizeof(buf), "%s", test::make_temp_dir("smp_commit").c_str());
  }
  MPI_Bcast(buf, sizeof(buf), MPI_CHAR, 0, MPI_COMM_WORLD);
  return buf;
}

ConfigMap grid(int pp, int tp) {
  return {{"pipeline_parallel_degree", std::int64_t{pp}},
          {"tensor_parallel_degree", std::int64_t{tp}},
          {"ddp", true}};
}

/// Deterministic state of one part: depends on (pp, tp, rdp) and a version.
Value part_state(int pp, int tp, int rdp, int version) {
  const double base = 1000.0 * version + 100.0 * pp + 10.0 * tp + rdp;
  Value d = Value::ordered_dict();
  d.set("w", Value(at::arange(64, at::kFloat).reshape({8, 8}) + base));
  d.set("h", Value((at::arange(17, at::kFloat) * 0.5 + base).to(at::kHalf)));
  d.set("b", Value((at::arange(9, at::kDouble) - base).to(at::kBFloat16)));
  d.set("i", Value(at::arange(5, at::kLong) * static_cast<std::int64_t>(base)));
  d.set("m", Value(at::arange(6, at::kInt).remainder(2).eq(0)));
  d.set("meta", Value::dict({{Value("version"), Value(version)},
                             {Value("ranks"), Value::tuple({Value(pp), Value(tp), Value(rdp)})}}));
  return d;
}

class CommitTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = shared_dir(); }
  void TearDown() override {
    if (smp::is_initialized()) smp::shutdown();
    mpi_barrier();
    if (world_rank() == 0) {
      test::remove_tree(dir_);
    }
  }
  std::string file(const std::string& n) const { return dir_ + "/" + n; }
  std::string dir_;
};

TEST_F(CommitTest, PartialRoundTripsOnEveryGrid) {
  const int n = world_size();
  for (int pp : {1, 2}) {
    for (int tp : {1, 2, 4}) {
      if (n % (pp * tp) != 0) continue;
      smp::init(grid(pp, tp));
      const std::string f = file("rt_" + std::to_string(pp) + "x" + std::to_string(tp) + ".pt");
      const int mp = pp * tp;
      // v2: the rdp_rank-0 ranks write one file per (pp, tp).
      if (rdp_rank() == 0) {
        const SaveStats st = save(part_state(pp_rank(), tp_rank(), 0, 1), f);
        EXPECT_EQ(st.file, partial_file_name(f, {pp_rank(), tp_rank(), std::nullopt}));
        EXPECT_FALSE(st.skipped);
        EXPECT_GT(st.bytes, 0u);
        // save returned: the whole checkpoint is complete, manifest included.
        auto m = read_manifest(manifest_file_name(f));
        ASSERT_TRUE(m.has_value());
        EXPECT_EQ(m->save_id, st.save_id);
        EXPECT_EQ(static_cast<int>(m->files.size()), mp);
        EXPECT_EQ(m->pp_size, pp);
        EXPECT_EQ(m->tp_size, tp);
        EXPECT_FALSE(m->v3);
      } else {
        // A replica's call writes nothing and does not block.
        const SaveStats st = save(part_state(pp_rank(), tp_rank(), 0, 1), f);
        EXPECT_TRUE(st.skipped);
      }
      mpi_barrier();
      LoadStats ls;
      EXPECT_TRUE(equal(load(f, {}, &ls), part_state(pp_rank(), tp_rank(), 0, 1)))
          << "pp" << pp << " tp" << tp << " rank " << rank();
      EXPECT_TRUE(ls.smp_index);
      EXPECT_EQ(ls.file, partial_file_name(f, {pp_rank(), tp_rank(), std::nullopt}));

      // v3: every rank writes <f>_<pp>_<tp>_<rdp>; replaces the v2 files.
      SaveOptions v3;
      v3.v3 = true;
      const SaveStats st3 = save(part_state(pp_rank(), tp_rank(), rdp_rank(), 2), f, v3);
      EXPECT_EQ(st3.file, partial_file_name(f, {pp_rank(), tp_rank(), rdp_rank()}));
      mpi_barrier();
      EXPECT_TRUE(equal(load(f), part_state(pp_rank(), tp_rank(), rdp_rank(), 2)));
      auto m3 = read_manifest(manifest_file_name(f));
      ASSERT_TRUE(m3.has_value());
      EXPECT_TRUE(m3->v3);
      EXPECT_EQ(static_cast<int>(m3->files.size()), n);
      EXPECT_EQ(m3->save_id, st3.save_id);
      // The v2 parts of the earlier save were removed; no temporaries remain.
      EXPECT_FALSE(file_exists(partial_file_name(f, {pp_rank(), tp_rank(), std::nullopt})));
      for (const auto& p : files_with_prefix(f)) {
        EXPECT_EQ(p.find(".tmp-"), std::string::npos) << p;
      }
      mpi_barrier();  // nobody starts the next save while others still list the files
      // A second v2 save replaces the v3 checkpoint completely.
      if (rdp_rank() == 0) save(part_state(pp_rank(), tp_rank(), 0, 3), f);
      mpi_barrier();
      EXPECT_TRUE(equal(load(f), part_state(pp_rank(), tp_rank(), 0, 3)));
      EXPECT_FALSE(file_exists(partial_file_name(f, {pp_rank(), tp_rank(), rdp_rank()})));
      Reader r(partial_file_name(f, {pp_rank(), tp_rank(), std::nullopt}));
      EXPECT_EQ(r.index().info.at("save_id"), read_manifest(manifest_file_name(f))->save_id);
      EXPECT_EQ(r.index().info.at("tp_size"), std::to_string(tp));
      mpi_barrier();
      smp::shutdown();
    }
  }
}

TEST_F(CommitTest, WrongRankConditionFailsNamingMissingRanks) {
  if (world_size() < 2) GTEST_SKIP() << "needs a tensor-parallel group of 2";
  smp::init(grid(1, 2));
  const std::string f = file("wrong.pt");
  if (rdp_rank() == 0) save(part_state(pp_rank(), tp_rank(), 0, 1), f);
  mpi_barrier();
  SaveOptions opts;
  opts.timeout_s = 3;
  if (dp_rank() == 0) {  // the mistake smp v1 hangs on: tp_rank 1 never calls
    const std::string err = smp::test::error_of<smp::Error>([&] { save(part_state(pp_rank(), tp_rank(), 0, 2), f, opts); });
    EXPECT_NE(err.find("timed out after 3 s"), std::string::npos) << err;
    EXPECT_NE(err.find("Ranks that never called smp.save: rank 1 (pp_rank 0, tp_rank 1, "
                       "rdp_rank 0, dp_rank 1)"),
              std::string::npos)
        << err;
    EXPECT_NE(err.find("must be called by every rank with rdp_rank()==0 (not dp_rank()==0); "
                       "with shard_optimizer_state every rank must call it"),
              std::string::npos)
        << err;
  }
  mpi_barrier();
  // Nothing of the previous checkpoint was lost.
  EXPECT_TRUE(equal(load(f), part_state(pp_rank(), tp_rank(), 0, 1)));
  for (const auto& p : files_with_prefix(f)) EXPECT_EQ(p.find(".tmp-"), std::string::npos) << p;
  mpi_barrier();
}

TEST_F(CommitTest, CrashStatesAndReaderErrors) {
  smp::init(grid(1, 1));  // one part per rank only with v3; here: one file (0, 0)
  const std::string f = file("c.pt");
  const std::string g = file("g.pt");
  const std::string part = partial_file_name(f, {0, 0, std::nullopt});
  if (rank() == 0) {
    save(part_state(0, 0, 0, 1), f);
    save(part_state(0, 0, 0, 9), g);
  } else {
    EXPECT_TRUE(save(part_state(0, 0, 0, 1), f).skipped);
    EXPECT_TRUE(save(part_state(0, 0, 0, 9), g).skipped);
  }
  mpi_barrier();
  const std::string id1 = read_manifest(manifest_file_name(f))->save_id;

  // Crash before the commit point: a new part exists only as a temporary.
  if (rank() == 0) test::copy_file(partial_file_name(g, {0, 0, std::nullopt}), part + ".tmp-feedface");
  mpi_barrier();
  EXPECT_TRUE(equal(load(f), part_state(0, 0, 0, 1)));
  mpi_barrier();

  // Crash after the commit point, before the rename: the manifest names the
  // temporary's save id; the reader rolls forward.
  if (rank() == 0) {
    auto m = *read_manifest(manifest_file_name(f));
    const std::string gid = read_manifest(manifest_file_name(g))->save_id;
    test::remove_file(part + ".tmp-feedface");
    test::copy_file(partial_file_name(g, {0, 0, std::nullopt}), part + ".tmp-" + gid);
    m.save_id = gid;
    write_manifest(manifest_file_name(f), m);
  }
  mpi_barrier();
  EXPECT_TRUE(equal(load(f), part_state(0, 0, 0, 9)));
  mpi_barrier();

  // Mixed: the manifest names one save, the part belongs to another.
  if (rank() == 0) {
    for (const auto& p : files_with_prefix(f)) {
      if (p.find(".tmp-") != std::string::npos) test::remove_file(p);
    }
  }
  mpi_barrier();
  std::string err = smp::test::error_of<smp::Error>([&] { load(f); });
  EXPECT_NE(err.find("mixed checkpoint: '" + part + "' belongs to save id '" + id1 +
                     "' but the manifest '" + manifest_file_name(f) + "' names save id '"),
            std::string::npos)
      << err;
  mpi_barrier();

  // Layout mismatch.
  if (rank() == 0) {
    auto m = *read_manifest(manifest_file_name(f));
    m.save_id = id1;
    m.tp_size = 2;
    write_manifest(manifest_file_name(f), m);
  }
  mpi_barrier();
  err = smp::test::error_of<smp::Error>([&] { load(f); });
  EXPECT_NE(err.find("was saved with pipeline_parallel_degree 1, tensor_parallel_degree 2"),
            std::string::npos) << err;
  EXPECT_NE(err.find("smp.load(f, partial=True), which reshards it"), std::string::npos) << err;
  mpi_barrier();

  // Corrupt part: a flipped byte in tensor data fails its CRC-32.
  if (rank() == 0) {
    auto m = *read_manifest(manifest_file_name(f));
    m.tp_size = 1;
    write_manifest(manifest_file_name(f), m);
    Reader r(part);
    const auto off = r.index().tensors.front().offset;
    std::fstream io(part, std::ios::in | std::ios::out | std::ios::binary);
    io.seekg(static_cast<std::streamoff>(off));
    char c = 0;
    io.read(&c, 1);
    c = static_cast<char>(c ^ 0x5a);
    io.seekp(static_cast<std::streamoff>(off));
    io.write(&c, 1);
  }
  mpi_barrier();
  try {
    load(f);
    ADD_FAILURE() << "a corrupt part loaded";
  } catch (const CorruptCheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("fails its CRC-32 check"), std::string::npos) << e.what();
  }
  mpi_barrier();

  // Missing part: every rank refuses, naming the missing file.
  if (rank() == 0) test::remove_file(part);
  mpi_barrier();
  err = smp::test::error_of<smp::Error>([&] { load(f); });
  EXPECT_NE(err.find("incomplete checkpoint"), std::string::npos) << err;
  EXPECT_NE(err.find("are missing: '" + part + "'"), std::string::npos) << err;
  mpi_barrier();

  // Incomplete: parts written by smp.save but no manifest.
  if (rank() == 0) {
    test::remove_file(manifest_file_name(g));
  }
  mpi_barrier();
  err = smp::test::error_of<smp::Error>([&] { load(g); });
  EXPECT_NE(err.find("incomplete checkpoint (no manifest; a save was interrupted)"),
            std::string::npos) << err;
  mpi_barrier();
}

}  // namespace
}  // namespace ckpt
}  // namespace smp

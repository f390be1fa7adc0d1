// The MPI backend under mpirun with 1, 2, 4 or 8 ranks: every operation on the
// world and on every group kind of a rank grid that fits the world size.
#include "comm/mpi/communicator.h"

#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "smp/core/error.h"
#include "test_util.h"
#include "smp/core/topology.h"

namespace smp {
namespace {

/// (pp, tp) for the world size: np 8 pp2 tp2 rdp2, np 4 pp2 tp2, np 2 tp2.
std::pair<int, int> grid_for(int world) {
  if (world % 4 == 0) return {2, 2};
  if (world % 2 == 0) return {1, 2};
  return {1, 1};
}

const Topology& topology() {
  static const Topology topo = [] {
    const auto [pp, tp] = grid_for(mpi::world_size());
    return Topology(mpi::world_size(), pp, tp);
  }();
  return topo;
}

// ---- element encoding for the test (exactly representable values only) ----

std::uint16_t exact_half(double v) {
  if (std::isinf(v)) return v > 0 ? 0x7c00 : 0xfc00;
  if (v == 0) return std::signbit(v) ? 0x8000 : 0;
  int e = 0;
  const double m = std::frexp(std::fabs(v), &e);  // |v| = m * 2^e, m in [0.5, 1)
  const double mant = (m * 2 - 1) * 1024;
  EXPECT_EQ(mant, std::floor(mant)) << v << " is not exact in float16";
  EXPECT_TRUE(e - 1 + 15 >= 1 && e - 1 + 15 <= 30) << v << " is not a normal float16";
  return static_cast<std::uint16_t>((v < 0 ? 0x8000 : 0) | ((e - 1 + 15) << 10) |
                                    static_cast<int>(mant));
}

double half_value(std::uint16_t h) {
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  const double sign = (h & 0x8000) != 0 ? -1 : 1;
  if (exp == 0) return sign * std::ldexp(mant, -24);
  if (exp == 31) return mant == 0 ? sign * std::numeric_limits<double>::infinity() : NAN;
  return sign * std::ldexp(1024 + mant, exp - 25);
}

std::uint16_t exact_bf16(double v) {
  const float f = static_cast<float>(v);
  EXPECT_EQ(static_cast<double>(f), v);
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  EXPECT_EQ(u & 0xffffu, 0u) << v << " is not exact in bfloat16";
  return static_cast<std::uint16_t>(u >> 16);
}

double bf16_value(std::uint16_t b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

/// A typed buffer addressed by doubles.
class Buffer {
 public:
  Buffer(DataType dtype, std::size_t count) : dtype_(dtype), bytes_(count * element_size(dtype)) {}

  void* data() { return bytes_.data(); }
  std::size_t count() const { return bytes_.size() / element_size(dtype_); }

  void set(std::size_t i, double v) {
    unsigned char* p = bytes_.data() + i * element_size(dtype_);
    switch (dtype_) {
      case DataType::kFloat32: { float x = static_cast<float>(v); std::memcpy(p, &x, 4); break; }
      case DataType::kFloat64: std::memcpy(p, &v, 8); break;
      case DataType::kFloat16: { auto x = exact_half(v); std::memcpy(p, &x, 2); break; }
      case DataType::kBFloat16: { auto x = exact_bf16(v); std::memcpy(p, &x, 2); break; }
      case DataType::kInt8: { auto x = static_cast<std::int8_t>(v); std::memcpy(p, &x, 1); break; }
      case DataType::kUInt8: { auto x = static_cast<std::uint8_t>(v); std::memcpy(p, &x, 1); break; }
      case DataType::kInt32: { auto x = static_cast<std::int32_t>(v); std::memcpy(p, &x, 4); break; }
      case DataType::kInt64: { auto x = static_cast<std::int64_t>(v); std::memcpy(p, &x, 8); break; }
      case DataType::kBool: { bool x = v != 0; std::memcpy(p, &x, 1); break; }
    }
  }

  double get(std::size_t i) const {
    const unsigned char* p = bytes_.data() + i * element_size(dtype_);
    switch (dtype_) {
      case DataType::kFloat32: { float x; std::memcpy(&x, p, 4); return x; }
      case DataType::kFloat64: { double x; std::memcpy(&x, p, 8); return x; }
      case DataType::kFloat16: { std::uint16_t x; std::memcpy(&x, p, 2); return half_value(x); }
      case DataType::kBFloat16: { std::uint16_t x; std::memcpy(&x, p, 2); return bf16_value(x); }
      case DataType::kInt8: { std::int8_t x; std::memcpy(&x, p, 1); return x; }
      case DataType::kUInt8: { std::uint8_t x; std::memcpy(&x, p, 1); return x; }
      case DataType::kInt32: { std::int32_t x; std::memcpy(&x, p, 4); return x; }
      case DataType::kInt64: { std::int64_t x; std::memcpy(&x, p, 8); return static_cast<double>(x); }
      case DataType::kBool: { bool x; std::memcpy(&x, p, 1); return x ? 1 : 0; }
    }
    return NAN;
  }

 private:
  DataType dtype_;
  std::vector<unsigned char> bytes_;
};

bool is_integer(DataType d) {
  return d == DataType::kInt8 || d == DataType::kUInt8 || d == DataType::kInt32 ||
         d == DataType::kInt64;
}

/// Input of group rank r, element i, in a group of n, for op.
double input(ReduceOp op, DataType dtype, int r, int n, std::size_t i) {
  if (dtype == DataType::kBool) {
    const bool hit = r == static_cast<int>((i / 2) % static_cast<std::size_t>(n + 1));
    return (i % 2 == 0) == hit ? 1 : 0;
  }
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg: return (i % 2 == 0 ? 1.0 : -1.0) * static_cast<double>(r + 1 + i);
    case ReduceOp::kMax:
    case ReduceOp::kMin: return static_cast<double>((r * 7 + static_cast<int>(i) * 3) % 11) - 5;
    case ReduceOp::kProduct: {
      const int k = (r + static_cast<int>(i)) % 3;
      return k == 0 ? 2 : (k == 1 ? -1 : 1);
    }
  }
  return 0;
}

/// The reduction of input() over ranks 0..n-1, computed independently.
double expected(ReduceOp op, DataType dtype, int n, std::size_t i) {
  if (dtype == DataType::kBool) {
    bool any = false;
    bool all = true;
    for (int r = 0; r < n; ++r) {
      any = any || input(op, dtype, r, n, i) != 0;
      all = all && input(op, dtype, r, n, i) != 0;
    }
    return (op == ReduceOp::kSum || op == ReduceOp::kMax) ? any : all;
  }
  double acc = input(op, dtype, 0, n, i);
  for (int r = 1; r < n; ++r) {
    const double v = input(op, dtype, r, n, i);
    switch (op) {
      case ReduceOp::kSum:
      case ReduceOp::kAvg: acc += v; break;
      case ReduceOp::kMax: acc = std::max(acc, v); break;
      case ReduceOp::kMin: acc = std::min(acc, v); break;
      case ReduceOp::kProduct: acc *= v; break;
    }
  }
  if (op == ReduceOp::kAvg) acc = is_integer(dtype) ? std::trunc(acc / n) : acc / n;
  return acc;
}

const DataType kDtypes[] = {DataType::kFloat32, DataType::kFloat64, DataType::kInt64,
                            DataType::kFloat16, DataType::kBFloat16, DataType::kBool};
const ReduceOp kOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin,
                         ReduceOp::kProduct};

/// Compares element by element; one failure per buffer.
void expect_values(const Buffer& got, const std::vector<double>& want, const std::string& what) {
  std::string diffs;
  int shown = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double g = got.get(i);
    if (!(g == want[i]) && shown++ < 5) diffs += detail::str(" [", i, "] got ", g, " want ", want[i], ";");
  }
  EXPECT_TRUE(diffs.empty()) << what << ":" << diffs;
}

// ---- fixture: the world and one communicator per group kind ----------------

class MpiCommunicatorTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto& all = comms();
    all.push_back(mpi::make_world());
    for (int g = 1; g < kNumCommGroups; ++g) {
      const auto kind = static_cast<CommGroup>(g);
      all.push_back(mpi::make_group(to_string(kind), topology().all_groups(kind)));
    }
  }
  static void TearDownTestSuite() { comms().clear(); }

  static std::vector<std::unique_ptr<Communicator>>& comms() {
    static std::vector<std::unique_ptr<Communicator>> all;
    return all;
  }
};

TEST_F(MpiCommunicatorTest, LaunchAndWorld) {
  EXPECT_TRUE(mpi::launched_by_mpi());
  int size = 0;
  int rank = -1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  EXPECT_EQ(mpi::world_size(), size);
  EXPECT_EQ(mpi::world_rank(), rank);
  // mpirun on one host: every rank is node-local.
  EXPECT_EQ(mpi::local_rank_and_size(), std::make_pair(rank, size));
}

TEST_F(MpiCommunicatorTest, GroupsMatchTopology) {
  const int me = mpi::world_rank();
  for (int g = 0; g < kNumCommGroups; ++g) {
    const auto kind = static_cast<CommGroup>(g);
    const Communicator& c = *comms()[static_cast<std::size_t>(g)];
    SCOPED_TRACE(c.where());
    EXPECT_STREQ(c.backend(), "mpi");
    EXPECT_EQ(c.name(), to_string(kind));
    EXPECT_EQ(c.members(), topology().group_members(kind, me));
    EXPECT_EQ(c.rank(), topology().rank_of_type(me, static_cast<RankType>(g)));
    EXPECT_EQ(c.world_rank(), me);
  }
}

TEST_F(MpiCommunicatorTest, AllreduceEveryOpAndDtype) {
  constexpr std::size_t kCount = 13;
  for (auto& c : comms()) {
    const int n = c->size();
    for (DataType dtype : kDtypes) {
      for (ReduceOp op : kOps) {
        const std::string what =
            detail::str("allreduce ", to_string(op), " ", to_string(dtype), " on ", c->where());
        Buffer buf(dtype, kCount);
        std::vector<double> want(kCount);
        for (std::size_t i = 0; i < kCount; ++i) {
          buf.set(i, input(op, dtype, c->rank(), n, i));
          want[i] = expected(op, dtype, n, i);
        }
        if (dtype == DataType::kBool && op == ReduceOp::kAvg) {
          try {
            c->allreduce(buf.data(), kCount, dtype, op);
            ADD_FAILURE() << what << ": expected NotSupportedError";
          } catch (const NotSupportedError& e) {
            EXPECT_NE(std::string(e.what()).find("avg is not defined for bool"), std::string::npos)
                << e.what();
            EXPECT_NE(std::string(e.what()).find(c->name()), std::string::npos) << e.what();
          }
          continue;
        }
        c->allreduce(buf.data(), kCount, dtype, op);
        expect_values(buf, want, what);
      }
    }
  }
}

TEST_F(MpiCommunicatorTest, AllreduceLargeHalfAndFloat) {
  constexpr std::size_t kCount = std::size_t{1} << 18;
  for (auto& c : comms()) {
    const int n = c->size();
    for (DataType dtype : {DataType::kFloat32, DataType::kFloat16, DataType::kBFloat16}) {
      Buffer buf(dtype, kCount);
      for (std::size_t i = 0; i < kCount; ++i) buf.set(i, (c->rank() + 1) * ((i % 4) + 1));
      c->allreduce(buf.data(), kCount, dtype, ReduceOp::kSum);
      std::vector<double> want(kCount);
      for (std::size_t i = 0; i < kCount; ++i) want[i] = n * (n + 1) / 2.0 * ((i % 4) + 1);
      expect_values(buf, want, detail::str("large sum ", to_string(dtype), " on ", c->where()));
    }
  }
}

// Two-member groups: the reduction is one rounding of the exact sum, so ties
// show round-to-nearest-even and overflow shows infinity.
TEST_F(MpiCommunicatorTest, HalfPrecisionRoundsToNearestEven) {
  for (auto& c : comms()) {
    if (c->size() != 2) continue;
    SCOPED_TRACE(c->where());
    const bool first = c->rank() == 0;
    Buffer h(DataType::kFloat16, 4);
    const double h_in[2][4] = {{2048, 2048, 65504, 0.5}, {1, 3, 16, 0.25}};
    for (std::size_t i = 0; i < 4; ++i) h.set(i, h_in[first ? 0 : 1][i]);
    c->allreduce(h.data(), 4, DataType::kFloat16, ReduceOp::kSum);
    expect_values(h, {2048, 2052, std::numeric_limits<double>::infinity(), 0.75}, "float16 sum");

    Buffer b(DataType::kBFloat16, 4);
    const double b_in[2][4] = {{256, 256, 1, 1}, {1, 3, 0.00390625, 0.01171875}};
    for (std::size_t i = 0; i < 4; ++i) b.set(i, b_in[first ? 0 : 1][i]);
    c->allreduce(b.data(), 4, DataType::kBFloat16, ReduceOp::kSum);
    expect_values(b, {256, 260, 1, 1.015625}, "bfloat16 sum");
  }
}

TEST_F(MpiCommunicatorTest, Allgather) {
  constexpr std::size_t kCount = 3;
  for (auto& c : comms()) {
    const int n = c->size();
    for (DataType dtype : {DataType::kFloat32, DataType::kInt64, DataType::kBFloat16}) {
      Buffer send(dtype, kCount);
      for (std::size_t j = 0; j < kCount; ++j) send.set(j, c->rank() * 10 + j);
      Buffer recv(dtype, kCount * n);
      c->allgather(send.data(), recv.data(), kCount, dtype);
      std::vector<double> want(kCount * n);
      for (int r = 0; r < n; ++r) {
        for (std::size_t j = 0; j < kCount; ++j) want[r * kCount + j] = r * 10 + j;
      }
      expect_values(recv, want, detail::str("allgather ", to_string(dtype), " on ", c->where()));

      // In place: this rank's block already sits in the output.
      Buffer inplace(dtype, kCount * n);
      for (std::size_t j = 0; j < kCount; ++j) inplace.set(c->rank() * kCount + j, c->rank() * 10 + j);
      auto* mine = static_cast<char*>(inplace.data()) + c->rank() * kCount * element_size(dtype);
      c->allgather(mine, inplace.data(), kCount, dtype);
      expect_values(inplace, want, detail::str("allgather in place on ", c->where()));
    }
  }
}

TEST_F(MpiCommunicatorTest, ReduceScatter) {
  constexpr std::size_t kCount = 5;
  for (auto& c : comms()) {
    const int n = c->size();
    const int me = c->rank();
    for (auto [dtype, op] : {std::make_pair(DataType::kFloat32, ReduceOp::kSum),
                             std::make_pair(DataType::kInt64, ReduceOp::kSum),
                             std::make_pair(DataType::kFloat64, ReduceOp::kAvg),
                             std::make_pair(DataType::kInt64, ReduceOp::kMax),
                             std::make_pair(DataType::kFloat16, ReduceOp::kSum)}) {
      const std::string what = detail::str("reduce_scatter ", to_string(op), " ",
                                           to_string(dtype), " on ", c->where());
      auto value = [](int r, int block, std::size_t j) { return r + 1 + block * 10 + j; };
      Buffer send(dtype, kCount * n);
      for (int b = 0; b < n; ++b) {
        for (std::size_t j = 0; j < kCount; ++j) send.set(b * kCount + j, value(me, b, j));
      }
      std::vector<double> want(kCount);
      for (std::size_t j = 0; j < kCount; ++j) {
        double acc = op == ReduceOp::kMax ? value(n - 1, me, j) : 0;
        if (op != ReduceOp::kMax) {
          for (int r = 0; r < n; ++r) acc += value(r, me, j);
        }
        want[j] = op == ReduceOp::kAvg ? acc / n : acc;
      }
      Buffer recv(dtype, kCount);
      c->reduce_scatter(send.data(), recv.data(), kCount, dtype, op);
      expect_values(recv, want, what);

      // In place: the input is the whole buffer, the result lands at its start.
      c->reduce_scatter(send.data(), send.data(), kCount, dtype, op);
      expect_values(send, want, what + " in place");
    }
  }
}

TEST_F(MpiCommunicatorTest, BroadcastFromEveryRoot) {
  constexpr std::size_t kCount = 7;
  for (auto& c : comms()) {
    for (int root = 0; root < c->size(); ++root) {
      for (DataType dtype : {DataType::kFloat32, DataType::kInt64, DataType::kFloat16}) {
        Buffer buf(dtype, kCount);
        for (std::size_t j = 0; j < kCount; ++j) buf.set(j, c->rank() == root ? static_cast<double>(root * 100 + j) : -1.0);
        c->broadcast(buf.data(), kCount, dtype, root);
        std::vector<double> want(kCount);
        for (std::size_t j = 0; j < kCount; ++j) want[j] = root * 100 + j;
        expect_values(buf, want, detail::str("broadcast root ", root, " ", to_string(dtype), " on ",
                                             c->where()));
      }
    }
  }
}

TEST_F(MpiCommunicatorTest, RingSendRecv) {
  for (auto& c : comms()) {
    const int n = c->size();
    const int me = c->rank();
    if (n == 1) {
      float out[3] = {1, 2, 3};
      float in[3] = {0, 0, 0};
      c->send(out, 3, DataType::kFloat32, 0);  // small: completes eagerly
      c->recv(in, 3, DataType::kFloat32, 0);
      EXPECT_EQ(std::vector<float>(in, in + 3), std::vector<float>(out, out + 3)) << c->where();
      continue;
    }
    const int next = (me + 1) % n;
    const int prev = (me + n - 1) % n;
    for (std::size_t count : {std::size_t{5}, std::size_t{1} << 20}) {
      std::vector<float> out(count);
      std::vector<float> in(count, -1);
      for (std::size_t j = 0; j < count; ++j) out[j] = static_cast<float>(me * 1000 + j % 1000);
      // Even ranks send first: a blocking send of a large message waits for its receiver.
      if (me % 2 == 0) {
        c->send(out.data(), count, DataType::kFloat32, next);
        c->recv(in.data(), count, DataType::kFloat32, prev);
      } else {
        c->recv(in.data(), count, DataType::kFloat32, prev);
        c->send(out.data(), count, DataType::kFloat32, next);
      }
      std::size_t bad = 0;
      for (std::size_t j = 0; j < count; ++j) bad += in[j] != static_cast<float>(prev * 1000 + j % 1000);
      EXPECT_EQ(bad, 0u) << "ring of " << count << " floats on " << c->where();
    }
  }
}

std::string pattern(std::size_t size, int seed) {
  std::string s(size, '\0');
  for (std::size_t i = 0; i < size; ++i) s[i] = static_cast<char>((i * 31 + seed * 7) & 0xff);
  return s;
}

TEST_F(MpiCommunicatorTest, SendRecvBytes) {
  for (auto& c : comms()) {
    const int n = c->size();
    const int me = c->rank();
    for (std::size_t size : {std::size_t{0}, std::size_t{1}, std::size_t{3} << 20}) {
      if (n == 1) {
        if (size > 1) continue;  // a large blocking send to self would wait for its own recv
        c->send_bytes(pattern(size, 0), 0);
        EXPECT_EQ(c->recv_bytes(0), pattern(size, 0)) << c->where();
        continue;
      }
      const int next = (me + 1) % n;
      const int prev = (me + n - 1) % n;
      std::string got;
      if (me % 2 == 0) {
        c->send_bytes(pattern(size, me), next);
        got = c->recv_bytes(prev);
      } else {
        got = c->recv_bytes(prev);
        c->send_bytes(pattern(size, me), next);
      }
      EXPECT_EQ(got.size(), size) << c->where();
      EXPECT_TRUE(got == pattern(size, prev)) << size << " bytes on " << c->where();
    }
  }
}

// A byte message and a tensor message in flight together each reach their own
// kind of receive, whatever the order of the receives.
TEST_F(MpiCommunicatorTest, BytesNeverMatchTensors) {
  for (auto& c : comms()) {
    if (c->size() == 1) continue;
    const int me = c->rank();
    if (me % 2 == 0) {
      const std::int64_t value = 42 + me;
      c->send_bytes("hello", me + 1);
      c->send(&value, 1, DataType::kInt64, me + 1);
    } else {
      std::int64_t value = 0;
      c->recv(&value, 1, DataType::kInt64, me - 1);
      EXPECT_EQ(value, 42 + me - 1) << c->where();
      EXPECT_EQ(c->recv_bytes(me - 1), "hello") << c->where();
    }
    c->barrier();
  }
}

TEST_F(MpiCommunicatorTest, AllgatherBytesOfDifferentLengths) {
  for (auto& c : comms()) {
    const int n = c->size();
    const std::string mine(static_cast<std::size_t>(c->rank()) * 3, static_cast<char>('a' + c->rank()));
    const std::vector<std::string> all = c->allgather_bytes(mine);
    ASSERT_EQ(all.size(), static_cast<std::size_t>(n)) << c->where();
    for (int r = 0; r < n; ++r) {
      EXPECT_EQ(all[r], std::string(static_cast<std::size_t>(r) * 3, static_cast<char>('a' + r)))
          << "rank " << r << " on " << c->where();
    }
  }
}

TEST_F(MpiCommunicatorTest, BroadcastBytesFromEveryRoot) {
  for (auto& c : comms()) {
    for (int root = 0; root < c->size(); ++root) {
      const std::string want = pattern(1000 + root * 17, root);
      const std::string got = c->broadcast_bytes(c->rank() == root ? want : "ignored", root);
      EXPECT_TRUE(got == want) << "root " << root << " on " << c->where();
    }
  }
}

TEST_F(MpiCommunicatorTest, Barrier) {
  for (auto& c : comms()) {
    for (int i = 0; i < 3; ++i) EXPECT_NO_THROW(c->barrier()) << c->where();
  }
}

TEST_F(MpiCommunicatorTest, PeerOutOfRangeNamesGroupAndRange) {
  for (auto& c : comms()) {
    const int n = c->size();
    const std::string range = detail::str("valid peers are 0..", n - 1);
    float x = 0;
    std::string text = test::error_of<Error>([&] { c->send(&x, 1, DataType::kFloat32, n); });
    EXPECT_NE(text.find(detail::str("send: peer rank ", n)), std::string::npos) << text;
    EXPECT_NE(text.find(c->name()), std::string::npos) << text;
    EXPECT_NE(text.find(range), std::string::npos) << text;
    text = test::error_of<Error>([&] { c->recv(&x, 1, DataType::kFloat32, -1); });
    EXPECT_NE(text.find("recv: peer rank -1"), std::string::npos) << text;
    EXPECT_NE(text.find(range), std::string::npos) << text;
    text = test::error_of<Error>([&] { c->broadcast(&x, 1, DataType::kFloat32, n); });
    EXPECT_NE(text.find("broadcast: peer rank"), std::string::npos) << text;
    text = test::error_of<Error>([&] { c->recv_bytes(n + 3); });
    EXPECT_NE(text.find("recv_bytes: peer rank"), std::string::npos) << text;
  }
}

TEST_F(MpiCommunicatorTest, RecvTimeoutNamesOpGroupRankAndCommStaysUsable) {
  CommOptions quick;
  quick.timeout = std::chrono::seconds(1);
  for (auto& c : comms()) {
    const int peer = (c->rank() + 1) % c->size();
    float x = 0;
    std::string text;
    try {
      c->recv(&x, 1, DataType::kFloat32, peer, quick);
      ADD_FAILURE() << "recv without a sender returned on " << c->where();
    } catch (const TimeoutError& e) {
      text = e.what();
    }
    EXPECT_NE(text.find("recv of 1 float32 from group rank"), std::string::npos) << text;
    EXPECT_NE(text.find(c->name()), std::string::npos) << text;
    EXPECT_NE(text.find(detail::str("rank ", c->rank(), " of ", c->size())), std::string::npos) << text;
    EXPECT_NE(text.find("did not complete within 1 s"), std::string::npos) << text;
    EXPECT_NE(text.find("calls send to group rank"), std::string::npos) << text;
    EXPECT_NO_THROW(c->barrier()) << c->where();
  }
  // The cancelled receive must not swallow a later message.
  auto& world = *comms()[0];
  if (world.size() >= 2) {
    if (world.rank() == 0) {
      const float v = 7;
      world.send(&v, 1, DataType::kFloat32, 1);
    } else if (world.rank() == 1) {
      float v = 0;
      world.recv(&v, 1, DataType::kFloat32, 0);
      EXPECT_EQ(v, 7.0f);
    }
  }
  world.barrier();
}

TEST_F(MpiCommunicatorTest, RecvBytesTimeout) {
  CommOptions quick;
  quick.timeout = std::chrono::milliseconds(500);
  auto& world = *comms()[0];
  const std::string text = test::error_of<Error>([&] { world.recv_bytes(0, quick); });
  EXPECT_NE(text.find("recv_bytes from group rank 0"), std::string::npos) << text;
  EXPECT_NE(text.find("did not complete within 0.5 s"), std::string::npos) << text;
  EXPECT_NE(text.find("group WORLD"), std::string::npos) << text;
  world.barrier();
}

// A collective that one member never joins times out on the others with a
// message that names the collective, the group and its members.
TEST_F(MpiCommunicatorTest, CollectiveTimeoutNamesGroupAndMembers) {
  auto& world = *comms()[0];
  if (world.size() == 1) GTEST_SKIP() << "needs two ranks";
  std::vector<int> all(static_cast<std::size_t>(world.size()));
  for (int r = 0; r < world.size(); ++r) all[static_cast<std::size_t>(r)] = r;
  auto late = mpi::make_group("LATE", {all});
  CommOptions quick;
  quick.timeout = std::chrono::seconds(1);
  if (world.rank() != 0) {
    const std::string text = test::error_of<Error>([&] { late->barrier(quick); });
    EXPECT_NE(text.find("barrier on group LATE"), std::string::npos) << text;
    EXPECT_NE(text.find("did not complete within 1 s"), std::string::npos) << text;
    EXPECT_NE(text.find("members of the group (world ranks): " + detail::str("[0, 1")),
              std::string::npos) << text;
    EXPECT_NE(text.find("check that every member calls barrier"), std::string::npos) << text;
  }
  world.barrier();
  // Rank 0 joins late, which lets the abandoned barriers finish before LATE is freed.
  if (world.rank() == 0) late->barrier();
  world.barrier();
}

TEST_F(MpiCommunicatorTest, CountMismatchIsAnError) {
  auto& world = *comms()[0];
  if (world.size() == 1) GTEST_SKIP() << "needs two ranks";
  const int me = world.rank();
  if (me % 2 == 0) {
    const float out[3] = {1, 2, 3};
    world.send(out, 3, DataType::kFloat32, me + 1);
  } else {
    float in[4] = {};
    const std::string text = test::error_of<Error>([&] { world.recv(in, 4, DataType::kFloat32, me - 1); });
    EXPECT_NE(text.find("expected 4 elements but the message holds 3"), std::string::npos) << text;
  }
  world.barrier();
}

TEST_F(MpiCommunicatorTest, MakeGroupRejectsInvalidGroups) {
  const int n = mpi::world_size();
  std::vector<int> all;
  for (int r = 0; r < n; ++r) all.push_back(r);

  std::string text = test::error_of<Error>([&] { mpi::make_group("BAD", {all, {0}}); });
  EXPECT_NE(text.find("make_group(BAD): world rank 0 appears in group 0 and in group 1"),
            std::string::npos) << text;
  std::vector<int> too_many = all;
  too_many.push_back(n);
  text = test::error_of<Error>([&] { mpi::make_group("BAD", {too_many}); });
  EXPECT_NE(text.find(detail::str("holds world rank ", n, ", outside the world")), std::string::npos)
      << text;
  if (n > 1) {
    text = test::error_of<Error>([&] { mpi::make_group("BAD", {{0}}); });
    EXPECT_NE(text.find("world rank 1 is in no group"), std::string::npos) << text;
    // Each rank's groups are valid on their own, but they disagree.
    std::vector<std::vector<int>> groups;
    if (mpi::world_rank() == 0) {
      groups = {all};
    } else {
      for (int r = 0; r < n; ++r) groups.push_back({r});
    }
    text = test::error_of<Error>([&] { mpi::make_group("MIXED", groups); });
    EXPECT_NE(text.find("the ranks passed different groups"), std::string::npos) << text;
  }
  // Still in step: a valid group works afterwards.
  auto group = mpi::make_group("ALL", {all});
  EXPECT_EQ(group->size(), n);
  group->barrier();
}

}  // namespace
}  // namespace smp

// The local backend: a group of one process. Runs in every process of every
// mpirun size; it never communicates.
#include "comm/local/communicator.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "smp/core/error.h"
#include "test_util.h"

namespace smp {
namespace {

TEST(LocalCommunicator, IsAGroupOfOne) {
  auto c = local::make_group("TP_GROUP");
  EXPECT_STREQ(c->backend(), "local");
  EXPECT_EQ(c->name(), "TP_GROUP");
  EXPECT_EQ(c->size(), 1);
  EXPECT_EQ(c->rank(), 0);
  EXPECT_EQ(c->world_rank(), 0);
  EXPECT_EQ(c->members(), std::vector<int>{0});
  EXPECT_EQ(c->where(), "group TP_GROUP (rank 0 of 1, world rank 0, backend local)");
}

TEST(LocalCommunicator, CollectivesKeepOrCopyTheData) {
  auto c = local::make_group("WORLD");
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin,
                      ReduceOp::kProduct}) {
    std::vector<float> f = {1.5f, -2.0f, 3.0f};
    c->allreduce(f.data(), f.size(), DataType::kFloat32, op);
    EXPECT_EQ(f, (std::vector<float>{1.5f, -2.0f, 3.0f})) << to_string(op);
    std::vector<std::int64_t> i = {-3, 5};
    c->allreduce(i.data(), i.size(), DataType::kInt64, op);
    EXPECT_EQ(i, (std::vector<std::int64_t>{-3, 5})) << to_string(op);
  }
  bool b[2] = {true, false};
  c->allreduce(b, 2, DataType::kBool, ReduceOp::kMax);
  EXPECT_TRUE(b[0]);
  EXPECT_FALSE(b[1]);
  const std::string text =
      test::error_of<Error>([&] { c->allreduce(b, 2, DataType::kBool, ReduceOp::kAvg); });
  EXPECT_NE(text.find("avg is not defined for bool"), std::string::npos) << text;

  const std::int32_t send[3] = {7, 8, 9};
  std::int32_t recv[3] = {};
  c->allgather(send, recv, 3, DataType::kInt32);
  EXPECT_EQ(std::vector<std::int32_t>(recv, recv + 3), std::vector<std::int32_t>(send, send + 3));
  std::int32_t scattered[3] = {};
  c->reduce_scatter(send, scattered, 3, DataType::kInt32, ReduceOp::kSum);
  EXPECT_EQ(std::vector<std::int32_t>(scattered, scattered + 3),
            std::vector<std::int32_t>(send, send + 3));
  c->reduce_scatter(recv, recv, 3, DataType::kInt32, ReduceOp::kSum);  // in place
  EXPECT_EQ(recv[2], 9);

  double d[2] = {1, 2};
  c->broadcast(d, 2, DataType::kFloat64, 0);
  EXPECT_EQ(d[1], 2.0);
  c->barrier();

  EXPECT_EQ(c->allgather_bytes("abc"), std::vector<std::string>{"abc"});
  EXPECT_EQ(c->allgather_bytes(""), std::vector<std::string>{""});
  EXPECT_EQ(c->broadcast_bytes("xyz", 0), "xyz");
}

TEST(LocalCommunicator, SelfSendIsFifoAndBytesAreSeparate) {
  auto c = local::make_group("PP_GROUP");
  const float a[2] = {1, 2};
  const float b[2] = {3, 4};
  c->send(a, 2, DataType::kFloat32, 0);
  c->send_bytes("first", 0);
  c->send(b, 2, DataType::kFloat32, 0);
  c->send_bytes("", 0);
  c->send_bytes(std::string(3 << 20, 'z'), 0);

  float got[2] = {};
  c->recv(got, 2, DataType::kFloat32, 0);
  EXPECT_EQ(got[0], 1.0f);
  EXPECT_EQ(c->recv_bytes(0), "first");
  EXPECT_EQ(c->recv_bytes(0), "");
  c->recv(got, 2, DataType::kFloat32, 0);
  EXPECT_EQ(got[1], 4.0f);
  EXPECT_EQ(c->recv_bytes(0), std::string(3 << 20, 'z'));
}

TEST(LocalCommunicator, ErrorsNameTheGroup) {
  auto c = local::make_group("DP_GROUP");
  float x = 0;
  std::string text = test::error_of<Error>([&] { c->recv(&x, 1, DataType::kFloat32, 0); });
  EXPECT_NE(text.find("no message was sent to self"), std::string::npos) << text;
  EXPECT_NE(text.find("group DP_GROUP"), std::string::npos) << text;
  text = test::error_of<Error>([&] { c->recv_bytes(0); });
  EXPECT_NE(text.find("recv_bytes on group DP_GROUP"), std::string::npos) << text;
  EXPECT_NE(text.find("no message was sent to self"), std::string::npos) << text;

  text = test::error_of<Error>([&] { c->send(&x, 1, DataType::kFloat32, 1); });
  EXPECT_NE(text.find("send: peer rank 1 is outside group DP_GROUP"), std::string::npos) << text;
  EXPECT_NE(text.find("valid peers are 0..0"), std::string::npos) << text;
  text = test::error_of<Error>([&] { c->broadcast(&x, 1, DataType::kFloat32, 2); });
  EXPECT_NE(text.find("broadcast: peer rank 2"), std::string::npos) << text;

  c->send(&x, 1, DataType::kFloat32, 0);
  double wrong[2];
  text = test::error_of<Error>([&] { c->recv(wrong, 2, DataType::kFloat64, 0); });
  EXPECT_NE(text.find("holds 1 float32"), std::string::npos) << text;
}

}  // namespace
}  // namespace smp

// Tensor-parallel functions, layers and modules (smp/nn/*) under mpirun with
// 1, 2, 4 or 8 ranks: forward and backward against the non-distributed
// computation done locally on every rank from the same seeded full weights and
// the union of the TP group's batches.
#include <gtest/gtest.h>

#include "test_util.h"
#include <mpi.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "smp/core/error.h"
#include "smp/core/shard_spec.h"
#include "smp/nn/functional.h"
#include "smp/nn/layers.h"
#include "smp/nn/modules.h"
#include "smp/runtime.h"
#include "smp/torch/collectives.h"

namespace smp::nn {
namespace {

int world() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

/// The tensor-parallel degrees to test on this world: all ranks in one TP
/// group, and tp 2 with rdp > 1 where the world allows.
std::vector<int> tp_degrees() {
  std::vector<int> out{world()};
  if (world() > 2 && world() % 2 == 0) out.push_back(2);
  return out;
}

void start(int tp, bool prescaled) {
  init({{"tensor_parallel_degree", std::int64_t{tp}}, {"ddp", true},
        {"prescaled_batch", prescaled}});
}

at::Tensor randn(std::vector<std::int64_t> shape, std::uint64_t seed) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, g, at::TensorOptions().dtype(at::kFloat));
}

at::Tensor leaf(const at::Tensor& t) { return t.detach().clone().requires_grad_(true); }

/// Batch size of TP member m (they differ on purpose).
std::int64_t batch_of(int m) { return 1 + m % 3; }

/// Rows of TP member m within the union of the members' batches.
std::pair<std::int64_t, std::int64_t> rows_of(int m) {
  std::int64_t off = 0;
  for (int i = 0; i < m; ++i) off += batch_of(i);
  return {off, batch_of(m)};
}

/// Every member's tensor of shape [batch_of(m), rest...] drawn from seed + m, concatenated.
at::Tensor union_of(std::vector<std::int64_t> rest, std::uint64_t seed) {
  std::vector<at::Tensor> parts;
  for (int m = 0; m < tp_size(); ++m) {
    std::vector<std::int64_t> shape{batch_of(m)};
    shape.insert(shape.end(), rest.begin(), rest.end());
    parts.push_back(randn(shape, seed + m));
  }
  return at::cat(parts, 0);
}

at::Tensor mine(const at::Tensor& all) {
  auto [off, n] = rows_of(tp_rank());
  return all.narrow(0, off, n);
}

#define EXPECT_CLOSE(a, b)                                                              \
  do {                                                                                  \
    const at::Tensor a_ = (a), b_ = (b);                                                \
    ASSERT_EQ(a_.sizes(), b_.sizes()) << #a << " vs " << #b;                            \
    EXPECT_TRUE(at::allclose(a_, b_, 1e-4, 1e-5))                                       \
        << #a << " vs " << #b << ": max diff " << (a_ - b_).abs().max().item<double>(); \
  } while (0)

class NnTest : public ::testing::Test {
 protected:
  void TearDown() override {
    if (is_initialized()) shutdown();
  }
};

using test::error_of;

TEST_F(NnTest, FunctionalForwardAndBackwardAreAdjoint) {
  for (int tp : tp_degrees()) {
    SCOPED_TRACE(::testing::Message() << "tp " << tp);
    start(tp, false);
    const int r = tp_rank(), n = tp_size();
    const CommGroup g = CommGroup::kTpGroup;
    // gather_batch: variable batch sizes; the backward sums the members' gradients of my rows.
    {
      const at::Tensor all = union_of({3}, 10), grads = randn({n, all.size(0), 3}, 20);
      at::Tensor x = leaf(mine(all));
      at::Tensor out = gather_batch(x, g);
      EXPECT_CLOSE(out, all);
      out.backward(grads[r]);
      EXPECT_CLOSE(x.grad(), mine(grads.sum(0)));
    }
    // reduce_scatter_batch: the sum over members of my rows; the backward gathers.
    {
      const at::Tensor inputs = randn({n, rows_of(n - 1).first + batch_of(n - 1), 2}, 30);
      const at::Tensor grads = union_of({2}, 40);
      at::Tensor x = leaf(inputs[r]);
      at::Tensor out = reduce_scatter_batch(x, batch_of(r), g);
      EXPECT_CLOSE(out, mine(inputs.sum(0)));
      out.backward(mine(grads));
      EXPECT_CLOSE(x.grad(), grads);
      EXPECT_NE(error_of<ConfigError>([&] { reduce_scatter_batch(x, batch_of(r) + 1, g); })
                    .find("members' batches add up to"),
                std::string::npos);
    }
    // reduce_from_group / copy_to_group
    {
      const at::Tensor inputs = randn({n, 4}, 50), grads = randn({n, 4}, 60);
      at::Tensor x = leaf(inputs[r]);
      at::Tensor out = reduce_from_group(x, g);
      EXPECT_CLOSE(out, inputs.sum(0));
      out.backward(grads[r]);
      EXPECT_CLOSE(x.grad(), grads[r]);
      at::Tensor y = leaf(inputs[0]);
      at::Tensor same = copy_to_group(y, g);
      EXPECT_CLOSE(same, inputs[0]);
      same.backward(grads[r]);
      EXPECT_CLOSE(y.grad(), grads.sum(0));
    }
    // scatter_to_group / gather_from_group / allgather_along with uneven pieces
    {
      const at::Tensor full = randn({3, 10}, 70), grads = randn({n, 3, 10}, 80);
      const auto sizes = split_sizes(10, n);
      const std::int64_t off = split_offset(10, n, r);
      at::Tensor x = leaf(full);
      at::Tensor piece = scatter_to_group(x, 1, g);
      EXPECT_CLOSE(piece, full.narrow(1, off, sizes[r]));
      piece.backward(grads[r].narrow(1, off, sizes[r]));
      std::vector<at::Tensor> pieces;
      for (int m = 0; m < n; ++m)
        pieces.push_back(grads[m].narrow(1, split_offset(10, n, m), sizes[m]));
      EXPECT_CLOSE(x.grad(), at::cat(pieces, 1));

      at::Tensor p = leaf(full.narrow(1, off, sizes[r]));
      at::Tensor whole = gather_from_group(p, -1, g);
      EXPECT_CLOSE(whole, full);
      whole.backward(grads[r]);
      EXPECT_CLOSE(p.grad(), grads[r].narrow(1, off, sizes[r]));
      EXPECT_CLOSE(allgather_along(full.narrow(1, off, sizes[r]), 1, g), full);
    }
    shutdown();
  }
}

std::map<std::string, at::Tensor> random_full(const ShardedModule& m, std::uint64_t seed) {
  std::map<std::string, at::Tensor> full;
  for (const ParamLayout& p : m.layouts()) full[p.name] = randn(p.global_shape, seed++) * 0.5;
  return full;
}

/// Loads `full` into the module and checks gather_full gives it back.
void load_and_check(ShardedModule& m, const std::map<std::string, at::Tensor>& full) {
  for (const auto& [name, t] : full) m.load_full(name, t);
  for (const auto& [name, t] : full) EXPECT_CLOSE(m.gather_full(name), t);
}

/// Every local weight gradient equals this rank's slice of the reference
/// gradient; replicated ones summed over the group when each rank saw its own batch.
void check_param_grads(ShardedModule& m, std::map<std::string, at::Tensor> ref_params,
                       bool prescaled) {
  for (const ParamLayout& p : m.layouts()) {
    SCOPED_TRACE(p.name);
    const at::Tensor local = m.local(p.name);
    ASSERT_EQ(local.defined(), p.held_by(tp_rank()));
    if (!local.defined()) continue;
    ASSERT_TRUE(local.grad().defined());
    at::Tensor got = local.grad().clone();
    if (!p.distributed() && !prescaled) smp::allreduce(got, CommGroup::kTpGroup);
    EXPECT_CLOSE(got, local_slice(p, ref_params.at(p.name).grad(), tp_size(), tp_rank()));
  }
}

std::map<std::string, at::Tensor> leaves(const std::map<std::string, at::Tensor>& full) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [k, v] : full) out[k] = leaf(v);
  return out;
}

/// The input for this rank: its own rows of the union, or the shared batch.
struct Batch {
  at::Tensor all;    ///< what the reference sees
  at::Tensor local;  ///< what this rank passes
};

Batch float_batch(bool prescaled, std::vector<std::int64_t> rest, std::uint64_t seed) {
  if (prescaled) {
    std::vector<std::int64_t> shape{3};
    shape.insert(shape.end(), rest.begin(), rest.end());
    at::Tensor t = randn(shape, seed);
    return {t, t};
  }
  at::Tensor all = union_of(rest, seed);
  return {all, mine(all)};
}

TEST_F(NnTest, LinearMatchesFullLinear) {
  for (int tp : tp_degrees()) {
    for (bool prescaled : {false, true}) {
      for (std::int64_t in : {10, 16}) {
        SCOPED_TRACE(::testing::Message() << "tp " << tp << " prescaled " << prescaled << " in "
                                          << in);
        start(tp, prescaled);
        DistributedLinear fc(DistributedLinearOptions{in, 5, true, 3});
        // A fresh module holds slices of one full init, whatever the rank.
        const auto init = init_local(fc->layouts(), 3, 1, 0);
        EXPECT_CLOSE(fc->gather_full("weight"), init[0]);
        EXPECT_CLOSE(fc->gather_full("bias"), init[1]);
        EXPECT_EQ(fc->local("bias").defined(), tp_rank() == 0);
        const auto specs = fc->shard_specs();
        EXPECT_EQ(specs.at("weight").split_dim, 1);
        EXPECT_EQ(specs.at("weight").local_shape()[1], split_sizes(in, tp)[tp_rank()]);

        const auto full = random_full(*fc, 100);
        load_and_check(*fc, full);
        auto ref = leaves(full);
        const Batch x = float_batch(prescaled, {2, in}, 200);
        at::Tensor xl = leaf(x.local), xa = leaf(x.all);
        const Batch g = float_batch(prescaled, {2, 5}, 300);
        at::Tensor out = fc(xl);
        at::Tensor expected = at::linear(xa, ref["weight"], ref["bias"]);
        EXPECT_CLOSE(out, prescaled ? expected : mine(expected));
        out.backward(g.local);
        expected.backward(g.all);
        EXPECT_CLOSE(xl.grad(), prescaled ? xa.grad() : mine(xa.grad()));
        check_param_grads(*fc, ref, prescaled);
        shutdown();
      }
    }
  }
}

TEST_F(NnTest, EmbeddingMatchesFullEmbedding) {
  for (int tp : tp_degrees()) {
    for (bool prescaled : {false, true}) {
      for (bool vocab : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "tp " << tp << " prescaled " << prescaled
                                          << " vocab_parallel " << vocab);
        start(tp, prescaled);
        DistributedEmbeddingOptions o;
        o.num_embeddings = 11;
        o.embedding_dim = 6;
        o.padding_idx = -2;  // 9
        o.vocab_parallel = vocab;
        o.seed = 5;
        DistributedEmbedding emb(o);
        EXPECT_EQ(*emb->options().padding_idx, 9);
        EXPECT_CLOSE(emb->gather_full("weight")[9], at::zeros({6}));
        EXPECT_EQ(emb->shard_specs().at("weight").split_dim, vocab ? 0 : 1);
        const auto full = random_full(*emb, 400);
        load_and_check(*emb, full);
        auto ref = leaves(full);
        at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(500 + (prescaled ? 0 : tp_rank()));
        at::Tensor ids_all;
        if (prescaled) {
          ids_all = at::randint(11, {3, 4}, gen, at::TensorOptions().dtype(at::kLong));
        } else {
          std::vector<at::Tensor> parts;
          for (int m = 0; m < tp_size(); ++m) {
            at::Generator gm = at::make_generator<at::CPUGeneratorImpl>(500 + m);
            parts.push_back(at::randint(11, {batch_of(m), 4}, gm, at::TensorOptions().dtype(at::kLong)));
          }
          ids_all = at::cat(parts, 0);
        }
        ids_all[0][0] = 9;  // the padding index
        const at::Tensor ids = prescaled ? ids_all : mine(ids_all);
        const Batch g = float_batch(prescaled, {4, 6}, 600);
        at::Tensor out = emb(ids.to(at::kInt));
        at::Tensor expected = at::embedding(ref["weight"], ids_all, 9);
        EXPECT_CLOSE(out, prescaled ? expected : mine(expected));
        out.backward(g.local);
        expected.backward(g.all);
        check_param_grads(*emb, ref, prescaled);
        shutdown();
      }
    }
  }
}

/// The non-distributed transformer layer, from the full parameters.
at::Tensor reference_transformer(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                 std::map<std::string, at::Tensor>& p, std::int64_t heads,
                                 std::int64_t hd, bool pre, bool post, bool causal) {
  const std::int64_t b = x.size(0), s = x.size(1), h = x.size(2);
  auto ln = [&](const at::Tensor& t, const std::string& name) {
    return at::layer_norm(t, {h}, p[name + ".weight"], p[name + ".bias"], 1e-5);
  };
  auto lin = [&](const at::Tensor& t, const std::string& name) {
    return at::linear(t, p[name + ".weight"], p[name + ".bias"]);
  };
  auto split = [&](const at::Tensor& t) { return t.reshape({b, s, heads, hd}).transpose(1, 2); };
  at::Tensor in = pre ? ln(x, "attention.pre_layernorm") : x;
  at::Tensor q = split(lin(in, "attention.query")), k = split(lin(in, "attention.key")),
             v = split(lin(in, "attention.value"));
  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) / std::sqrt(double(hd));
  if (causal) scores = scores.masked_fill(at::ones({s, s}, at::kBool).triu(1), -INFINITY);
  if (mask) scores = scores + *mask;
  at::Tensor ctx = at::matmul(at::softmax(scores, -1), v).transpose(1, 2).reshape({b, s, heads * hd});
  at::Tensor r1 = x + lin(ctx, "attention.dense");
  if (post && !pre) r1 = ln(r1, "attention.layernorm");  // smp v1: pre + post, output LN only
  in = pre ? ln(r1, "output.pre_layernorm") : r1;
  at::Tensor out = r1 + lin(at::gelu(lin(in, "output.dense1")), "output.dense2");
  if (post) out = ln(out, "output.layernorm");
  return out;
}

TEST_F(NnTest, TransformerLayerMatchesFullLayer) {
  struct Variant {
    bool pre, post, causal, mask;
  };
  for (int tp : tp_degrees()) {
    for (bool prescaled : {false, true}) {
      for (Variant v : {Variant{false, true, false, true}, Variant{true, false, true, false},
                        Variant{true, true, false, true}}) {
        SCOPED_TRACE(::testing::Message() << "tp " << tp << " prescaled " << prescaled << " pre "
                                          << v.pre << " post " << v.post << " causal "
                                          << v.causal);
        start(tp, prescaled);
        DistributedTransformerLayerOptions o;
        o.config = TransformerConfig{tp * 2, 3, 8, 10, v.pre, v.post, 0.02};
        o.attention_dropout_prob = 0.3;  // off in eval mode
        o.hidden_dropout_prob = 0.3;
        if (v.causal) o.causal_mask_size = 5;
        o.seed = 9;
        DistributedTransformerLayer layer(o);
        layer->eval();
        const auto full = random_full(*layer, 700);
        load_and_check(*layer, full);
        auto ref = leaves(full);
        const Batch x = float_batch(prescaled, {5, 8}, 800);
        std::optional<at::Tensor> mask_local, mask_all;
        if (v.mask) {
          const Batch m = float_batch(prescaled, {1, 1, 5}, 900);
          mask_all = (m.all > 0.8).to(at::kFloat) * -10000.0;
          mask_local = (m.local > 0.8).to(at::kFloat) * -10000.0;
        }
        at::Tensor xl = leaf(x.local), xa = leaf(x.all);
        at::Tensor out = layer(xl, mask_local);
        at::Tensor expected = reference_transformer(xa, mask_all, ref, tp * 2, 3, v.pre, v.post,
                                                    v.causal);
        EXPECT_CLOSE(out, prescaled ? expected : mine(expected));
        const Batch g = float_batch(prescaled, {5, 8}, 1000);
        out.backward(g.local);
        expected.backward(g.all);
        EXPECT_CLOSE(xl.grad(), prescaled ? xa.grad() : mine(xa.grad()));
        check_param_grads(*layer, ref, prescaled);
        shutdown();
      }
    }
  }
}

TEST_F(NnTest, ErrorsNameTheProblem) {
  start(world(), false);
  DistributedLinear fc(DistributedLinearOptions{4, 3, true, 1});
  EXPECT_NE(error_of<ConfigError>([&] { fc->load_full("weight", at::zeros({4, 3})); })
                .find("expected the full parameter of shape [3, 4]"),
            std::string::npos);
  EXPECT_NE(error_of<ConfigError>([&] { fc->gather_full("weights"); })
                .find("the module has no parameter 'weights'; its parameters are: weight, bias"),
            std::string::npos);
  EXPECT_NE(error_of<ConfigError>([&] { fc(at::zeros({2, 5})); }).find("in_features"),
            std::string::npos);
  DistributedEmbeddingOptions eo;
  eo.num_embeddings = 4;
  eo.embedding_dim = 2;
  eo.padding_idx = 4;
  EXPECT_NE(error_of<ConfigError>([&] { DistributedEmbedding e(eo); })
                .find("padding_idx 4 is outside the vocabulary of 4 embeddings"),
            std::string::npos);
  DistributedTransformerLayerOptions to;
  to.config = TransformerConfig{world() + 1, 2, 4, 4, false, true, 0.02};
  if (world() > 1) {
    EXPECT_NE(error_of<ConfigError>([&] { DistributedTransformerLayer t(to); })
                  .find("must be divisible by tensor_parallel_degree"),
              std::string::npos);
  }
  to.config = TransformerConfig{world(), 2, 4, 4, false, false, 0.02};
  EXPECT_NE(error_of<ConfigError>([&] { DistributedTransformerLayer t(to); })
                .find("at least one of pre_layernorm and post_layernorm"),
            std::string::npos);
  shutdown();
  EXPECT_NE(error_of<StateError>([&] { DistributedLinear f(DistributedLinearOptions{4, 3}); })
                .find("smp is not initialized"),
            std::string::npos);
}

}  // namespace
}  // namespace smp::nn

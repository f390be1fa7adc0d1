// checkpoint_tp: smp v1's "Checkpointing with Tensor Parallelism" flow in C++.
//
//   mpirun -np 4 checkpoint_tp [--tp 2] [--shard] [--dir D] [--phase all|save|resume] [--atol X]
//
// 1. A model built from smp::nn tensor-parallel layers (and one plain Linear),
//    wrapped in smp::DistributedModel; an Adam optimizer over the model's
//    parameters with duplicates removed, wrapped in smp::DistributedOptimizer.
// 2. A few training steps.
// 3. Option 1, partial: every rank with rdp_rank() == 0 (with
//    shard_optimizer_state: every rank) saves {"model_state_dict":
//    model->local_state_dict(), "optimizer_state_dict":
//    optimizer.local_state_dict()} to <D>/checkpoint.pt_<pp>_<tp>
//    (<D>/checkpoint.pt_<pp>_<tp>_<rdp> with sharding).
//    Option 2, full: the full optimizer state (optimizer.state_dict(), on
//    every rank), and on the rdp_rank() == 0 ranks the full model
//    (state_dict_full()); world rank 0 saves both to <D>/full.pt.
// 4. The uninterrupted run trains a few more steps.
// 5. For each option, a freshly (differently) initialised model and
//    optimizer load the checkpoint and train the same steps: parameters right
//    after loading, every loss and the final parameters must equal the
//    uninterrupted run's. Prints "checkpoint_tp: OK" on rank 0 and exits 0;
//    exits non-zero otherwise.
//
// The files are those Python's smp.save writes for smp.DistributedModel and
// smp.DistributedOptimizer: --phase save writes the checkpoints and
// <D>/reference.pt (the uninterrupted run's parameters and losses) and stops;
// --phase resume loads them (from this program or from the Python counterpart,
// tests/python/mp/checkpoint_interop.py) and compares within --atol. A resume
// on another --tp (or rdp degree with --shard) reshards Option 1 with
// smp::load_resharded (smp/model/reshard.h).
#include <ftw.h>
#include <stdlib.h>
#include <torch/torch.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

#include "smp/checkpoint/save.h"
#include "smp/checkpoint/value.h"
#include "smp/comm/communicator.h"
#include "smp/core/error.h"
#include "smp/model/distributed_model.h"
#include "smp/model/distributed_optimizer.h"
#include "smp/model/reshard.h"
#include "smp/model/state_value.h"
#include "smp/nn/modules.h"
#include "smp/runtime.h"
#include "smp/torch/collectives.h"

namespace {

using smp::ckpt::Value;

constexpr std::int64_t kVocab = 32, kDim = 16, kHidden = 32, kOut = 4, kBatch = 4, kSeq = 5;
constexpr int kSteps = 3, kMore = 2;

/// Embedding -> mean over the sequence -> Linear -> ReLU -> Linear -> ReLU ->
/// Linear; all but the last tensor-parallel. `seed` picks the initialisation.
struct TpNetImpl : torch::nn::Module {
  explicit TpNetImpl(std::uint64_t seed) {
    emb = register_module("emb", smp::nn::DistributedEmbedding(smp::nn::DistributedEmbeddingOptions{
                                     kVocab, kDim, std::nullopt, false, seed + 1}));
    fc1 = register_module("fc1", smp::nn::DistributedLinear(smp::nn::DistributedLinearOptions{
                                     kDim, kHidden, true, seed + 2}));
    fc2 = register_module("fc2", smp::nn::DistributedLinear(smp::nn::DistributedLinearOptions{
                                     kHidden, kHidden, true, seed + 3}));
    head = register_module("head", torch::nn::Linear(kHidden, kOut));
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    torch::Tensor h = emb->forward(ids).mean(1);
    h = torch::relu(fc1->forward(h));
    h = torch::relu(fc2->forward(h));
    return head->forward(h);
  }
  smp::nn::DistributedEmbedding emb{nullptr};
  smp::nn::DistributedLinear fc1{nullptr}, fc2{nullptr};
  torch::nn::Linear head{nullptr};
};

/// Batch `shard` (the dp_rank) of step `step`: a formula, so that the Python
/// counterpart computes the same batches.
std::pair<torch::Tensor, torch::Tensor> batch(int step, int shard) {
  torch::Tensor ids = (torch::arange(kBatch * kSeq, torch::kLong).reshape({kBatch, kSeq}) * 3 +
                       step * 31 + shard * 17) % kVocab;
  torch::Tensor target =
      torch::sin((torch::arange(kBatch * kOut, torch::kFloat).reshape({kBatch, kOut}) +
                  step * 7 + shard * 13) * 0.1);
  return {ids, target};
}

struct Run {
  std::shared_ptr<TpNetImpl> net;
  std::shared_ptr<smp::DistributedModel> model;
  std::unique_ptr<smp::DistributedOptimizer> optimizer;
};

Run build(std::uint64_t seed) {
  Run r;
  torch::manual_seed(seed + smp::rank());  // the plain head differs until the broadcast
  r.net = std::make_shared<TpNetImpl>(seed);
  r.model = std::make_shared<smp::DistributedModel>(r.net);
  // The guide's step 2: each parameter once.
  std::vector<torch::Tensor> unique_params;
  std::unordered_set<const void*> unique_params_set;
  for (const torch::Tensor& p : r.model->local_parameters())
    if (unique_params_set.insert(p.unsafeGetTensorImpl()).second) unique_params.push_back(p);
  r.optimizer = std::make_unique<smp::DistributedOptimizer>(
      std::make_shared<torch::optim::Adam>(unique_params, torch::optim::AdamOptions(1e-2)),
      r.model);
  return r;
}

/// One step; returns the loss averaged over the data-parallel ranks.
double train_step(Run& r, int step) {
  const auto [ids, target] = batch(step, smp::dp_rank());
  r.optimizer->zero_grad();
  torch::Tensor loss = torch::mse_loss(r.net->forward(ids), target);
  r.model->backward(loss);
  r.optimizer->step();
  torch::Tensor mean = loss.detach().clone();
  smp::allreduce(mean, smp::CommGroup::kDpGroup, smp::ReduceOp::kAvg);
  return mean.item<double>();
}

/// A copy of the full model on world rank 0 ({} elsewhere); every rank must
/// call it. (State dicts share the live tensors, which training changes.)
smp::TensorMap full_params(Run& r) {
  smp::TensorMap out;
  if (smp::rdp_rank() != 0) return out;
  for (const auto& e : r.model->state_dict_full()) out.insert(e.key(), e.value().clone());
  return out;
}

struct Reference {
  Value saved_params;  // full model right after the save
  Value final_params;  // after kMore more steps
  std::vector<double> losses;
};

int failures = 0;

void fail(const std::string& what) {
  std::cerr << "checkpoint_tp on rank " << smp::rank() << ": " << what << std::endl;
  ++failures;
}

bool close(const torch::Tensor& a, const torch::Tensor& b, double atol) {
  if (a.sizes() != b.sizes()) return false;
  return atol == 0 ? torch::equal(a, b) : torch::allclose(a, b, 0.0, atol);
}

/// Rank 0: every tensor of `want` (an OrderedDict of full parameters) equals `got`.
void compare_params(const smp::TensorMap& got, const Value& want, double atol,
                    const std::string& what) {
  if (smp::rank() != 0) return;
  for (const auto& [k, v] : want.pairs()) {
    const torch::Tensor* mine = got.find(k.as_string());
    if (mine == nullptr) {
      fail(what + ": parameter " + k.as_string() + " is missing");
    } else if (!close(*mine, v.tensor(), atol)) {
      fail(what + ": parameter " + k.as_string() + " differs by " +
           std::to_string((*mine - v.tensor()).abs().max().item<double>()));
    }
  }
}

/// The full optimizer state (Adam step, exp_avg, exp_avg_sq of every
/// parameter, gathered) equals Option 2's saved one (<dir>/full.pt); every
/// rank must call it.
void compare_moments(Run& r, const std::string& dir, double atol, const std::string& what) {
  const Value got = r.optimizer->state_dict();  // collective
  if (smp::rank() != 0) return;
  smp::ckpt::LoadOptions options;
  options.partial = false;
  const Value want = smp::ckpt::load(dir + "/full.pt", options).at("optimizer_state_dict");
  const auto& names = want.at("_smp_param_names").items();
  std::vector<std::string> flat;
  for (const Value& g : names)
    for (const Value& n : g.items()) flat.push_back(n.as_string());
  const Value& got_state = got.at("state");
  for (const auto& [pos, st] : want.at("state").pairs()) {
    const std::string name = flat.at(static_cast<std::size_t>(pos.as_int()));
    const Value* mine = nullptr;
    for (const auto& [k, v] : got_state.pairs())
      if (k.as_int() == pos.as_int()) mine = &v;
    if (mine == nullptr) {
      fail(what + ": optimizer state of " + name + " is missing");
      continue;
    }
    for (const auto& [key, t] : st.pairs()) {
      const Value* m = mine->find(key.as_string());
      if (!t.is_tensor()) continue;
      if (m == nullptr || !m->is_tensor() || !close(m->tensor().cpu(), t.tensor(), atol))
        fail(what + ": optimizer state " + name + "/" + key.as_string() + " differs");
    }
  }
}

// POSIX calls rather than std::filesystem: the CUDA builds of libtorch export
// std::filesystem symbols of their own that can interpose over libstdc++'s.
std::string phase_all_dir() {
  // Rank 0 picks a fresh directory; the others learn its name.
  std::string dir;
  if (smp::rank() == 0) {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl = std::string(tmp != nullptr && *tmp ? tmp : "/tmp") + "/smp_checkpoint_tp_XXXXXX";
    SMP_CHECK(::mkdtemp(&tmpl[0]) != nullptr, smp::Error, "checkpoint_tp: mkdtemp('", tmpl,
              "') failed: ", std::strerror(errno));
    dir = tmpl;
  }
  return smp::communicator(smp::CommGroup::kWorld).broadcast_bytes(dir, 0);
}

void remove_tree(const std::string& path) {
  ::nftw(
      path.c_str(),
      [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p), 0; }, 16,
      FTW_DEPTH | FTW_PHYS);
}

/// Trains, saves both options, continues: returns what the resumed runs must match.
Reference save_phase(const std::string& dir, bool shard) {
  Run a = build(0);
  for (int step = 0; step < kSteps; ++step) {
    const double loss = train_step(a, step);
    if (smp::rank() == 0) std::cout << "step " << step << " loss " << loss << std::endl;
  }

  // ---- Option 1: a partial checkpoint per (pp_rank, tp_rank) [and rdp_rank] ----
  Value model_dict = smp::state_value(a.model->local_state_dict());  // partial model
  Value opt_dict = a.optimizer->local_state_dict();                 // partial optimizer state
  if (smp::rdp_rank() == 0 || shard) {
    Value checkpoint = Value::dict();
    checkpoint.set("model_state_dict", model_dict);
    checkpoint.set("optimizer_state_dict", opt_dict);
    smp::ckpt::SaveOptions options;
    options.partial = true;
    options.v3 = shard;  // sharded optimizer state: every rank writes its own file
    // Names and shard specs of every tensor: another layout can reshard it.
    smp::record_shards(checkpoint, *a.model, options);
    smp::ckpt::save(checkpoint, dir + "/checkpoint.pt", options);
  }

  // ---- Option 2: the full model and the full optimizer state on rank 0 ----
  Value opt_full = a.optimizer->state_dict();  // collective: every rank
  if (smp::rdp_rank() == 0) {
    smp::TensorMap full = a.model->state_dict_full();  // gather_to_rank0
    if (smp::rank() == 0) {
      Value checkpoint = Value::dict();
      checkpoint.set("model_state_dict", smp::state_value(full));
      checkpoint.set("optimizer_state_dict", opt_full);
      smp::ckpt::SaveOptions options;
      options.partial = false;
      smp::ckpt::save(checkpoint, dir + "/full.pt", options);
    }
  }
  smp::barrier(smp::CommGroup::kWorld);

  Reference ref;
  ref.saved_params = smp::state_value(full_params(a));
  for (int step = kSteps; step < kSteps + kMore; ++step) ref.losses.push_back(train_step(a, step));
  ref.final_params = smp::state_value(full_params(a));
  return ref;
}

void write_reference(const std::string& dir, const Reference& ref) {
  if (smp::rank() != 0) return;
  Value losses = Value::list();
  for (double l : ref.losses) losses.append(l);
  Value obj = Value::dict();
  obj.set("saved_params", ref.saved_params);
  obj.set("final_params", ref.final_params);
  obj.set("losses", losses);
  smp::ckpt::SaveOptions options;
  options.partial = false;
  smp::ckpt::save(obj, dir + "/reference.pt", options);
}

Reference read_reference(const std::string& dir) {
  Reference ref;
  if (smp::rank() != 0) return ref;
  smp::ckpt::LoadOptions options;
  options.partial = false;
  const Value obj = smp::ckpt::load(dir + "/reference.pt", options);
  ref.saved_params = obj.at("saved_params");
  ref.final_params = obj.at("final_params");
  for (const Value& l : obj.at("losses").items()) ref.losses.push_back(l.as_float());
  return ref;
}

/// A fresh model and optimizer load option `partial` and continue training.
void resume(const std::string& dir, bool partial, const Reference& ref, double atol) {
  const std::string what = partial ? "Option 1 (partial)" : "Option 2 (full)";
  Run b = build(1000);  // initialised differently from the saved run
  if (partial) {
    // Saved on another tp / rdp layout: plan and read this rank's share.
    const bool reshard = smp::ckpt::saved_layout_differs(dir + "/checkpoint.pt");
    const Value checkpoint =
        reshard ? smp::load_resharded(dir + "/checkpoint.pt", *b.model, b.optimizer.get())
                : smp::ckpt::load(dir + "/checkpoint.pt");  // this rank's part
    if (reshard && smp::rank() == 0) std::cout << what << ": resharded" << std::endl;
    b.model->load_state_dict(smp::tensor_map(checkpoint.at("model_state_dict")),
                             /*strict=*/true, /*same_partition_load=*/!reshard);
    b.optimizer->load_state_dict(checkpoint.at("optimizer_state_dict"));
  } else {
    smp::ckpt::LoadOptions options;
    options.partial = false;
    const Value checkpoint = smp::ckpt::load(dir + "/full.pt", options);
    b.model->load_state_dict(smp::tensor_map(checkpoint.at("model_state_dict")));
    b.optimizer->load_state_dict(checkpoint.at("optimizer_state_dict"));
  }
  compare_params(full_params(b), ref.saved_params, atol, what + " right after loading");
  if (partial) compare_moments(b, dir, atol, what + " right after loading");
  std::vector<double> losses;
  for (int step = kSteps; step < kSteps + kMore; ++step) losses.push_back(train_step(b, step));
  if (smp::rank() == 0) {
    for (std::size_t i = 0; i < losses.size(); ++i) {
      std::cout << what << ": step " << kSteps + i << " loss " << losses[i] << " (uninterrupted "
                << ref.losses[i] << ")" << std::endl;
      if (std::abs(losses[i] - ref.losses[i]) > atol)
        fail(what + ": loss of step " + std::to_string(kSteps + i) + " differs");
    }
  }
  compare_params(full_params(b), ref.final_params, atol, what + " after resuming");
}

int run(int tp, bool shard, std::string dir, const std::string& phase, double atol) {
  smp::init({{"tensor_parallel_degree", std::int64_t{tp}},
             {"ddp", true},
             {"shard_optimizer_state", shard}});
  if (smp::rank() == 0)
    std::cout << "checkpoint_tp: world " << smp::size() << ", tp " << smp::tp_size() << ", rdp "
              << smp::rdp_size() << (shard ? ", sharded optimizer state" : "") << ", phase "
              << phase << std::endl;
  const bool own_dir = dir.empty();
  if (own_dir) dir = phase_all_dir();

  Reference ref;
  if (phase != "resume") ref = save_phase(dir, shard);
  if (phase == "save") write_reference(dir, ref);
  if (phase == "resume") ref = read_reference(dir);
  if (phase != "save") {
    resume(dir, /*partial=*/true, ref, atol);
    resume(dir, /*partial=*/false, ref, atol);
  }

  torch::Tensor flag = torch::full({1}, failures, torch::kInt32);
  smp::allreduce(flag, smp::CommGroup::kWorld);
  const bool ok = flag.item<int>() == 0;
  if (own_dir && smp::rank() == 0) remove_tree(dir);
  if (smp::rank() == 0) std::cout << (ok ? "checkpoint_tp: OK" : "checkpoint_tp: FAILED") << std::endl;
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  int tp = 2;
  bool shard = false;
  std::string dir, phase = "all";
  double atol = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--tp" && has_value) {
      tp = std::atoi(argv[++i]);
    } else if (a == "--shard") {
      shard = true;
    } else if (a == "--dir" && has_value) {
      dir = argv[++i];
    } else if (a == "--phase" && has_value) {
      phase = argv[++i];
    } else if (a == "--atol" && has_value) {
      atol = std::atof(argv[++i]);
    } else {
      phase = "";
    }
  }
  if (phase != "all" && phase != "save" && phase != "resume") {
    std::cerr << "usage: checkpoint_tp [--tp N] [--shard] [--dir D] [--phase all|save|resume] "
                 "[--atol X]   (save and resume need --dir)" << std::endl;
    return 2;
  }
  if (phase != "all" && dir.empty()) {
    std::cerr << "checkpoint_tp: --phase " << phase << " needs --dir" << std::endl;
    return 2;
  }
  int rc = 1;
  try {
    rc = run(tp, shard, dir, phase, atol);
  } catch (const std::exception& e) {
    std::cerr << "checkpoint_tp on rank " << (smp::is_initialized() ? smp::rank() : -1) << ": "
              << e.what() << std::endl;
    return 1;
  }
  smp::shutdown();
  return rc;
}

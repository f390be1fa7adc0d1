#include "smp/pipeline/sequential.h"

#include <cmath>
#include <cstdlib>
#include <map>
#include <string>
#include <utility>

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include "smp/core/config.h"
#include "smp/core/error.h"
#include "smp/model/grad_reducer.h"
#include "smp/nn/modules.h"
#include "smp/pipeline/schedule.h"
#include "smp/runtime.h"
#include "smp/torch/collectives.h"

namespace smp {
namespace {

/// present, dtype, ndim, up to 7 dims (as the Python engine's header).
constexpr std::int64_t kHeader = 10;
constexpr std::int64_t kMaxDims = kHeader - 3;

std::string where() {
  return detail::str("rank ", rank(), ", pipeline stage ", pp_rank(), " of ", pp_size());
}

void send_tensor(const at::Tensor& t, int peer, const char* what) {
  at::Tensor header = at::zeros({kHeader}, at::kLong);
  SMP_CHECK(t.dim() <= kMaxDims, NotSupportedError, "PipelinedSequential (", where(), "): the ",
            what, " to stage ", peer, " has ", t.dim(), " dims; at most ", kMaxDims,
            " travel between stages (reshape the layer's output)");
  auto h = header.accessor<std::int64_t, 1>();
  h[0] = 1;
  h[1] = static_cast<std::int64_t>(t.scalar_type());
  h[2] = t.dim();
  for (std::int64_t i = 0; i < t.dim(); ++i) h[3 + i] = t.size(i);
  send(header, peer, RankType::kPpRank);
  send(t.detach().contiguous(), peer, RankType::kPpRank);
}

at::Tensor recv_tensor(int peer, const at::Device& device, const char* what) {
  at::Tensor header = at::zeros({kHeader}, at::kLong);
  recv(header, peer, RankType::kPpRank);
  auto h = header.accessor<std::int64_t, 1>();
  SMP_CHECK(h[0] == 1 && h[2] >= 0 && h[2] <= kMaxDims, CommError, "PipelinedSequential (",
            where(), "): bad header for the ", what, " from stage ", peer,
            "; every rank of the pipeline must run the same step with the same model");
  std::vector<std::int64_t> shape(h[2]);
  for (std::int64_t i = 0; i < h[2]; ++i) shape[i] = h[3 + i];
  at::Tensor t = at::empty(shape, at::TensorOptions()
                                      .dtype(static_cast<c10::ScalarType>(h[1]))
                                      .device(device));
  recv(t, peer, RankType::kPpRank);
  return t;
}

std::int64_t count_parameters(const torch::nn::Module& m) {
  std::int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

}  // namespace

std::vector<int> balanced_stage_boundaries(const std::vector<std::int64_t>& layer_params,
                                           int num_stages) {
  const int n = static_cast<int>(layer_params.size());
  SMP_CHECK(num_stages >= 1 && n >= num_stages, ConfigError, "PipelinedSequential: ", n,
            " layers cannot fill ", num_stages,
            " pipeline stages (each needs a layer); use a smaller "
            "pipeline_parallel_degree or split the Sequential into more layers");
  std::vector<std::int64_t> prefix(n + 1, 0);
  for (int i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + layer_params[i];
  const double total = static_cast<double>(prefix[n]);
  std::vector<int> b(num_stages + 1, 0);
  b[num_stages] = n;
  for (int s = 1; s < num_stages; ++s) {
    const double target = total * s / num_stages;
    int best = b[s - 1] + 1;
    for (int i = best + 1; i <= n - (num_stages - s); ++i) {
      if (std::abs(prefix[i] - target) < std::abs(prefix[best] - target)) best = i;
    }
    b[s] = best;
  }
  return b;
}

PipelinedSequential::PipelinedSequential(torch::nn::Sequential sequential,
                                         std::vector<int> boundaries)
    : sequential_(std::move(sequential)), boundaries_(std::move(boundaries)) {
  SMP_CHECK(is_initialized(), StateError, "smp::PipelinedSequential needs smp::init() first");
  SMP_CHECK(!sequential_.is_empty(), ConfigError,
            "smp::PipelinedSequential: the Sequential is null; pass a constructed one");
  stage_ = pp_rank();
  num_stages_ = pp_size();
  const int n = static_cast<int>(sequential_->size());
  if (boundaries_.empty()) {
    std::vector<std::int64_t> counts;
    for (int i = 0; i < n; ++i) counts.push_back(count_parameters(*sequential_->ptr(i)));
    boundaries_ = balanced_stage_boundaries(counts, num_stages_);
  } else {
    bool ok = static_cast<int>(boundaries_.size()) == num_stages_ + 1 && boundaries_.front() == 0 &&
              boundaries_.back() == n;
    for (std::size_t i = 1; ok && i < boundaries_.size(); ++i)
      ok = boundaries_[i] > boundaries_[i - 1];
    SMP_CHECK(ok, ConfigError, "smp::PipelinedSequential (", where(), "): stage boundaries of ",
              boundaries_.size(), " entries do not split ", n, " layers over ", num_stages_,
              " stages; give pp_size() + 1 increasing values from 0 to ", n,
              " (or none for a balanced split)");
  }
  for (int i = 0; i < n; ++i) {
    const bool local = i >= first_layer() && i < end_layer();
    for (auto& p : sequential_->ptr(i)->parameters()) p.requires_grad_(local);
  }
  std::vector<ParamInfo> infos;
  for (int i = first_layer(); i < end_layer(); ++i) {
    auto layer = nn::param_infos(*sequential_->ptr(i), "smp::PipelinedSequential",
                                 std::to_string(i) + ".");
    for (auto& info : layer) infos.push_back(std::move(info));
  }
  if (dp_size() > 1) {
    GradReducer::Options o;
    o.prescaled_batch = config().prescaled_batch;
    reducer_ = std::make_unique<GradReducer>(std::move(infos), o);
  }
}

PipelinedSequential::~PipelinedSequential() = default;
PipelinedSequential::PipelinedSequential(PipelinedSequential&&) noexcept = default;
PipelinedSequential& PipelinedSequential::operator=(PipelinedSequential&&) noexcept = default;

std::vector<at::Tensor> PipelinedSequential::local_parameters() const {
  std::vector<at::Tensor> out;
  for (int i = first_layer(); i < end_layer(); ++i)
    for (const auto& p : sequential_->ptr(i)->parameters()) out.push_back(p);
  return out;
}

at::Tensor PipelinedSequential::forward_local(const at::Tensor& input) {
  at::Tensor x = input;
  for (int i = first_layer(); i < end_layer(); ++i)
    x = (sequential_->begin() + i)->forward<at::Tensor>(x);
  return x;
}

double PipelinedSequential::step(const at::Tensor& input, const at::Tensor& target,
                                 const LossFn& loss) {
  const int m = config().microbatches;
  const bool first = stage_ == 0, last = stage_ == num_stages_ - 1;
  SMP_CHECK(!last || loss, ConfigError, "PipelinedSequential::step (", where(),
            "): the last stage needs a loss function");
  auto split = [&](const at::Tensor& t, const char* name) {
    SMP_CHECK(t.defined() && t.dim() >= 1 && t.size(0) % m == 0, ConfigError,
              "PipelinedSequential::step (", where(), "): the ", name, " batch of size ",
              t.defined() && t.dim() >= 1 ? t.size(0) : -1, " does not split into microbatches ",
              m, " equal pieces along dim 0; give a batch divisible by microbatches");
    return t.chunk(m, 0);
  };
  std::vector<at::Tensor> inputs, targets;
  if (first) inputs = split(input, "input");
  if (last) targets = split(target, "target");

  at::Device device = first ? input.device() : at::Device(at::kCPU);
  if (!first) {
    const auto params = local_parameters();
    if (!params.empty()) device = params.front().device();
  }

  pipeline::ScheduleOptions opts;
  opts.num_stages = num_stages_;
  opts.microbatches = m;
  opts.kind = pipeline::parse_schedule_kind(config().pipeline);
  opts.active_microbatches = config().active_microbatches;
  const std::vector<pipeline::Action> actions = pipeline::build_schedule(opts, stage_);

  // Per microbatch, alive from its Forward (or RecvActivation) to its Backward.
  std::map<int, at::Tensor> in, out, grad_out, losses, grad_in;
  double loss_sum = 0.0;
  for (const auto& a : actions) {
    const int mb = a.microbatch;
    switch (a.kind) {
      case pipeline::ActionKind::kRecvActivation:
        in[mb] = recv_tensor(stage_ - 1, device, "activation").requires_grad_(true);
        break;
      case pipeline::ActionKind::kForward: {
        const at::Tensor x = first ? inputs[mb] : in.at(mb);
        out[mb] = forward_local(x);
        if (last) {
          at::Tensor l = loss(out[mb], targets[mb]);
          SMP_CHECK(l.defined() && l.numel() == 1, ConfigError, "PipelinedSequential::step (",
                    where(), "): the loss function must return a scalar, got shape ", l.sizes(),
                    " for microbatch ", mb);
          loss_sum += l.detach().to(at::kDouble).item<double>();
          losses[mb] = l;
          out.erase(mb);
        }
        break;
      }
      case pipeline::ActionKind::kSendActivation:
        send_tensor(out.at(mb), stage_ + 1, "activation");
        break;
      case pipeline::ActionKind::kRecvGrad:
        grad_out[mb] = recv_tensor(stage_ + 1, device, "gradient");
        break;
      case pipeline::ActionKind::kBackward: {
        if (last) {
          at::Tensor l = losses.at(mb) / static_cast<double>(m);
          losses.erase(mb);
          if (l.requires_grad()) l.backward();
        } else {
          at::Tensor o = out.at(mb);
          out.erase(mb);
          at::Tensor g = grad_out.at(mb);
          grad_out.erase(mb);
          if (o.requires_grad()) o.backward(g);
        }
        if (!first) {
          at::Tensor x = in.at(mb);
          in.erase(mb);
          grad_in[mb] = x.grad().defined() ? x.grad() : at::zeros_like(x);
        }
        break;
      }
      case pipeline::ActionKind::kSendGrad:
        send_tensor(grad_in.at(mb), stage_ - 1, "gradient");
        grad_in.erase(mb);
        break;
    }
  }

  // Every local gradient is final: finish() reduces them all as they are.
  if (reducer_) reducer_->finish();

  at::Tensor mean = at::full({1}, last ? loss_sum / m : 0.0, at::kDouble);
  if (num_stages_ > 1) broadcast(mean, num_stages_ - 1, CommGroup::kPpGroup);
  return mean.item<double>();
}

}  // namespace smp

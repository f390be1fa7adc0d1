#include "smp/model/distributed_optimizer.h"

#include <ATen/ATen.h>

#include <map>
#include <utility>

#include "model/optimizer_state.h"
#include "smp/core/error.h"
#include "smp/model/optimizer_shard.h"
#include "smp/runtime.h"

namespace smp {
namespace {

// Same text as the Python side's (python/smp/optimizer.py).
constexpr const char* kDedupRecipe =
    "    unique_params = []\n"
    "    unique_params_set = set()\n"
    "    for p in model.parameters():\n"
    "        if p not in unique_params_set:\n"
    "            unique_params.append(p)\n"
    "            unique_params_set.add(p)\n"
    "    optimizer = torch.optim.Adam(unique_params, ...)";

using ckpt::Value;
using NamedState = std::map<std::string, Value>;

Value spec_value(const ParamInfo& info) {
  const ShardSpec& s = info.spec;
  Value d = Value::dict();
  d.set("split_dim", s.is_replicated() ? Value() : Value(s.split_dim));
  Value::Items shape;
  for (std::int64_t x : s.global_shape) shape.emplace_back(x);
  d.set("global_shape", Value::tuple(std::move(shape)));
  d.set("distributed", info.distributed());
  return d;
}

bool is_true(const Value* v) {
  if (v == nullptr || v->is_none()) return false;
  if (v->is_bool()) return v->as_bool();
  if (v->is_int()) return v->as_int() != 0;
  if (v->is_tensor()) return v->tensor().numel() == 1 && v->tensor().item<double>() != 0;
  return false;
}

const Value& entry(const Value& sd, const char* key) {
  const Value* v = sd.find(key);
  SMP_CHECK(v != nullptr, ConfigError, "smp::DistributedOptimizer::load_state_dict: the state "
            "dict has no '", key, "'; pass what DistributedOptimizer::state_dict() or "
            "local_state_dict() (C++ or Python) returned");
  return *v;
}

/// {index: state} of a state dict's "state".
std::map<std::int64_t, const Value*> by_index(const Value& state) {
  SMP_CHECK(state.is_dict(), ConfigError, "smp::DistributedOptimizer::load_state_dict: 'state' "
            "must be a dict, got ", state.repr());
  std::map<std::int64_t, const Value*> out;
  for (const auto& [k, v] : state.pairs()) {
    SMP_CHECK(k.is_int(), ConfigError, "smp::DistributedOptimizer::load_state_dict: 'state' key ",
              k.repr(), " is not a parameter index");
    out[k.as_int()] = &v;
  }
  return out;
}

/// {parameter name: state} of a state dict carrying _smp_param_names.
NamedState by_name(const Value& sd) {
  const auto state = by_index(entry(sd, "state"));
  const Value& groups = entry(sd, "param_groups");
  const Value& names = entry(sd, "_smp_param_names");
  SMP_CHECK(groups.is_list() && names.is_list() && groups.size() == names.size(), ConfigError,
            "smp::DistributedOptimizer::load_state_dict: 'param_groups' and '_smp_param_names' "
            "must be lists of the same length");
  NamedState out;
  for (std::size_t g = 0; g < groups.size(); ++g) {
    const auto& idx = groups.items()[g].at("params").items();
    const auto& ns = names.items()[g].items();
    SMP_CHECK(idx.size() == ns.size(), ConfigError, "smp::DistributedOptimizer::load_state_dict: "
              "param_groups[", g, "] lists ", idx.size(), " parameters but _smp_param_names[", g,
              "] ", ns.size(), " names");
    for (std::size_t i = 0; i < idx.size(); ++i) {
      const auto it = state.find(idx[i].as_int());
      if (it != state.end()) out[ns[i].as_string()] = *it->second;
    }
  }
  return out;
}

Value named_value(const NamedState& named) {
  Value d = Value::dict();
  for (const auto& [n, v] : named) d.set(n, v);
  return d;
}

NamedState named_state(const Value& d) {
  NamedState out;
  for (const auto& [k, v] : d.pairs()) out[k.as_string()] = v;
  return out;
}

bool contains(const Value& list, const std::string& name) {
  for (const Value& v : list.items())
    if (v.as_string() == name) return true;
  return false;
}

/// Merges (state by name, group names, specs) of every TP rank, in tp order,
/// into the full state: state tensors of split parameters with the rank of
/// the parameter are concatenated along the split dimension; other entries
/// are taken from the first rank that has them (python/smp/optimizer.py's
/// _merge_tp).
void merge_tp(const std::vector<Value>& parts, NamedState& named, Value& group_names,
              Value& specs) {
  group_names = parts[0].items()[1];
  for (std::size_t r = 1; r < parts.size(); ++r) {
    const Value& names = parts[r].items()[1];
    for (std::size_t g = 0; g < names.size(); ++g)
      for (const Value& n : names.items()[g].items())
        if (!contains(group_names.items()[g], n.as_string()))
          group_names.items()[g].append(n);
  }
  specs = Value::dict();
  for (const Value& part : parts)
    for (const auto& [n, v] : part.items()[2].pairs())
      if (specs.find(n.as_string()) == nullptr) specs.set(n, v);
  std::vector<NamedState> states;
  for (const Value& part : parts) states.push_back(named_state(part.items()[0]));
  named.clear();
  for (const auto& [key, spec] : specs.pairs()) {
    const std::string& n = key.as_string();
    std::vector<const Value*> holders;
    for (const NamedState& s : states) {
      const auto it = s.find(n);
      if (it != s.end()) holders.push_back(&it->second);
    }
    if (holders.empty()) continue;
    const Value& split = spec.at("split_dim");
    if (split.is_none() || holders.size() == 1) {
      named[n] = *holders[0];
      continue;
    }
    const std::int64_t dim = split.as_int();
    const std::size_t rank = spec.at("global_shape").size();
    Value merged = Value::dict();
    for (const auto& [k, v] : holders[0]->pairs()) {
      if (v.is_tensor() && v.tensor().dim() > 0 &&
          static_cast<std::size_t>(v.tensor().dim()) == rank) {
        std::vector<at::Tensor> pieces;
        for (const Value* h : holders) pieces.push_back(h->at(k.as_string()).tensor());
        merged.set(k, at::cat(pieces, dim));
      } else {
        merged.set(k, v);
      }
    }
    named[n] = std::move(merged);
  }
}

}  // namespace

DistributedOptimizer::DistributedOptimizer(std::shared_ptr<torch::optim::Optimizer> optimizer,
                                           std::shared_ptr<DistributedModel> model)
    : optimizer_(std::move(optimizer)), model_(std::move(model)) {
  SMP_CHECK(optimizer_ != nullptr, ConfigError,
            "smp::DistributedOptimizer expects a torch::optim::Optimizer, got a null pointer");
  SMP_CHECK(model_ != nullptr, StateError,
            "smp::DistributedOptimizer needs the model: create smp::DistributedModel first and "
            "build the optimizer over its local_parameters()");
  std::map<const c10::TensorImpl*, std::string> name_of;
  for (const ParamInfo& info : model_->param_infos())
    name_of.emplace(info.param.unsafeGetTensorImpl(), info.name);
  std::map<const c10::TensorImpl*, std::pair<std::size_t, std::size_t>> seen;
  const auto& groups = optimizer_->param_groups();
  for (std::size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& params = groups[gi].params();
    for (std::size_t pi = 0; pi < params.size(); ++pi) {
      const at::Tensor& p = params[pi];
      const auto found = name_of.find(p.unsafeGetTensorImpl());
      SMP_CHECK(found != name_of.end(), ConfigError, "smp::DistributedOptimizer: param_groups[",
                gi, "]['params'][", pi, "] (shape ", p.sizes(), ") is not a parameter of the "
                "DistributedModel on rank ", rank(), "; build the optimizer from "
                "model->local_parameters()");
      const auto dup = seen.find(p.unsafeGetTensorImpl());
      if (dup != seen.end())
        SMP_THROW(ConfigError, "smp.DistributedOptimizer: parameter '", found->second,
                  "' appears more than once in the optimizer's parameters (param_groups[",
                  dup->second.first, "]['params'][", dup->second.second, "] and param_groups[",
                  gi, "]['params'][", pi, "]); optimizer state of duplicated parameters cannot "
                  "be saved and loaded. Pass each parameter once:\n", kDedupRecipe);
      seen.emplace(p.unsafeGetTensorImpl(), std::make_pair(gi, pi));
      params_.push_back(p);
      names_.push_back(found->second);
    }
  }
  sharded_ = config().shard_optimizer_state;
  // Ownership follows the model's parameter order, not the optimizer's.
  std::vector<std::int64_t> numels;
  for (const ParamInfo& info : model_->param_infos()) {
    if (seen.count(info.param.unsafeGetTensorImpl()) == 0) continue;
    canonical_.push_back(info.param);
    numels.push_back(info.param.numel());
  }
  std::map<const c10::TensorImpl*, int> owner_of;
  if (sharded_) {
    canonical_owner_ = partition_params(numels, rdp_size());
    for (std::size_t i = 0; i < canonical_.size(); ++i)
      owner_of[canonical_[i].unsafeGetTensorImpl()] = canonical_owner_[i];
  }
  for (const at::Tensor& p : params_)
    owned_.push_back(!sharded_ || owner_of.at(p.unsafeGetTensorImpl()) == rdp_rank());
}

void DistributedOptimizer::step() {
  model_->finish_grads();
  if (!sharded_) {
    optimizer_->step();
    return;
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> hidden;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    if (owned_[i] || !params_[i].grad().defined()) continue;
    hidden.emplace_back(params_[i], params_[i].grad());
    params_[i].mutable_grad() = at::Tensor();
  }
  try {
    optimizer_->step();
  } catch (...) {
    for (auto& h : hidden) h.first.mutable_grad() = h.second;
    throw;
  }
  for (auto& h : hidden) h.first.mutable_grad() = h.second;
  broadcast_from_owners(canonical_, canonical_owner_, CommGroup::kRdpGroup);
}

void DistributedOptimizer::zero_grad(bool set_to_none) { optimizer_->zero_grad(set_to_none); }

Value DistributedOptimizer::local_state_dict() const {
  Value state = Value::dict();
  Value groups = Value::list();
  Value group_names = Value::list();
  std::size_t index = 0;
  const auto& param_groups = optimizer_->param_groups();
  for (std::size_t g = 0; g < param_groups.size(); ++g) {
    Value group = detail::group_hyper(*optimizer_, g);
    Value idx = Value::list();
    Value names = Value::list();
    for (std::size_t i = 0; i < param_groups[g].params().size(); ++i, ++index) {
      Value s = detail::param_state_value(*optimizer_, params_[index]);
      if (!s.is_none()) state.set(static_cast<std::int64_t>(index), std::move(s));
      idx.append(static_cast<std::int64_t>(index));
      names.append(names_[index]);
    }
    group.set("params", std::move(idx));
    groups.append(std::move(group));
    group_names.append(std::move(names));
  }
  Value specs = Value::dict();
  for (const std::string& n : names_) specs.set(n, spec_value(model_->param_info(n)));
  Value sd = Value::dict();
  sd.set("state", std::move(state));
  sd.set("param_groups", std::move(groups));
  sd.set("_smp_param_names", std::move(group_names));
  sd.set("_smp_shard_specs", std::move(specs));
  sd.set("_smp_is_partial", true);
  if (sharded_) {
    Value owned = Value::list();
    for (std::size_t i = 0; i < names_.size(); ++i)
      if (owned_[i]) owned.append(names_[i]);
    sd.set("_smp_owned", std::move(owned));
  }
  return sd;
}

Value DistributedOptimizer::state_dict() {
  if (!sharded_ && tp_size() == 1) return local_state_dict();
  const Value local = local_state_dict();
  NamedState named = by_name(local);
  if (sharded_) {
    // Only owners' state counts (an optimizer that creates state for every
    // parameter up front, as Adagrad, holds stale state for the others).
    NamedState mine;
    for (std::size_t i = 0; i < names_.size(); ++i) {
      const auto it = named.find(names_[i]);
      if (owned_[i] && it != named.end()) mine[names_[i]] = it->second;
    }
    named.clear();
    for (const std::string& bytes :
         communicator(CommGroup::kRdpGroup).allgather_bytes(detail::encode_value(named_value(mine))))
      for (auto& [n, v] : named_state(detail::decode_value(bytes))) named[n] = std::move(v);
  }
  Value group_names = local.at("_smp_param_names");
  Value specs = local.at("_smp_shard_specs");
  if (tp_size() > 1) {
    const Value mine = Value::tuple({named_value(named), group_names, specs});
    std::vector<Value> parts;
    for (const std::string& bytes :
         communicator(CommGroup::kTpGroup).allgather_bytes(detail::encode_value(mine)))
      parts.push_back(detail::decode_value(bytes));
    merge_tp(parts, named, group_names, specs);
  }
  Value state = Value::dict();
  Value groups = Value::list();
  std::int64_t index = 0;
  for (std::size_t g = 0; g < group_names.size(); ++g) {
    Value group = Value::dict();
    for (const auto& [k, v] : local.at("param_groups").items()[g].pairs())
      if (!(k.is_string() && k.as_string() == "params")) group.set(k, v);
    Value idx = Value::list();
    for (const Value& n : group_names.items()[g].items()) {
      const auto it = named.find(n.as_string());
      if (it != named.end()) state.set(index, it->second);
      idx.append(index++);
    }
    group.set("params", std::move(idx));
    groups.append(std::move(group));
  }
  Value sd = Value::dict();
  sd.set("state", std::move(state));
  sd.set("param_groups", std::move(groups));
  sd.set("_smp_param_names", std::move(group_names));
  sd.set("_smp_shard_specs", std::move(specs));
  sd.set("_smp_is_partial", false);
  return sd;
}

void DistributedOptimizer::load_state_dict(const Value& sd) {
  SMP_CHECK(sd.is_dict(), ConfigError, "smp::DistributedOptimizer::load_state_dict expects a "
            "dict (an optimizer state dict), got ", to_string(sd.kind()));
  const bool partial = is_true(sd.find("_smp_is_partial"));
  const auto& param_groups = optimizer_->param_groups();
  const Value& saved_groups = entry(sd, "param_groups");
  SMP_CHECK(saved_groups.is_list() && saved_groups.size() == param_groups.size(), ConfigError,
            "smp::DistributedOptimizer::load_state_dict: the state dict has ",
            saved_groups.is_list() ? saved_groups.size() : 0, " param groups, the optimizer ",
            param_groups.size());
  NamedState named;
  if (sd.find("_smp_param_names") != nullptr) {
    named = by_name(sd);
  } else {  // a plain torch optimizer state dict: positions must match
    const auto state = by_index(entry(sd, "state"));
    std::size_t index = 0;
    for (std::size_t g = 0; g < param_groups.size(); ++g) {
      const auto& idx = saved_groups.items()[g].at("params").items();
      SMP_CHECK(idx.size() == param_groups[g].params().size(), ConfigError,
                "smp::DistributedOptimizer::load_state_dict: the state dict has no "
                "'_smp_param_names' and its param groups do not match the optimizer's; save it "
                "with DistributedOptimizer::state_dict() or local_state_dict()");
      for (const Value& i : idx) {
        const auto it = state.find(i.as_int());
        if (it != state.end()) named[names_[index]] = *it->second;
        ++index;
      }
    }
  }
  // The per-parameter state is built and checked before the optimizer changes.
  std::vector<std::pair<std::size_t, std::unique_ptr<torch::optim::OptimizerParamState>>> built;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const auto it = named.find(names_[i]);
    if (!owned_[i] || it == named.end()) continue;
    SMP_CHECK(it->second.is_dict(), ConfigError, "smp::DistributedOptimizer::load_state_dict: "
              "the state of parameter '", names_[i], "' must be a dict, got ",
              it->second.repr());
    const Value fitted = fit(names_[i], it->second, params_[i], partial);
    built.emplace_back(i, detail::make_param_state(*optimizer_, params_[i], fitted, names_[i]));
  }
  for (std::size_t g = 0; g < param_groups.size(); ++g)
    detail::set_group_hyper(*optimizer_, g, saved_groups.items()[g]);
  detail::clear_state(*optimizer_);
  for (auto& [i, state] : built) {
    void* key = params_[i].unsafeGetTensorImpl();
    if (state == nullptr)
      optimizer_->state().erase(key);
    else
      optimizer_->state()[key] = std::move(state);
  }
}

Value DistributedOptimizer::fit(const std::string& name, const Value& state,
                                const at::Tensor& param, bool partial) const {
  const ShardSpec& spec = model_->param_info(name).spec;
  Value out = Value::dict();
  for (const auto& [key, value] : state.pairs()) {
    if (!value.is_tensor() || value.tensor().dim() == 0 ||
        value.tensor().sizes() == param.sizes()) {
      out.set(key, value);
      continue;
    }
    const at::Tensor& t = value.tensor();
    if (!partial && !spec.is_replicated() &&
        t.sizes() == at::IntArrayRef(spec.global_shape)) {
      const std::int64_t size = spec.local_shape()[static_cast<std::size_t>(spec.split_dim)];
      out.set(key, t.narrow(spec.split_dim, spec.offset(), size).clone());
      continue;
    }
    SMP_THROW(ConfigError, "smp::DistributedOptimizer::load_state_dict: state '",
              key.is_string() ? key.as_string() : key.repr(),
              "' of parameter '", name, "' has shape ", t.sizes(), " but the parameter on this "
              "rank (rank ", rank(), ", tp_rank ", tp_rank(), " of ", tp_size(), ") has ",
              param.sizes(), "; a partial optimizer state dict loads only on the layout it was "
              "saved on: save a full one with state_dict() to change it");
  }
  return out;
}

}  // namespace smp

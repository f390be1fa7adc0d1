// Resharding from C++ (smp/model/reshard.h): shard records from a
// DistributedModel's parameter layout at save, and a resharded load that plans
// and reads through ckpt::ReshardSource.

#include "smp/model/reshard.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "smp/core/error.h"
#include "smp/model/state_dict.h"
#include "smp/runtime.h"

namespace smp {
namespace {

using ckpt::Value;

constexpr const char* kModelPrefix = "model/";
constexpr const char* kOptimizerPrefix = "optimizer/";

std::string key_of(const Value& k) {
  if (k.is_string()) return k.as_string();
  if (k.is_int()) return std::to_string(k.as_int());
  return k.repr();
}

bool is_optimizer_sd(const Value& v) {
  return v.is_dict() && v.find("_smp_param_names") != nullptr && v.find("state") != nullptr &&
         v.find("param_groups") != nullptr;
}

bool is_model_sd(const Value& v) {
  if (!v.is_dict() || v.find("_smp_param_names") != nullptr) return false;
  const Value* p = v.find(kPartialStateKey);
  return p != nullptr && p->is_bool() && p->as_bool();
}

std::map<std::string, const ParamInfo*> infos_by_name(const DistributedModel& model) {
  std::map<std::string, const ParamInfo*> out;
  for (const ParamInfo& i : model.param_infos()) out[i.name] = &i;
  return out;
}

/// The spec of a tensor of `shape` belonging to parameter `info` (its shard
/// spec when shaped like this rank's shard, replicated otherwise).
ShardSpec spec_for(const ParamInfo* info, const std::vector<std::int64_t>& shape) {
  if (info != nullptr && !info->spec.is_replicated() && info->spec.local_shape() == shape) {
    return info->spec;
  }
  return ShardSpec::replicated(shape);
}

struct Recorder {
  std::map<std::string, const ParamInfo*> infos;
  std::vector<ckpt::NamedPath> names;

  void tensor(Value& v, std::vector<std::string> path, std::string name, const ParamInfo* info) {
    const auto shape = v.tensor().sizes().vec();
    v.set_shard(spec_for(info, shape));
    names.push_back({std::move(path), std::move(name)});
  }

  void model_sd(Value& sd, const std::vector<std::string>& path) {
    for (auto& [k, v] : sd.pairs()) {
      if (!v.is_tensor() || !k.is_string()) continue;
      auto it = infos.find(k.as_string());
      auto p = path;
      p.push_back(k.as_string());
      tensor(v, std::move(p), kModelPrefix + k.as_string(),
             it == infos.end() ? nullptr : it->second);
    }
  }

  void optimizer_sd(Value& sd, const std::vector<std::string>& path) {
    std::map<std::string, std::string> names_of;  // position -> parameter name
    const Value& groups = sd.at("param_groups");
    const Value& gnames = sd.at("_smp_param_names");
    for (std::size_t g = 0; g < groups.items().size() && g < gnames.items().size(); ++g) {
      const Value& params = groups.items()[g].at("params");
      const auto& ns = gnames.items()[g].items();
      for (std::size_t i = 0; i < params.items().size() && i < ns.size(); ++i) {
        names_of[key_of(params.items()[i])] = ns[i].as_string();
      }
    }
    Value* state = sd.find("state");
    for (auto& [pos, st] : state->pairs()) {
      auto n = names_of.find(key_of(pos));
      if (n == names_of.end() || !st.is_dict()) continue;
      auto it = infos.find(n->second);
      for (auto& [k, v] : st.pairs()) {
        if (!v.is_tensor() || !k.is_string()) continue;
        auto p = path;
        p.insert(p.end(), {"state", key_of(pos), k.as_string()});
        tensor(v, std::move(p), kOptimizerPrefix + n->second + "/" + k.as_string(),
               it == infos.end() ? nullptr : it->second);
      }
    }
  }

  void walk(Value& v, const std::vector<std::string>& path) {
    if (is_optimizer_sd(v)) return optimizer_sd(v, path);
    if (is_model_sd(v)) return model_sd(v, path);
    if (v.is_dict()) {
      for (auto& [k, c] : v.pairs()) {
        if (!k.is_string() && !k.is_int()) continue;
        auto p = path;
        p.push_back(key_of(k));
        walk(c, p);
      }
    } else if (v.is_list() || v.is_tuple()) {
      for (std::size_t i = 0; i < v.items().size(); ++i) {
        auto p = path;
        p.push_back(std::to_string(i));
        walk(v.items()[i], p);
      }
    }
  }
};

}  // namespace

void record_shards(Value& object, const DistributedModel& model, ckpt::SaveOptions& options) {
  Recorder r;
  r.infos = infos_by_name(model);
  r.walk(object, {});
  if (!r.names.empty()) {
    options.write.info[ckpt::kTensorNamesInfoKey] = ckpt::encode_tensor_names(r.names);
  }
}

Value load_resharded(const std::string& f, const DistributedModel& model,
                     const DistributedOptimizer* optimizer, ckpt::ReshardStats* stats) {
  ckpt::ReshardSource src(f);
  const auto infos = infos_by_name(model);
  ckpt::TargetRank target;
  target.pp_rank = 0;
  target.tp_rank = tp_rank();
  target.rdp_rank = rdp_rank();
  std::vector<void*> dst;
  // Allocates this rank's tensor for `name` (nullptr: no file holds it).
  auto add = [&](const std::string& name, const ParamInfo* info) -> std::optional<at::Tensor> {
    const ckpt::SavedTensor* saved = src.find(name);
    if (saved == nullptr) return std::nullopt;
    const auto& glob = saved->spec.global_shape;
    ShardSpec spec = ShardSpec::replicated(glob);
    if (info != nullptr && !info->spec.is_replicated() && info->spec.global_shape == glob) {
      spec = info->spec;
    }
    at::Tensor t = at::empty(spec.local_shape(), at::TensorOptions().dtype(
                                                     ckpt::dtype_from_name(saved->dtype)));
    ckpt::TargetTensor tt;
    tt.name = name;
    tt.dtype = saved->dtype;
    tt.element_size = t.element_size();
    tt.spec = std::move(spec);
    target.tensors.push_back(std::move(tt));
    dst.push_back(t.data_ptr());
    return t;
  };

  Value out = Value::dict();
  Value msd = Value::ordered_dict();
  for (const auto& e : model.local_state_dict()) {
    if (e.key() == kPartialStateKey) continue;
    auto it = infos.find(e.key());
    auto t = add(kModelPrefix + e.key(), it == infos.end() ? nullptr : it->second);
    if (t) msd.set(e.key(), Value(*t));
  }
  msd.set(kPartialStateKey, true);
  out.set("model_state_dict", std::move(msd));

  if (optimizer != nullptr) {
    // State keys of each parameter, in the order the files list them.
    std::map<std::string, std::vector<std::string>> keys;
    const std::string prefix = kOptimizerPrefix;
    for (const auto& part : src.saved().parts) {
      for (const auto& t : part.tensors) {
        if (t.name.compare(0, prefix.size(), prefix) != 0) continue;
        const auto slash = t.name.rfind('/');
        if (slash <= prefix.size()) continue;
        const std::string param = t.name.substr(prefix.size(), slash - prefix.size());
        auto& ks = keys[param];
        const std::string k = t.name.substr(slash + 1);
        if (std::find(ks.begin(), ks.end(), k) == ks.end()) ks.push_back(k);
      }
    }
    Value osd = optimizer->local_state_dict();
    const auto& names = optimizer->param_names();
    const auto& owned = optimizer->owned();
    Value state = Value::dict();
    for (std::size_t pos = 0; pos < names.size(); ++pos) {
      if (!owned.empty() && !owned[pos]) continue;
      auto k = keys.find(names[pos]);
      if (k == keys.end()) continue;
      auto it = infos.find(names[pos]);
      Value st = Value::dict();
      for (const std::string& key : k->second) {
        auto t = add(prefix + names[pos] + "/" + key, it == infos.end() ? nullptr : it->second);
        if (t) st.set(key, Value(*t));
      }
      state.set(static_cast<std::int64_t>(pos), std::move(st));
    }
    *osd.find("state") = std::move(state);
    out.set("optimizer_state_dict", std::move(osd));
  }
  ckpt::ReshardStats st = src.load(target, dst);
  if (stats != nullptr) *stats = std::move(st);
  return out;
}

}  // namespace smp

// Resharding (smp.load(partial=True) on another layout): shard records at save
// time (annotate_shards, called by ckpt_save) and the ReshardSource that plans
// and reads a target rank's tensors (include/smp/checkpoint/reshard.h).

#include <torch/extension.h>

#include <pybind11/stl.h>

#include "bindings.h"
#include "smp/checkpoint/reshard.h"
#include "smp/checkpoint/save.h"
#include "smp/checkpoint/value.h"
#include "smp/core/error.h"

namespace py = pybind11;

namespace smp::python {
namespace {

using ckpt::Value;

std::string key_of(const Value& k) {
  if (k.is_string()) return k.as_string();
  if (k.is_int()) return std::to_string(k.as_int());
  return k.repr();
}

Value* child(Value& v, const std::string& key) {
  if (v.is_dict()) {
    for (auto& kv : v.pairs()) {
      if (key_of(kv.first) == key) return &kv.second;
    }
    return nullptr;
  }
  if (v.is_list() || v.is_tuple()) {
    std::size_t pos = 0;
    try {
      pos = std::stoul(key);
    } catch (const std::exception&) {
      return nullptr;
    }
    return pos < v.items().size() ? &v.items()[pos] : nullptr;
  }
  return nullptr;
}

ShardSpec spec_from(const py::handle& global_shape, const py::handle& split_dim, int num_shards,
                    int shard_index) {
  auto shape = global_shape.cast<std::vector<std::int64_t>>();
  if (split_dim.is_none() || num_shards <= 1) return ShardSpec::replicated(std::move(shape));
  return ShardSpec::split(std::move(shape), split_dim.cast<int>(), num_shards, shard_index);
}

py::dict stats_dict(const ckpt::ReshardStats& s) {
  py::dict d;
  d["bytes"] = s.bytes;
  d["read_bytes"] = s.read_bytes;
  d["reads"] = s.reads;
  d["parts_read"] = s.parts_read;
  d["plan_seconds"] = s.plan_seconds;
  d["read_seconds"] = s.read_seconds;
  d["missing"] = s.missing;
  return d;
}

}  // namespace

void annotate_shards(Value& root, const py::handle& shards, ckpt::SaveOptions& options) {
  if (shards.is_none()) return;
  std::vector<ckpt::NamedPath> names;
  for (const py::handle& rec : shards) {
    auto t = rec.cast<py::tuple>();
    auto path = t[0].cast<std::vector<std::string>>();
    Value* v = &root;
    for (const std::string& k : path) {
      v = v != nullptr ? child(*v, k) : nullptr;
    }
    SMP_CHECK(v != nullptr && v->is_tensor(), ConfigError, "smp.save: shard record for '",
              t[1].cast<std::string>(), "' names no tensor at key path '/", [&] {
                std::string s;
                for (const auto& k : path) s += k + "/";
                return s;
              }(), "'");
    ShardSpec spec = spec_from(t[2], t[3], t[4].cast<int>(), t[5].cast<int>());
    const auto local = spec.local_shape();
    const auto actual = v->tensor().sizes().vec();
    SMP_CHECK(local == actual, ConfigError, "smp.save: tensor '", t[1].cast<std::string>(),
              "' has shape ", py::str(py::cast(actual)).cast<std::string>(),
              " but its shard spec ", spec.describe(), " says ",
              py::str(py::cast(local)).cast<std::string>(),
              "; the model's layout and the state dict disagree");
    v->set_shard(std::move(spec));
    names.push_back({std::move(path), t[1].cast<std::string>()});
  }
  options.write.info[ckpt::kTensorNamesInfoKey] = ckpt::encode_tensor_names(names);
}

void bind_reshard(py::module_& m) {
  py::class_<ckpt::ReshardSource>(m, "ReshardSource",
                                  "A partial checkpoint opened for resharding: manifest and "
                                  "every part's index, no tensor data.")
      .def(py::init([](const std::string& f) {
             py::gil_scoped_release release;
             return std::make_unique<ckpt::ReshardSource>(f);
           }),
           py::arg("f"))
      .def_property_readonly("manifest_path", &ckpt::ReshardSource::manifest_path)
      .def_property_readonly("layout",
                             [](const ckpt::ReshardSource& s) {
                               const auto& m = s.manifest();
                               py::dict d;
                               d["pp_size"] = m.pp_size;
                               d["tp_size"] = m.tp_size;
                               d["rdp_size"] = m.rdp_size;
                               d["world_size"] = m.world_size;
                               d["v3"] = m.v3;
                               return d;
                             })
      .def_property_readonly("parts",
                             [](const ckpt::ReshardSource& s) {
                               py::list out;
                               for (const auto& p : s.saved().parts) {
                                 py::dict d;
                                 d["file"] = p.file;
                                 d["pp_rank"] = p.pp_rank;
                                 d["tp_rank"] = p.tp_rank;
                                 d["rdp_rank"] = p.rdp_rank;
                                 out.append(d);
                               }
                               return out;
                             })
      .def(
          "part_names",
          [](const ckpt::ReshardSource& s, std::size_t part) {
            py::dict out;
            const auto& tensors = s.saved().parts.at(part).tensors;
            for (std::size_t t = 0; t < tensors.size(); ++t) {
              out[py::str(tensors[t].name)] = py::cast(s.entry(part, t).path);
            }
            return out;
          },
          py::arg("part"), "{full name: index key path} of the named tensors of one part.")
      .def("parts_holding", &ckpt::ReshardSource::parts_holding, py::arg("name"))
      .def(
          "saved_spec",
          [](const ckpt::ReshardSource& s, const std::string& name) -> py::object {
            const ckpt::SavedTensor* t = s.find(name);
            if (t == nullptr) return py::none();
            py::dict d;
            d["dtype"] = t->dtype;
            d["global_shape"] = t->spec.global_shape;
            d["split_dim"] = t->spec.is_replicated() ? py::object(py::none())
                                                     : py::object(py::int_(t->spec.split_dim));
            return d;
          },
          py::arg("name"), "dtype, global shape and split dim of the first saved copy, or None.")
      .def(
          "load",
          [](const ckpt::ReshardSource& s, const py::list& targets, const std::vector<at::Tensor>& out,
             int pp_rank, int tp_rank, int rdp_rank, int threads, std::uint64_t buffer_bytes) {
            SMP_CHECK(targets.size() == out.size(), ConfigError, "ReshardSource.load: ",
                      targets.size(), " targets but ", out.size(), " tensors");
            ckpt::TargetRank target;
            target.pp_rank = pp_rank;
            target.tp_rank = tp_rank;
            target.rdp_rank = rdp_rank;
            std::vector<void*> dst;
            for (std::size_t i = 0; i < out.size(); ++i) {
              auto t = targets[i].cast<py::tuple>();
              ckpt::TargetTensor tt;
              tt.name = t[0].cast<std::string>();
              tt.spec = spec_from(t[1], t[2], t[3].cast<int>(), t[4].cast<int>());
              const at::Tensor& x = out[i];
              SMP_CHECK(x.device().is_cpu() && x.is_contiguous() &&
                            x.sizes().vec() == tt.spec.local_shape(),
                        ConfigError, "ReshardSource.load: the buffer of '", tt.name,
                        "' must be a contiguous CPU tensor of shape ",
                        py::str(py::cast(tt.spec.local_shape())).cast<std::string>());
              tt.dtype = ckpt::dtype_name(x.scalar_type());
              tt.element_size = x.element_size();
              target.tensors.push_back(std::move(tt));
              dst.push_back(x.data_ptr());
            }
            ckpt::ReshardOptions o;
            o.threads = threads;
            o.buffer_bytes = buffer_bytes;
            ckpt::ReshardStats st;
            {
              py::gil_scoped_release release;
              st = s.load(target, dst, o);
            }
            return stats_dict(st);
          },
          py::arg("targets"), py::arg("tensors"), py::arg("pp_rank") = 0,
          py::arg("tp_rank") = 0, py::arg("rdp_rank") = 0, py::arg("threads") = 4,
          py::arg("buffer_bytes") = std::uint64_t{8} << 20,
          "Plans and reads targets [(name, global_shape, split_dim, num_shards, shard_index)] "
          "into `tensors` (contiguous CPU, the saved dtype); returns stats.")
      .def(
          "load_group",
          [](const ckpt::ReshardSource& s, const py::list& members, std::size_t me,
             const std::vector<at::Tensor>& out, int threads, std::uint64_t buffer_bytes) {
            std::vector<ckpt::TargetRank> ranks;
            for (const py::handle& m : members) {
              auto mt = m.cast<py::tuple>();
              ckpt::TargetRank r;
              r.pp_rank = mt[0].cast<int>();
              r.tp_rank = mt[1].cast<int>();
              r.rdp_rank = mt[2].cast<int>();
              for (const py::handle& h : mt[3]) {
                auto t = h.cast<py::tuple>();
                ckpt::TargetTensor tt;
                tt.name = t[0].cast<std::string>();
                tt.spec = spec_from(t[1], t[2], t[3].cast<int>(), t[4].cast<int>());
                r.tensors.push_back(std::move(tt));
              }
              ranks.push_back(std::move(r));
            }
            SMP_CHECK(me < ranks.size() && ranks[me].tensors.size() == out.size(), ConfigError,
                      "ReshardSource.load_group: member ", me, " of ", ranks.size(),
                      " does not have one target per tensor (", out.size(), " tensors)");
            std::vector<void*> dst;
            for (std::size_t i = 0; i < out.size(); ++i) {
              const at::Tensor& x = out[i];
              const ckpt::TargetTensor& tt = ranks[me].tensors[i];
              SMP_CHECK(x.device().is_cpu() && x.is_contiguous() &&
                            x.sizes().vec() == tt.spec.local_shape(),
                        ConfigError, "ReshardSource.load_group: the buffer of '", tt.name,
                        "' must be a contiguous CPU tensor of shape ",
                        py::str(py::cast(tt.spec.local_shape())).cast<std::string>());
              dst.push_back(x.data_ptr());
            }
            ckpt::ReshardOptions o;
            o.threads = threads;
            o.buffer_bytes = buffer_bytes;
            ckpt::ReshardStats st;
            std::vector<ckpt::SharedChunk> chunks;
            std::vector<std::size_t> chunk_tensor;
            {
              py::gil_scoped_release release;
              st = s.load_group(ranks, me, dst, o, &chunks, &chunk_tensor);
            }
            py::dict d = stats_dict(st);
            py::list cl;
            for (std::size_t c = 0; c < chunks.size(); ++c) {
              cl.append(py::make_tuple(chunk_tensor[c], chunks[c].row_begin, chunks[c].row_end,
                                       chunks[c].reader));
            }
            d["chunks"] = cl;
            return d;
          },
          py::arg("members"), py::arg("me"), py::arg("tensors"), py::arg("threads") = 4,
          py::arg("buffer_bytes") = std::uint64_t{8} << 20,
          "Cooperative load of a group: members [(pp_rank, tp_rank, rdp_rank, targets)] (the "
          "same list on every member), `me` this rank's index; reads this member's share into "
          "`tensors` (its targets' buffers, saved dtype). stats['chunks'] lists (tensor index, "
          "row_begin, row_end, reader) to broadcast from `reader` within the group, in order.");
}

}  // namespace smp::python

// The model engine: gradient averaging (GradReducer) and the helpers of
// sharded optimizer state. Blocking calls release the GIL.

#include <torch/extension.h>

#include <pybind11/stl.h>

#include "bindings.h"
#include "smp/core/error.h"
#include "smp/model/grad_reducer.h"
#include "smp/model/optimizer_shard.h"
#include "smp/model/state_dict.h"
#include "smp/runtime.h"

namespace py = pybind11;

namespace smp::python {
namespace {

std::vector<ParamInfo> param_infos(const std::vector<at::Tensor>& params,
                                   const std::vector<std::string>& names,
                                   const std::vector<std::optional<int>>& split_dims,
                                   const std::vector<std::vector<std::int64_t>>& global_shapes,
                                   const std::optional<std::vector<bool>>& distributed) {
  const std::size_t n = params.size();
  SMP_CHECK(names.size() == n && split_dims.size() == n && global_shapes.size() == n &&
                (!distributed || distributed->size() == n),
            ConfigError, "GradReducer: params, names, split_dims, global_shapes (and distributed) "
            "must have one entry per parameter; got ", n, ", ", names.size(), ", ",
            split_dims.size(), ", ", global_shapes.size(),
            distributed ? detail::str(", ", distributed->size()) : std::string());
  std::vector<ParamInfo> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    out[i].name = names[i];
    out[i].param = params[i];
    out[i].spec = split_dims[i] ? ShardSpec::split(global_shapes[i], *split_dims[i], tp_size(),
                                                   tp_rank())
                                : ShardSpec::replicated(global_shapes[i]);
    out[i].tp_module = distributed && (*distributed)[i];
    const auto local = out[i].spec.local_shape();
    SMP_CHECK(std::vector<std::int64_t>(params[i].sizes().begin(), params[i].sizes().end()) ==
                  local,
              ConfigError, "GradReducer: parameter '", names[i], "' has shape ",
              params[i].sizes(), " on rank ", rank(), " (tp_rank ", tp_rank(), "), but its spec ",
              out[i].spec.describe(), " gives a local shape of ", at::IntArrayRef(local),
              "; pass the full parameter's shape and its split dimension");
  }
  return out;
}

/// The wording of Python's errors.
const state_dict::Api kPythonApi{"smp.DistributedModel.load_state_dict", "strict=False",
                                 "state_dict(gather_to_rank0=True)"};

/// A Python state dict (a mapping) as a TensorMap: the partial marker (a
/// Python bool or a tensor) becomes a bool tensor, a value that is not a tensor
/// an undefined tensor (an error when the model has that key).
TensorMap tensor_map(const py::handle& state) {
  TensorMap out;
  const py::dict dict(py::reinterpret_borrow<py::object>(state));
  for (const auto& item : dict) {
    const std::string key = py::cast<std::string>(item.first);
    at::Tensor value;
    if (THPVariable_Check(item.second.ptr())) {
      value = py::cast<at::Tensor>(item.second);
    } else if (key == kPartialStateKey && PyBool_Check(item.second.ptr())) {
      value = at::full({}, item.second.ptr() == Py_True, at::kBool);
    }
    out.insert(key, value);
  }
  return out;
}

TensorMap tensor_map(const std::vector<std::pair<std::string, at::Tensor>>& entries) {
  TensorMap out;
  for (const auto& [k, v] : entries) out.insert(k, v);
  return out;
}

/// (name, tensor or None, gather or None, load or None, local) tuples as FullEntry.
std::vector<state_dict::FullEntry> full_entries(const py::list& entries) {
  std::vector<state_dict::FullEntry> out;
  out.reserve(entries.size());
  for (const auto& item : entries) {
    const auto t = py::reinterpret_borrow<py::tuple>(item);
    SMP_CHECK(t.size() == 5, ConfigError, "state_dict entries are (name, tensor, gather, load, "
              "local) tuples; got one of ", t.size(), " items");
    state_dict::FullEntry e;
    e.name = py::cast<std::string>(t[0]);
    if (!t[1].is_none()) e.tensor = py::cast<at::Tensor>(t[1]);
    if (!t[2].is_none()) {
      auto fn = py::reinterpret_borrow<py::function>(t[2]);
      e.gather = [fn] { return py::cast<at::Tensor>(fn()); };
    }
    if (!t[3].is_none()) {
      auto fn = py::reinterpret_borrow<py::function>(t[3]);
      e.load = [fn](const at::Tensor& full) { fn(full); };
    }
    e.local = py::cast<bool>(t[4]);
    out.push_back(std::move(e));
  }
  return out;
}

py::tuple keys(const LoadResult& r) { return py::make_tuple(r.missing, r.unexpected); }

}  // namespace

void bind_model(py::module_& m) {
  py::class_<GradReducer>(m, "GradReducer", R"doc(
Data-parallel gradient averaging, bucketed and overlapped with backward.

Replicated parameters are averaged over DP_GROUP; parameters of tensor-parallel
modules (split ones, and unsplit ones marked ``distributed``) are summed over
RDP_GROUP and divided by dp_size (rdp_size with prescaled_batch). Call
mark_ready(i) when parameter i's gradient is final (a post-accumulate-grad
hook), then finish() once per backward pass.

    r = smp._C.GradReducer(params, names, [None] * len(params),
                           [list(p.shape) for p in params])
    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda _, i=i: r.mark_ready(i))
    loss.backward(); r.finish()
)doc")
      .def(py::init([](const std::vector<at::Tensor>& params, const std::vector<std::string>& names,
                       const std::vector<std::optional<int>>& split_dims,
                       const std::vector<std::vector<std::int64_t>>& global_shapes,
                       std::size_t bucket_bytes, std::optional<bool> prescaled_batch,
                       const std::optional<std::vector<bool>>& distributed) {
             auto infos = param_infos(params, names, split_dims, global_shapes, distributed);
             GradReducer::Options options;
             options.bucket_bytes = bucket_bytes;
             options.prescaled_batch =
                 prescaled_batch ? *prescaled_batch : smp::config().prescaled_batch;
             return std::make_unique<GradReducer>(std::move(infos), options);
           }),
           py::arg("params"), py::arg("names"), py::arg("split_dims"), py::arg("global_shapes"),
           py::arg("bucket_bytes") = std::size_t{25} << 20,
           py::arg("prescaled_batch") = py::none(), py::arg("distributed") = py::none(),
           "split_dims[i]: the dimension parameter i is split along across TP_GROUP, or None. "
           "distributed[i]: reduce an unsplit parameter as a tensor-parallel one (a bias on "
           "tp_rank 0 only). prescaled_batch None: the config key.")
      .def("mark_ready", &GradReducer::mark_ready, py::arg("index"),
           "Parameter `index`'s gradient is final for this pass. Thread-safe, does not block.")
      .def("finish", &GradReducer::finish, py::call_guard<py::gil_scoped_release>(),
           "Reduces every bucket (unmarked parameters count as zero gradients), writes the "
           "averages into .grad and blocks until done.")
      .def_property_readonly("num_buckets", &GradReducer::num_buckets);

  m.def("partition_params", &partition_params, py::arg("numels"), py::arg("num_ranks"),
        R"doc(Owner rank of each parameter, balancing elements (largest first, to the
least loaded rank; ties to the lowest). Deterministic.

    >>> smp._C.partition_params([10, 10, 5, 5, 1], 2)
    [0, 1, 0, 1, 0]
)doc");
  m.def("broadcast_from_owners", &broadcast_from_owners, py::arg("params"), py::arg("owner"),
        py::arg("group") = CommGroup::kRdpGroup, py::call_guard<py::gil_scoped_release>(),
        R"doc(Every member of `group` gets each tensor's value from its owner (a rank
within the group), in place. Collective over the group.

    smp._C.broadcast_from_owners(params, owners, smp.RDP_GROUP)
)doc");
  // The state-dict rules (smp/model/state_dict.h). Python callables run with
  // the GIL held, as these calls keep it.
  m.attr("PARTIAL_STATE_KEY") = kPartialStateKey;
  m.def("state_dict_is_partial", [](const py::object& state) {
    return state_dict::is_partial(tensor_map(state));
  }, py::arg("state"), "True when the state dict carries \"_smp_is_partial\": True.");
  m.def("state_dict_gather_full", [](const py::list& entries, bool keep) {
    const TensorMap full = state_dict::gather_full(full_entries(entries), keep);
    py::list out;
    for (const auto& e : full) out.append(py::make_tuple(e.key(), e.value()));
    return out;
  }, py::arg("entries"), py::arg("keep"),
        "The (name, full tensor) of the local entries, [] unless keep. entries: (name, tensor, "
        "gather, load, local) tuples in state_dict order; gather/load (callables, or None for "
        "a local tensor) give a tensor-parallel parameter's full tensor / load its slice.");
  m.def("state_dict_load_full", [](const py::list& entries, const py::object& state,
                                   bool strict) {
    return keys(state_dict::load_full(full_entries(entries), tensor_map(state), strict,
                                      kPythonApi));
  }, py::arg("entries"), py::arg("state"), py::arg("strict"),
        "Loads a full state dict into the entries; returns (missing, unexpected).");
  m.def("state_dict_load_partial",
        [](const std::vector<std::pair<std::string, at::Tensor>>& local,
           const py::object& state, bool strict) {
    return keys(state_dict::load_partial(tensor_map(local), tensor_map(state), strict,
                                         kPythonApi));
  }, py::arg("local"), py::arg("state"), py::arg("strict"),
        "Loads a partial state dict into local ((name, tensor) pairs); returns (missing, "
        "unexpected).");
}

}  // namespace smp::python

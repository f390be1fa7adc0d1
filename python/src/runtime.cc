// The process-wide runtime: init/shutdown, rank and size queries, groups, the
// store address and build information.

#include <pybind11/stl.h>

#include "bindings.h"
#include "smp/runtime.h"

namespace py = pybind11;

namespace smp::python {

void bind_runtime(py::module_& m) {
  m.def(
      "init",
      [](const py::object& config) {
        ConfigMap user;
        if (!config.is_none()) user = to_config_map(config.cast<py::dict>());
        py::gil_scoped_release release;
        smp::init(user);
      },
      py::arg("config") = py::none(),
      R"doc(Initializes the engine (collective over the world). SM_HP_MP_PARAMETERS
overrides the given keys. Raises ConfigError for a bad config and StateError
when already initialized. The Python smp.init also creates torch process groups.

    >>> smp._C.init({"pipeline_parallel_degree": 2, "ddp": True})
)doc");
  m.def(
      "shutdown",
      [] {
        py::gil_scoped_release release;
        smp::shutdown();
      },
      "Releases the communicators; init may be called again afterwards.");
  m.def("is_initialized", &smp::is_initialized);
  m.def(
      "config", [] { return to_dict(smp::config().to_map()); },
      "The resolved config of the running job as a dict (all keys).");
  m.def(
      "topology", [] { return smp::topology(); },
      "A copy of the job's Topology (raises StateError before init).");
  m.def(
      "launch_kind", [] { return std::string(to_string(smp::launch_kind())); },
      "\"single\", \"mpi\" or \"torchrun\".");

  m.def("rank", &smp::rank, "World rank of this process.");
  m.def("size", &smp::size, "Number of processes.");
  m.def("local_rank", &smp::local_rank, "Rank of this process on its node.");
  m.def("local_size", &smp::local_size, "Number of processes on this node.");
  m.def("pp_rank", &smp::pp_rank);
  m.def("pp_size", &smp::pp_size);
  m.def("tp_rank", &smp::tp_rank);
  m.def("tp_size", &smp::tp_size);
  m.def("rdp_rank", &smp::rdp_rank);
  m.def("rdp_size", &smp::rdp_size);
  m.def("dp_rank", &smp::dp_rank);
  m.def("dp_size", &smp::dp_size);
  m.def("mp_rank", &smp::mp_rank);
  m.def("mp_size", &smp::mp_size);
  m.def(
      "rank_of_type", [](RankType type) { return smp::rank_of_type(type); }, py::arg("rank_type"),
      "This process's rank of the given type.");
  m.def(
      "group_members", [](CommGroup group) { return smp::group_members(group); },
      py::arg("group"),
      R"doc(World ranks of this process's group, index = rank within the group.

    >>> smp._C.group_members(smp.CommGroup.TP_GROUP)   # rank 5 of 8, pp2 tp2
    [4, 5]
)doc");
  m.def(
      "comm_backend", [](CommGroup group) { return std::string(smp::communicator(group).backend()); },
      py::arg("group"), "The host backend of this process's group: \"mpi\", \"gloo\" or \"local\".");

  m.def("store_host", &smp::store_host, "Host of the job's TCPStore (served by rank 0).");
  m.def("store_port", &smp::store_port, "Port of the job's TCPStore.");
  m.def("version", [] { return std::string(smp::version()); });
  m.def("built_with_nccl", &smp::built_with_nccl);
  m.def("built_with_mpi", &smp::built_with_mpi);
  m.def(
      "default_timeout",
      [] { return std::chrono::duration<double>(default_comm_timeout()).count(); },
      "Default timeout of blocking calls in seconds: SMP_COMM_TIMEOUT, else 600.");
}

}  // namespace smp::python

// Enums of the engine, config conversion, and smp._C.Topology (the pure rank
// grid: usable without init, e.g. to check placements in tests).

#include <pybind11/native_enum.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "smp/core/error.h"
#include "smp/core/topology.h"

namespace py = pybind11;

namespace smp::python {

ConfigMap to_config_map(const py::dict& config) {
  ConfigMap out;
  for (const auto& item : config) {
    if (!py::isinstance<py::str>(item.first)) {
      SMP_THROW(ConfigError, "smp config keys must be strings, got ",
                py::str(py::type::of(item.first).attr("__name__")).cast<std::string>(), " ",
                py::repr(item.first).cast<std::string>());
    }
    const std::string key = item.first.cast<std::string>();
    PyObject* v = item.second.ptr();
    if (PyBool_Check(v)) {
      out[key] = item.second.cast<bool>();
    } else if (!PyFloat_Check(v) && PyIndex_Check(v)) {  // int, numpy integers
      out[key] = py::int_(py::reinterpret_borrow<py::object>(v)).cast<std::int64_t>();
    } else if (PyFloat_Check(v)) {
      out[key] = item.second.cast<double>();
    } else if (PyUnicode_Check(v)) {
      out[key] = item.second.cast<std::string>();
    } else {
      SMP_THROW(ConfigError, "smp config key '", key, "' has a value of type ",
                py::str(py::type::of(item.second).attr("__name__")).cast<std::string>(), " (",
                py::repr(item.second).cast<std::string>(),
                "); smp config values must be bool, int, float or str");
    }
  }
  return out;
}

py::dict to_dict(const ConfigMap& config) {
  py::dict out;
  for (const auto& [key, value] : config) {
    out[py::str(key)] = std::visit([](const auto& v) -> py::object { return py::cast(v); }, value);
  }
  return out;
}

CommOptions comm_options(const std::optional<double>& timeout_s) {
  CommOptions options;
  if (timeout_s) {
    SMP_CHECK(*timeout_s > 0, ConfigError, "timeout must be a positive number of seconds, got ",
              *timeout_s, "; pass None for the default (SMP_COMM_TIMEOUT or 600 s)");
    options.timeout = std::chrono::milliseconds(static_cast<std::int64_t>(*timeout_s * 1000.0));
    if (options.timeout.count() == 0) options.timeout = std::chrono::milliseconds(1);
  }
  return options;
}

void bind_config_topology(py::module_& m) {
  py::native_enum<CommGroup>(m, "CommGroup", "enum.IntEnum",
                             "The communication groups of smp v1.")
      .value("WORLD", CommGroup::kWorld)
      .value("PP_GROUP", CommGroup::kPpGroup)
      .value("TP_GROUP", CommGroup::kTpGroup)
      .value("RDP_GROUP", CommGroup::kRdpGroup)
      .value("DP_GROUP", CommGroup::kDpGroup)
      .value("MP_GROUP", CommGroup::kMpGroup)
      .finalize();
  py::native_enum<RankType>(m, "RankType", "enum.IntEnum",
                            "Rank types; rank X_RANK indexes the group X_GROUP.")
      .value("WORLD_RANK", RankType::kWorldRank)
      .value("PP_RANK", RankType::kPpRank)
      .value("TP_RANK", RankType::kTpRank)
      .value("RDP_RANK", RankType::kRdpRank)
      .value("DP_RANK", RankType::kDpRank)
      .value("MP_RANK", RankType::kMpRank)
      .finalize();
  py::native_enum<ReduceOp>(m, "ReduceOp", "enum.IntEnum",
                            "Reductions of the tensor collectives (AVG divides by the group size).")
      .value("SUM", ReduceOp::kSum)
      .value("AVG", ReduceOp::kAvg)
      .value("MAX", ReduceOp::kMax)
      .value("MIN", ReduceOp::kMin)
      .value("PRODUCT", ReduceOp::kProduct)
      .finalize();

  m.def("group_of", &group_of, py::arg("rank_type"),
        "The group whose index is a rank of this type: group_of(RankType.PP_RANK) == "
        "CommGroup.PP_GROUP.");

  m.def(
      "resolve_config",
      [](const py::dict& config, bool read_env) {
        ConfigMap user = to_config_map(config);
        return to_dict(Config::from_map(user, read_env).to_map());
      },
      py::arg("config"), py::arg("read_env") = true,
      R"doc(Validates smp config keys and returns the resolved config (all keys).
Does not need init and does not check the world size.

    >>> smp._C.resolve_config({"partitions": 2})["pipeline_parallel_degree"]
    2
)doc");
  m.def("valid_config_keys", &Config::valid_keys, "Every smp config key, sorted.");

  py::class_<Topology>(m, "Topology", R"doc(
The rank grid of a job: coordinates, derived ranks and group members. Pure
arithmetic; it needs no init.

    >>> t = smp._C.Topology(8, pp=2, tp=2)           # placement "cluster" (DPT)
    >>> t.coord(5)                                    # (rdp, pp, tp)
    (1, 0, 1)
    >>> t.group_members(smp.CommGroup.TP_GROUP, 5)
    [4, 5]
)doc")
      .def(py::init<int, int, int, const std::string&>(), py::arg("world_size"), py::arg("pp"),
           py::arg("tp"), py::arg("placement") = "cluster")
      .def_property_readonly("world_size", &Topology::world_size)
      .def_property_readonly("pp_size", &Topology::pp_size)
      .def_property_readonly("tp_size", &Topology::tp_size)
      .def_property_readonly("rdp_size", &Topology::rdp_size)
      .def_property_readonly("dp_size", &Topology::dp_size)
      .def_property_readonly("mp_size", &Topology::mp_size)
      .def_property_readonly(
          "placement", [](const Topology& t) { return t.placement().letters(); },
          "The axis order as letters, slowest first (\"DPT\" for cluster).")
      .def(
          "coord",
          [](const Topology& t, int rank) {
            const Coord c = t.coord(rank);
            return py::make_tuple(c.rdp, c.pp, c.tp);
          },
          py::arg("rank"), "(rdp, pp, tp) of a world rank.")
      .def(
          "rank_of", [](const Topology& t, int rdp, int pp, int tp) {
            return t.rank_of(Coord{rdp, pp, tp});
          },
          py::arg("rdp"), py::arg("pp"), py::arg("tp"), "World rank at these coordinates.")
      .def("pp_rank", &Topology::pp_rank, py::arg("rank"))
      .def("tp_rank", &Topology::tp_rank, py::arg("rank"))
      .def("rdp_rank", &Topology::rdp_rank, py::arg("rank"))
      .def("dp_rank", &Topology::dp_rank, py::arg("rank"))
      .def("mp_rank", &Topology::mp_rank, py::arg("rank"))
      .def("rank_of_type", &Topology::rank_of_type, py::arg("rank"), py::arg("rank_type"))
      .def("group_size", &Topology::group_size, py::arg("group"))
      .def("group_members", &Topology::group_members, py::arg("group"), py::arg("rank"),
           "World ranks of `rank`'s group, index = rank within the group.")
      .def("all_groups", &Topology::all_groups, py::arg("group"),
           "All groups of this kind, each ordered as group_members, sorted by lowest world rank.")
      .def("group_index", &Topology::group_index, py::arg("group"), py::arg("rank"))
      .def("peer_world_rank", &Topology::peer_world_rank, py::arg("rank"), py::arg("rank_type"),
           py::arg("peer"),
           "World rank of the member of `rank`'s group of `rank_type` whose rank of that type is "
           "`peer`. Raises ConfigError when peer is out of range.")
      .def("describe", &Topology::describe, py::arg("rank"))
      .def("__repr__", [](const Topology& t) {
        return detail::str("Topology(world_size=", t.world_size(), ", pp=", t.pp_size(),
                           ", tp=", t.tp_size(), ", placement='", t.placement().letters(), "')");
      });
}

}  // namespace smp::python

#pragma once
// Internal to the extension smp._C: one bind_* function per area, each defined
// in the file of the same name, plus the conversions they share.

#include <optional>

#include <pybind11/pybind11.h>

#include "smp/comm/types.h"
#include "smp/core/config.h"

namespace smp::ckpt {
class Value;
struct SaveOptions;
}  // namespace smp::ckpt

namespace smp::python {

/// errors.cc: the Python exception classes and the one translator of smp::Error.
void bind_errors(pybind11::module_& m);
/// config_topology.cc: enums, smp._C.Topology, config helpers.
void bind_config_topology(pybind11::module_& m);
/// runtime.cc: init/shutdown, rank and size queries, store address, build info.
void bind_runtime(pybind11::module_& m);
/// comm.cc: byte collectives for the object API and tensor collectives.
void bind_comm(pybind11::module_& m);
/// nn.cc: smp._C.nn, tensor-parallel functions, layer forwards and layouts.
void bind_nn(pybind11::module_& m);
/// checkpoint.cc: smp.save / smp.load engine, save sessions, object conversion.
void bind_checkpoint(pybind11::module_& m);
/// reshard.cc: smp._C.ReshardSource (loading a partial checkpoint on another layout).
void bind_reshard(pybind11::module_& m);
/// reshard.cc: attaches the shard records `shards` ([(key path, full name,
/// global_shape, split_dim, num_shards, shard_index)], or None) to the tensor
/// leaves of `root` and their names to the index info of the file written.
void annotate_shards(ckpt::Value& root, const pybind11::handle& shards,
                     ckpt::SaveOptions& options);
/// checkpoint.cc: a Python object as a checkpoint Value (ConfigError naming the
/// key path of the first leaf smp's format does not hold), and back.
ckpt::Value object_to_value(const pybind11::handle& obj);
pybind11::object value_to_object(const ckpt::Value& value);
/// tools.cc: what the offline checkpoint tools (smp-checkpoint) need of the
/// engine: Reader (index, tensors, record CRCs), manifests, streaming writes.
void bind_tools(pybind11::module_& m);
/// model.cc: GradReducer, partition_params, broadcast_from_owners.
void bind_model(pybind11::module_& m);
/// pipeline.cc: smp._C.pipeline, the pipeline schedules.
void bind_pipeline(pybind11::module_& m);

/// A Python dict of smp config keys as a ConfigMap. Values must be bool, int,
/// float or str; others raise ConfigError naming the key and the type.
ConfigMap to_config_map(const pybind11::dict& config);
/// A ConfigMap as a Python dict.
pybind11::dict to_dict(const ConfigMap& config);

/// CommOptions for a call with an optional timeout in seconds (None: the
/// default, SMP_COMM_TIMEOUT or 600 s). Raises ConfigError for timeout <= 0.
CommOptions comm_options(const std::optional<double>& timeout_s);

}  // namespace smp::python

#pragma once
/// Resharding from C++: shard records for the seed flow's partial checkpoint
/// (record_shards, before smp::ckpt::save) and loading such a checkpoint on
/// another tensor-parallel / rdp layout (load_resharded), through the engine's
/// one planner and reader (smp/checkpoint/reshard.h).
///
///   smp::ckpt::Value sd = smp::ckpt::Value::dict();
///   sd.set("model_state_dict", smp::state_value(model->local_state_dict()));
///   sd.set("optimizer_state_dict", optimizer.local_state_dict());
///   smp::ckpt::SaveOptions so{/*partial=*/true, optimizer.sharded()};
///   smp::record_shards(sd, *model, so);                 // names + shard specs
///   if (smp::rdp_rank() == 0 || optimizer.sharded()) smp::ckpt::save(sd, f, so);
///   ...  // another job, another tp degree:
///   smp::ckpt::Value v = smp::ckpt::saved_layout_differs(f)
///       ? smp::load_resharded(f, *model, &optimizer) : smp::ckpt::load(f);
///   model->load_state_dict(smp::tensor_map(v.at("model_state_dict")), true, false);
///   optimizer.load_state_dict(v.at("optimizer_state_dict"));
///
/// Names are those of the Python side (python/smp/_reshard.py): "model/<key>"
/// and "optimizer/<parameter name>/<state key>", so files of either language
/// reshard in the other. The C++ DistributedModel has no pipeline parallelism:
/// the load side plans pp_rank 0 of a pp_size 1 layout.

#include <string>

#include "smp/checkpoint/reshard.h"
#include "smp/checkpoint/save.h"
#include "smp/checkpoint/value.h"
#include "smp/model/distributed_model.h"
#include "smp/model/distributed_optimizer.h"

namespace smp {

/// Sets the shard spec of every tensor of the model state dicts (dicts with
/// kPartialStateKey true and no "_smp_param_names") and optimizer state dicts
/// (dicts with "_smp_param_names", "state", "param_groups") inside `object`,
/// from `model`'s parameter layout, and records their full names in
/// options.write.info (ckpt::kTensorNamesInfoKey). ConfigError naming the
/// tensor when its shape is not this rank's shard of the parameter.
void record_shards(ckpt::Value& object, const DistributedModel& model,
                   ckpt::SaveOptions& options);

/// This rank's {"model_state_dict": ..., "optimizer_state_dict": ...} (the
/// latter only with `optimizer`) of partial checkpoint `f`, saved with
/// record_shards (or Python smp.save) on any tensor-parallel / rdp layout,
/// planned from `model`'s parameter layout and read by byte ranges. The
/// optimizer state dict has the structure (and hyperparameters) of
/// optimizer->local_state_dict(), its state the saved moments; with
/// shard_optimizer_state only the parameters this rank owns. Throws
/// CheckpointError naming a missing tensor, range and file.
ckpt::Value load_resharded(const std::string& f, const DistributedModel& model,
                           const DistributedOptimizer* optimizer,
                           ckpt::ReshardStats* stats = nullptr);

}  // namespace smp

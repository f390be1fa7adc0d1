#pragma once
/// The process-wide smp runtime: smp::init() detects how the job was launched
/// (mpirun, torchrun-style environment, or a single process), builds the rank
/// grid from the config and opens a communicator for each group this process
/// belongs to. C++ training loops and the Python package use the same runtime.
///
///   smp::init({{"pipeline_parallel_degree", int64_t{2}},
///              {"tensor_parallel_degree", int64_t{2}}, {"ddp", true}});
///   smp::communicator(smp::CommGroup::kTpGroup).allreduce(buf, n, smp::DataType::kFloat32,
///                                                         smp::ReduceOp::kSum);

#include <string>

#include "smp/comm/communicator.h"
#include "smp/core/config.h"
#include "smp/core/topology.h"

namespace smp {

/// How the processes of this job were started.
enum class LaunchKind { kSingle, kMpi, kTorchrun };
/// "single", "mpi", "torchrun"
const char* to_string(LaunchKind kind);

/// Initializes the runtime. `user` holds smp config keys; the JSON object in
/// SM_HP_MP_PARAMETERS overrides them. Collective over the world. Throws
/// ConfigError for a bad config, StateError when already initialized.
void init(const ConfigMap& user = {});
/// Releases communicators (and MPI when smp initialized it). init() may be
/// called again afterwards.
void shutdown();
bool is_initialized();

const Config& config();
const Topology& topology();
LaunchKind launch_kind();

int rank();
int size();
int local_rank();
int local_size();
int pp_rank();
int pp_size();
int tp_rank();
int tp_size();
int rdp_rank();
int rdp_size();
int dp_rank();
int dp_size();
int mp_rank();
int mp_size();
/// This process's rank of the given type.
int rank_of_type(RankType type);
/// World ranks of this process's group, index = rank within the group.
const std::vector<int>& group_members(CommGroup group);

/// The host communicator (MPI, gloo or local) of this process's group.
Communicator& communicator(CommGroup group);
/// The device (NCCL) communicator of this process's group on CUDA device
/// `device`, created on first use: every member must make its first call on
/// the group together. Throws NotSupportedError when built without NCCL.
Communicator& device_communicator(CommGroup group, int device);
/// A two-member device communicator between this process and `peer_world_rank`
/// (group rank 0 is the lower world rank), created on first use by both.
Communicator& device_p2p_communicator(int peer_world_rank, int device);

/// Address of the job's key-value store (a torch TCPStore served by rank 0),
/// which the Python package uses to create torch.distributed process groups.
std::string store_host();
int store_port();

/// Version string of the library, "0.1.0".
const char* version();
/// True when built with NCCL support.
bool built_with_nccl();
/// True when built with MPI support.
bool built_with_mpi();

}  // namespace smp

#pragma once
// MPI backend (host memory). Internal: users reach it through smp::communicator().
// Every operation honours CommOptions::timeout. After a receive times out it is
// cancelled and the communicator stays usable; after a collective times out the
// communicator must not be used again (MPI cannot cancel a collective).

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "smp/comm/communicator.h"

namespace smp::mpi {

/// True when the environment says this process was started by mpirun/mpiexec
/// (OpenMPI, MPICH/Hydra or PMIx variables).
bool launched_by_mpi();

/// Initializes MPI (MPI_THREAD_MULTIPLE requested) unless already initialized,
/// e.g. by mpi4py. Idempotent; may be called again after finalize().
void initialize();
/// Releases what initialize() created. When initialize() started MPI, MPI_Finalize
/// runs at process exit (MPI cannot be initialized twice in a process, and
/// smp::shutdown() followed by smp::init() must work). Idempotent.
void finalize();

int world_rank();
int world_size();
/// (local_rank, local_size) among the processes on this node.
std::pair<int, int> local_rank_and_size();

/// Communicator over all ranks (a duplicate of MPI_COMM_WORLD), named "WORLD".
std::unique_ptr<Communicator> make_world();

/// Collective over the world: every rank passes the same `groups` (a partition
/// of the world ranks, each ordered by group rank) and gets the communicator of
/// the group that holds it.
std::unique_ptr<Communicator> make_group(const std::string& name,
                                         const std::vector<std::vector<int>>& groups);

}  // namespace smp::mpi

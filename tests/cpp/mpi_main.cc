// gtest main for the multi-process tests: run under mpirun -np N. Every rank runs
// every test; only rank 0 prints; the exit code is non-zero when any rank failed.
#include <gtest/gtest.h>
#include <mpi.h>

#include "comm/mpi/communicator.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  smp::mpi::initialize();
  if (smp::mpi::world_rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int rc = RUN_ALL_TESTS();
  int any = 0;
  MPI_Allreduce(&rc, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  smp::mpi::finalize();
  return any;
}

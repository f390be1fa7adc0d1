#pragma once
// Internal to libsmp: the job's key-value store for engine layers above the
// runtime (the checkpoint commit protocol). Not installed.

#include <string>

#include <torch/csrc/distributed/c10d/Store.hpp>

namespace smp::detail {

/// The job's TCPStore (served by rank 0), shared by every rank of this init.
/// Throws StateError before smp::init().
c10::intrusive_ptr<c10d::Store> store();

/// A prefix unique to this init of the runtime ("smp/r<restart>/g<generation>/"):
/// keys under it never collide with keys of an earlier init on a reused store.
std::string store_key_prefix();

}  // namespace smp::detail

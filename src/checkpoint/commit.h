#pragma once
/// Commit (internal): texts that the commit protocol (commit.cc) and load
/// resolution (load.cc) both put into their errors, and the save that
/// async_save.cc runs in its background thread.

#include <string>
#include <vector>

#include "smp/checkpoint/save.h"

namespace smp {
namespace ckpt {
namespace internal {

/// Who must call smp.save(partial=True); quoted by errors of both sides.
extern const char* const kCallRule;

/// "rank 3 (pp_rank 0, tp_rank 1, rdp_rank 1, dp_rank 3)"
std::string describe_rank(int rank);
/// describe_rank of each, comma separated.
std::string describe_ranks(const std::vector<int>& ranks);
/// "'a', 'b'" or "none".
std::string list_strings(const std::vector<std::string>& items);

/// save() without waiting for an asynchronous save first (the background
/// thread of async_save runs it).
SaveStats save_now(const Value& object, const std::string& f, const SaveOptions& options);

}  // namespace internal
}  // namespace ckpt
}  // namespace smp

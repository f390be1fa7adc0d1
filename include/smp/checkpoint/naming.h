#pragma once
/// File names of smp checkpoints, the same as the SageMaker model parallel
/// library v1 uses, so that checkpoints move between the two:
///
///   full                          <f>
///   partial                       <f>_<pp_rank>_<tp_rank><suffix>
///   partial, sharded optimizer    <f>_<pp_rank>_<tp_rank>_<rdp_rank><suffix>   ("v3")
///   manifest of a partial save    <f>.smp_manifest.json
///   a file being written          <name>.tmp-<save id>
///
/// `<suffix>` is "" for smp.save and ".pt" for the files of smp.save_checkpoint
/// (newer smp v1 appends ".pt" after the ranks).

#include <optional>
#include <string>
#include <vector>

namespace smp {
namespace ckpt {

/// Where one rank's part of a partial checkpoint lives.
struct PartName {
  int pp_rank = 0;
  int tp_rank = 0;
  /// Set for sharded-optimizer ("v3") files, one per rank.
  std::optional<int> rdp_rank;
};

/// "<f>_<pp>_<tp>[_<rdp>]<suffix>".
std::string partial_file_name(const std::string& f, const PartName& part,
                              const std::string& suffix = "");

/// "<f>.smp_manifest.json".
std::string manifest_file_name(const std::string& f);

/// "<name>.tmp-<save_id>": where a participant writes its file before the commit.
std::string temporary_file_name(const std::string& name, const std::string& save_id);

/// `f` with ".pt" removed when it ends in ".pt", else with ".pt" appended: the
/// other spelling smp v1 users give the same checkpoint.
std::string alternate_pt_name(const std::string& f);

/// The names smp.load(f, partial=True) tries for this rank, in order: for f
/// and then alternate_pt_name(f), `<f>_<pp>_<tp>_<rdp>`, `<f>_<pp>_<tp>_<rdp>.pt`,
/// `<f>_<pp>_<tp>`, `<f>_<pp>_<tp>.pt` (duplicates removed).
std::vector<std::string> partial_candidates(const std::string& f, int pp_rank, int tp_rank,
                                            int rdp_rank);

/// Files in the directory of `f` whose names start with the base name of
/// `f` followed by "_" or ".": what a missing-shard error lists. Sorted; at
/// most `limit` names (full paths).
std::vector<std::string> files_with_prefix(const std::string& f, std::size_t limit = 64);

/// True when `path` names an existing regular file (following links).
bool file_exists(const std::string& path);

}  // namespace ckpt
}  // namespace smp

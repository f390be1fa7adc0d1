#pragma once
/// Metadata (internal): the JSON schemas of a checkpoint's two records, the
/// tensor index (`<archive>/smp/index.json`, an Index) and the manifest of a
/// partial save (`<f>.smp_manifest.json`, a Manifest), written and parsed
/// here and nowhere else (nlohmann-json underneath).
///
/// Malformed text is a CorruptCheckpointError naming the file; a version newer
/// than this library reads is a CheckpointError saying to upgrade.

#include <string>

#include "smp/checkpoint/format.h"
#include "smp/checkpoint/manifest.h"

namespace smp {
namespace ckpt {
namespace internal {

/// The record name of the index inside the archive folder.
constexpr const char* kIndexRecord = "smp/index.json";

/// The index as JSON text (compact, keys in a fixed order).
std::string index_to_json(const Index& index);

/// Parses an index record of the file `path`. Checks the schema only (types,
/// keys, versions); `Index::tensors[i].storage_nbytes` is left 0 (the ZIP
/// record knows it). Throws CorruptCheckpointError "checkpoint file '<path>'
/// is damaged: its smp/index.json record is malformed (...)".
Index index_from_json(const std::string& text, const std::string& path);

/// Part identity: checks that the ranks the index `info` of part `path` records
/// (pp_rank, tp_rank, rdp_rank; each only when present, so files of earlier
/// versions pass) equal `pp`, `tp` and, when `rdp` >= 0, `rdp`. Throws
/// CorruptCheckpointError naming the file, both ranks and `context` (which
/// says who expected them: the manifest entry, this rank).
void check_part_identity(const Index& index, const std::string& path, int pp, int tp, int rdp,
                         const std::string& context);

/// Throws the CorruptCheckpointError of a malformed index of `path`.
[[noreturn]] void throw_bad_index(const std::string& path, const std::string& why);

}  // namespace internal
}  // namespace ckpt
}  // namespace smp

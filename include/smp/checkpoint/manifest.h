#pragma once
/// The manifest of a partial checkpoint, `<f>.smp_manifest.json`: the commit
/// record of one collective smp.save. The save's lowest participant writes it
/// (atomically) once every participant has written its file; from then on the
/// checkpoint is the one the manifest describes. See docs/file_format.md.
///
///   {"format": "smp.manifest", "format_version": 1, "smp_version": "0.1.0",
///    "save_id": "...", "partial": true, "v3": false, "suffix": "",
///    "world_size": 8, "pp_size": 2, "tp_size": 2, "rdp_size": 2,
///    "files": [{"name": "ckpt_0_0", "pp_rank": 0, "tp_rank": 0, "rdp_rank": null,
///               "world_rank": 0, "bytes": 12345, "smp_index": true}, ...]}
///
/// File names are relative to the manifest's directory.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace smp {
namespace ckpt {

/// Version of the manifest this library writes (and the newest it reads).
constexpr int kManifestVersion = 1;

struct ManifestFile {
  /// Base name, in the manifest's directory.
  std::string name;
  int pp_rank = 0;
  int tp_rank = 0;
  std::optional<int> rdp_rank;
  int world_rank = 0;
  std::uint64_t bytes = 0;
  /// False for files written with torch.save semantics (objects smp's format
  /// does not hold); those carry no index, so no save id to check.
  bool smp_index = true;
};

struct Manifest {
  int format_version = kManifestVersion;
  std::string smp_version;
  std::string save_id;
  bool v3 = false;
  std::string suffix;
  int world_size = 1;
  int pp_size = 1;
  int tp_size = 1;
  int rdp_size = 1;
  /// Written by the offline reshard (smp-checkpoint reshard): the parts hold
  /// the tensors by full name and shard spec, not each rank's local state
  /// dict, so every load reads them by name (resharding). JSON "by_name",
  /// present only when true.
  bool by_name = false;
  std::vector<ManifestFile> files;

  /// The entry of this rank's part; nullptr when the manifest has none.
  const ManifestFile* find(int pp_rank, int tp_rank, int rdp_rank) const;
  /// JSON text.
  std::string to_json() const;
  /// Parses JSON text; throws CorruptCheckpointError naming `path` when malformed,
  /// CheckpointError when its version is newer than this library reads.
  static Manifest from_json(const std::string& text, const std::string& path);
};

/// Writes the manifest atomically (temporary + fsync + rename + directory fsync).
void write_manifest(const std::string& path, const Manifest& manifest);
/// Reads a manifest; std::nullopt when `path` does not exist. Throws
/// CheckpointError (with the system's error text) when it exists but cannot be read.
std::optional<Manifest> read_manifest(const std::string& path);

}  // namespace ckpt
}  // namespace smp

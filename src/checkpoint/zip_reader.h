#pragma once
/// Zip reader (internal): ZipReader, which parses and checks the central
/// directory of a ZIP archive; the public Reader (smp/checkpoint/format.h) is
/// built on it.

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "checkpoint/io.h"

namespace smp {
namespace ckpt {
namespace internal {

/// Reads the central directory of a ZIP file.
class ZipReader {
 public:
  struct Entry {
    std::string name;
    std::uint64_t header_offset = 0;
    std::uint64_t data_offset = 0;
    std::uint64_t size = 0;
    /// Bytes the record occupies after its local header (size, or the
    /// compressed size of a compressed record).
    std::uint64_t stored_size = 0;
    std::uint32_t crc = 0;
    std::uint16_t method = 0;
  };

  /// Opens and parses `path`. Throws CheckpointError "... is not an smp or
  /// torch checkpoint: ..." for a file that is not a ZIP, and
  /// CorruptCheckpointError for a truncated or damaged one.
  explicit ZipReader(const std::string& path);

  const std::string& path() const { return file_.path(); }
  const File& file() const { return file_; }
  std::uint64_t file_size() const { return file_size_; }
  const std::vector<Entry>& entries() const { return entries_; }
  /// nullptr when there is no record of that name.
  const Entry* find(const std::string& name) const;
  /// Reads a whole (small) record and verifies its CRC-32.
  std::string read(const Entry& entry) const;

 private:
  void parse();

  File file_;
  std::uint64_t file_size_ = 0;
  std::vector<Entry> entries_;
  std::unordered_map<std::string, std::size_t> by_name_;
};

}  // namespace internal
}  // namespace ckpt
}  // namespace smp

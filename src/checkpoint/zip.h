#pragma once
/// ZIP container of checkpoint files (internal). Stored (uncompressed) records
/// only, laid out the way PyTorch's writer (miniz) lays them out, so that
/// torch.load, including its computed-offset fast path, reads them:
///   local header (flag bit 3: sizes follow in a data descriptor), an extra
///   field that pads the data to `alignment` ("FB" id, as PyTorch does),
///   the data, a data descriptor (none for empty records);
/// then a central directory, with ZIP64 records when an offset or size reaches
/// 0xFFFFFFFF or there are more than 65535 records.
///
/// All I/O goes through File (pread/pwrite on a descriptor); every failing
/// system call throws CheckpointError naming the file, the call and strerror.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace smp {
namespace ckpt {
namespace internal {

/// Throws CheckpointError "<what> '<path>': <call>: <strerror(errno)>" with a hint.
[[noreturn]] void throw_syscall(const std::string& path, const char* call, int err,
                                const std::string& hint = {});

/// An owned file descriptor with checked positional I/O. Movable, not copyable.
class File {
 public:
  File() = default;
  ~File();
  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  /// Opens an existing file for reading.
  static File open_read(const std::string& path);
  /// Creates a new file for writing (fails when it exists).
  static File create(const std::string& path);

  const std::string& path() const { return path_; }
  bool is_open() const { return fd_ >= 0; }
  std::uint64_t size() const;

  /// Reads exactly n bytes at offset; a short read (end of file) throws
  /// CorruptCheckpointError naming the file, the range and the file size.
  void pread_exact(void* dst, std::size_t n, std::uint64_t offset) const;
  void pwrite_all(const void* src, std::size_t n, std::uint64_t offset) const;
  /// Sets the file length (used to reserve the final size up front).
  void truncate(std::uint64_t size) const;
  void sync() const;
  /// Closes, checking close()'s result.
  void close();

 private:
  int fd_ = -1;
  std::string path_;
};

/// fsync of a directory, so that a rename inside it is durable.
void sync_directory(const std::string& dir);

/// CRC-32 (zlib) of a buffer of any size, continuing from `crc`.
std::uint32_t crc32_update(std::uint32_t crc, const void* data, std::size_t n);
/// CRC-32 of the concatenation A+B from crc(A), crc(B) and len(B).
std::uint32_t crc32_join(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t len_b);

/// Plans a ZIP file whose records are written later, in any order and in
/// parallel, at offsets known up front.
class ZipLayout {
 public:
  struct Entry {
    std::string name;
    std::uint64_t header_offset = 0;
    std::uint64_t data_offset = 0;
    std::uint64_t size = 0;
    std::uint32_t crc = 0;
    bool zip64 = false;
    bool size_field = false;  // carries the smp total-file-size extra field
    std::uint64_t end = 0;    // first byte after the record (and its descriptor)
  };

  /// alignment: power of two >= 1 the data of every record starts at.
  /// force_zip64: ZIP64 structures even for small files (tests).
  explicit ZipLayout(std::size_t alignment, bool force_zip64 = false);

  /// Appends a record of `size` bytes; returns its index. `size_field`: the
  /// local header carries the total file size (an extra field with id "sm"),
  /// which lets a reader tell a truncated file from a file that is not a ZIP.
  std::size_t add(const std::string& name, std::uint64_t size, bool size_field = false);
  void set_crc(std::size_t index, std::uint32_t crc) { entries_.at(index).crc = crc; }

  const Entry& entry(std::size_t index) const { return entries_.at(index); }
  std::size_t count() const { return entries_.size(); }
  /// Offset of the central directory: the end of the last record.
  std::uint64_t records_end() const { return cursor_; }
  /// The whole file size, central directory included.
  std::uint64_t total_size() const;

  /// Bytes of the local header (with its padding extra field) of a record,
  /// to be written at entry.header_offset.
  std::string local_header(std::size_t index) const;
  /// Bytes of the data descriptor, to be written at data_offset + size; empty
  /// for empty records. Needs the record's CRC.
  std::string data_descriptor(std::size_t index) const;
  /// Central directory and end records, to be written at records_end().
  std::string central_directory() const;

 private:
  std::size_t alignment_;
  bool force_zip64_;
  std::uint64_t cursor_ = 0;
  std::vector<Entry> entries_;
};

/// Reads the central directory of a ZIP file.
class ZipReader {
 public:
  struct Entry {
    std::string name;
    std::uint64_t header_offset = 0;
    std::uint64_t data_offset = 0;
    std::uint64_t size = 0;
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

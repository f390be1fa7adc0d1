#pragma once
/// Zip writer (internal): ZipLayout, which plans a torch.save-compatible ZIP
/// archive whose records are then written in any order and in parallel; the
/// public write_file (smp/checkpoint/format.h) is built on it.
///
/// Stored (uncompressed) records only, laid out the way PyTorch's writer
/// (miniz) lays them out, so that torch.load, including its computed-offset
/// fast path, reads them: local header (flag bit 3: sizes follow in a data
/// descriptor), an extra field that pads the data to `alignment` ("FB" id, as
/// PyTorch does), the data, a data descriptor (none for empty records); then a
/// central directory, with ZIP64 records when an offset or size reaches
/// 0xFFFFFFFF or there are more than 65535 records.
///
/// Why not libtorch's caffe2::serialize::PyTorchStreamWriter: it appends
/// records one after another through a single writer callback, so a record's
/// offset is known only once every earlier record is written, and tensor bytes
/// go through one thread. smp computes every offset up front (ZipLayout), then
/// writes all tensors' chunks with parallel pwrite and CRC-32s them in the same
/// pass, and writes the index (which needs those offsets and CRCs) last.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace smp {
namespace ckpt {
namespace internal {

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

}  // namespace internal
}  // namespace ckpt
}  // namespace smp

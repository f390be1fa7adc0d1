// Zip reader: parses a ZIP archive's central directory (ZipReader) and reads
// smp and torch.save checkpoints through it (Reader): the index, the restricted
// unpickling of data.pkl, and parallel CRC-checked reads of tensor records.
#include "checkpoint/zip_reader.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <functional>
#include <mutex>

#include "checkpoint/host_buffers.h"
#include "checkpoint/metadata.h"
#include "checkpoint/pickle_reader.h"
#include "checkpoint/pickle_writer.h"
#include "checkpoint/zip_records.h"
#include "smp/checkpoint/format.h"
#include "smp/core/error.h"

namespace smp {
namespace ckpt {
namespace internal {

// ---- ZipReader ------------------------------------------------------------

namespace {

[[noreturn]] void not_a_checkpoint(const std::string& path, const std::string& why) {
  SMP_THROW(CheckpointError, "'", path, "' is not an smp or torch checkpoint: ", why,
            "; pass a file written by smp.save, smp::ckpt::write_file or torch.save");
}

[[noreturn]] void corrupt(const std::string& path, const std::string& why) {
  SMP_THROW(CorruptCheckpointError, "checkpoint file '", path, "' is damaged: ", why,
            "; restore it from a good copy or write the checkpoint again");
}

}  // namespace

ZipReader::ZipReader(const std::string& path) : file_(File::open_read(path)) {
  file_size_ = file_.size();
  parse();
}

void ZipReader::parse() {
  const std::string& path = file_.path();
  // smp files announce their total size in the first local header: a
  // truncated file is told apart from a file that is not a ZIP at all.
  std::optional<std::uint64_t> expected_size;
  bool starts_like_zip = false;
  if (file_size_ >= kLocalHeaderSize) {
    unsigned char h[kLocalHeaderSize];
    file_.pread_exact(h, sizeof(h), 0);
    starts_like_zip = get32(h) == kLocalHeaderSig;
    if (starts_like_zip) {
      const std::uint16_t nlen = get16(h + 26), elen = get16(h + 28);
      if (kLocalHeaderSize + nlen + elen <= file_size_ && elen > 0) {
        std::string extra(elen, '\0');
        file_.pread_exact(&extra[0], elen, kLocalHeaderSize + nlen);
        const auto* p = reinterpret_cast<const unsigned char*>(extra.data());
        for (std::size_t i = 0; i + 4 <= extra.size();) {
          const std::uint16_t id = get16(p + i), len = get16(p + i + 2);
          if (i + 4 + len > extra.size()) break;
          if (id == kSizeExtraId && len == 8) expected_size = get64(p + i + 4);
          i += 4 + len;
        }
      }
    }
  }
  if (expected_size && *expected_size != file_size_) {
    SMP_THROW(CorruptCheckpointError, "checkpoint file '", path, "' is ",
              file_size_ < *expected_size ? "truncated" : "longer than written", ": expected ",
              *expected_size, " bytes, found ", file_size_,
              " bytes; the file was cut short or modified (an interrupted copy?); restore it "
              "from a good copy or write the checkpoint again");
  }

  if (file_size_ < kEndSize) {
    if (starts_like_zip || (file_size_ >= 2 && file_size_ < kLocalHeaderSize)) {
      std::string head(std::min<std::uint64_t>(file_size_, 4), '\0');
      if (!head.empty()) file_.pread_exact(&head[0], head.size(), 0);
      if (head.rfind("PK", 0) == 0) corrupt(path, "the file is truncated (" +
                                                std::to_string(file_size_) + " bytes)");
    }
    not_a_checkpoint(path, "the file is too small to be a ZIP archive (" +
                               std::to_string(file_size_) + " bytes)");
  }
  const std::uint64_t tail_len = std::min<std::uint64_t>(file_size_, kEndSize + 0xFFFF);
  std::string tail(static_cast<std::size_t>(tail_len), '\0');
  file_.pread_exact(&tail[0], tail.size(), file_size_ - tail_len);
  const auto* t = reinterpret_cast<const unsigned char*>(tail.data());
  std::int64_t found = -1;
  for (std::int64_t i = static_cast<std::int64_t>(tail.size() - kEndSize); i >= 0; --i) {
    if (get32(t + i) == kEndSig &&
        static_cast<std::uint64_t>(i) + kEndSize + get16(t + i + 20) == tail.size()) {
      found = i;
      break;
    }
  }
  if (found < 0) {
    if (starts_like_zip) {
      corrupt(path, "it has no ZIP end-of-central-directory record (" +
                        std::to_string(file_size_) +
                        " bytes); the file is truncated or its write did not finish");
    }
    not_a_checkpoint(path, "it is not a ZIP archive (no end-of-central-directory record)");
  }
  const std::uint64_t end_pos = file_size_ - tail_len + static_cast<std::uint64_t>(found);
  const unsigned char* e = t + found;
  std::uint64_t count = get16(e + 10);
  std::uint64_t cd_size = get32(e + 12);
  std::uint64_t cd_offset = get32(e + 16);
  std::uint64_t cd_limit = end_pos;
  if (end_pos >= kEnd64LocatorSize) {
    unsigned char loc[kEnd64LocatorSize];
    file_.pread_exact(loc, sizeof(loc), end_pos - kEnd64LocatorSize);
    if (get32(loc) == kEnd64LocatorSig) {
      const std::uint64_t end64 = get64(loc + 8);
      if (end64 + kEnd64Size > end_pos) corrupt(path, "bad ZIP64 end-of-central-directory locator");
      unsigned char r[kEnd64Size];
      file_.pread_exact(r, sizeof(r), end64);
      if (get32(r) != kEnd64Sig) corrupt(path, "bad ZIP64 end-of-central-directory record");
      count = get64(r + 32);
      cd_size = get64(r + 40);
      cd_offset = get64(r + 48);
      cd_limit = end64;
    }
  }
  if (cd_offset > cd_limit || cd_size > cd_limit - cd_offset) {
    corrupt(path, "the central directory (offset " + std::to_string(cd_offset) + ", " +
                      std::to_string(cd_size) + " bytes) lies outside the file");
  }
  std::string cd(static_cast<std::size_t>(cd_size), '\0');
  if (cd_size) file_.pread_exact(&cd[0], cd.size(), cd_offset);
  const auto* c = reinterpret_cast<const unsigned char*>(cd.data());
  std::size_t pos = 0;
  entries_.reserve(static_cast<std::size_t>(std::min<std::uint64_t>(count, 1u << 20)));
  for (std::uint64_t i = 0; i < count; ++i) {
    if (pos + kCentralHeaderSize > cd.size() || get32(c + pos) != kCentralSig) {
      corrupt(path, "central directory entry " + std::to_string(i) + " is malformed");
    }
    const unsigned char* h = c + pos;
    Entry entry;
    entry.method = get16(h + 10);
    entry.crc = get32(h + 16);
    std::uint64_t csize = get32(h + 20);
    std::uint64_t usize = get32(h + 24);
    const std::uint16_t nlen = get16(h + 28), elen = get16(h + 30), clen = get16(h + 32);
    std::uint64_t header = get32(h + 42);
    if (pos + kCentralHeaderSize + nlen + elen + clen > cd.size()) {
      corrupt(path, "central directory entry " + std::to_string(i) + " is malformed");
    }
    entry.name.assign(reinterpret_cast<const char*>(h + kCentralHeaderSize), nlen);
    const unsigned char* x = h + kCentralHeaderSize + nlen;
    for (std::size_t j = 0; j + 4 <= elen;) {
      const std::uint16_t id = get16(x + j), len = get16(x + j + 2);
      if (j + 4 + len > elen) break;
      if (id == kZip64ExtraId) {
        std::size_t k = j + 4;
        if (usize == kMax32 && k + 8 <= j + 4 + len) usize = get64(x + k), k += 8;
        if (csize == kMax32 && k + 8 <= j + 4 + len) csize = get64(x + k), k += 8;
        if (header == kMax32 && k + 8 <= j + 4 + len) header = get64(x + k), k += 8;
      }
      j += 4 + len;
    }
    pos += kCentralHeaderSize + nlen + elen + clen;
    if (entry.method == 0 && csize != usize) {
      corrupt(path, "record '" + entry.name + "' is stored with different sizes");
    }
    entry.size = usize;
    entry.header_offset = header;
    unsigned char lh[kLocalHeaderSize];
    if (header > file_size_ || file_size_ - header < kLocalHeaderSize) {
      corrupt(path, "record '" + entry.name + "' starts past the end of the file");
    }
    file_.pread_exact(lh, sizeof(lh), header);
    if (get32(lh) != kLocalHeaderSig) {
      corrupt(path, "record '" + entry.name + "' has no local header at offset " +
                        std::to_string(header));
    }
    entry.data_offset = header + kLocalHeaderSize + get16(lh + 26) + get16(lh + 28);
    const std::uint64_t stored = entry.method == 0 ? usize : csize;
    entry.stored_size = stored;
    if (entry.data_offset > file_size_ || file_size_ - entry.data_offset < stored) {
      SMP_THROW(CorruptCheckpointError, "checkpoint file '", path, "' is truncated: record '",
                entry.name, "' needs bytes up to offset ", entry.data_offset + stored,
                " but the file has ", file_size_,
                " bytes; restore it from a good copy or write the checkpoint again");
    }
    if (!by_name_.emplace(entry.name, entries_.size()).second) {
      corrupt(path, "two central directory entries are named '" + entry.name + "'");
    }
    entries_.push_back(std::move(entry));
  }
  // Every byte of the file belongs to at most one record: entries that share
  // or overlap a record would let a small file stand for many big ones.
  std::vector<const Entry*> by_offset;
  by_offset.reserve(entries_.size());
  for (const Entry& e : entries_) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const Entry* a, const Entry* b) {
    return a->header_offset < b->header_offset;
  });
  for (std::size_t i = 1; i < by_offset.size(); ++i) {
    const Entry& a = *by_offset[i - 1];
    const Entry& b = *by_offset[i];
    if (b.header_offset < a.data_offset + a.stored_size) {
      corrupt(path, "records '" + a.name + "' and '" + b.name +
                        "' overlap (their directory entries point into the same bytes)");
    }
  }
}

const ZipReader::Entry* ZipReader::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &entries_[it->second];
}

std::string ZipReader::read(const Entry& entry) const {
  if (entry.method != 0) {
    SMP_THROW(CheckpointError, "checkpoint file '", file_.path(), "': record '", entry.name,
              "' is compressed (ZIP method ", entry.method,
              "); checkpoints must store records uncompressed, as torch.save does");
  }
  std::string data(static_cast<std::size_t>(entry.size), '\0');
  if (entry.size) file_.pread_exact(&data[0], data.size(), entry.data_offset);
  const std::uint32_t crc = crc32_update(0, data.data(), data.size());
  if (crc != entry.crc) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "stored CRC-32 0x%08x, computed 0x%08x", entry.crc, crc);
    SMP_THROW(CorruptCheckpointError, "checkpoint file '", file_.path(), "' is damaged: record '",
              entry.name, "' fails its CRC-32 check (", buf,
              "); restore it from a good copy or write the checkpoint again");
  }
  return data;
}

}  // namespace internal

using internal::File;
using internal::kIndexRecord;
using internal::kIoChunk;
using internal::parallel_for;
using internal::ZipReader;

namespace {

constexpr std::size_t kChunk = kIoChunk;

double since(std::chrono::steady_clock::time_point t0) { return internal::seconds_since(t0); }

std::size_t chunk_length(std::uint64_t n, std::uint64_t begin) {
  return static_cast<std::size_t>(std::min<std::uint64_t>(kChunk, n - begin));
}

/// Thread-nanoseconds spent by the reading threads in each step of a chunk.
struct ChunkTimes {
  std::atomic<std::int64_t> wait_ns{0};   // for a free staging slot
  std::atomic<std::int64_t> pread_ns{0};  // in pread
  std::atomic<std::int64_t> crc_ns{0};    // computing CRC-32s
  std::atomic<std::int64_t> copy_ns{0};   // host -> device copies
};

std::string crc_hex(std::uint32_t crc) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", crc);
  return buf;
}

}  // namespace

// ---- reading --------------------------------------------------------------

struct Reader::Impl {
  explicit Impl(const std::string& p) : path(p), zip(p) {
    // The archive folder: records sit under one top folder, data.pkl in it.
    for (const auto& e : zip.entries()) {
      const std::size_t slash = e.name.find('/');
      if (slash != std::string::npos && e.name.compare(slash + 1, std::string::npos, "data.pkl") == 0) {
        prefix = e.name.substr(0, slash + 1);
        pkl = &e;
        break;
      }
    }
    if (pkl == nullptr) {
      std::string names;
      for (std::size_t i = 0; i < zip.entries().size() && i < 5; ++i) {
        names += (i ? ", '" : "'") + zip.entries()[i].name + "'";
      }
      SMP_THROW(CheckpointError, "'", path, "' is not an smp or torch checkpoint: the ZIP archive ",
                "has no '<folder>/data.pkl' record (it has ", zip.entries().size(), " records",
                names.empty() ? "" : ": ", names, zip.entries().size() > 5 ? ", ..." : "",
                "); pass a file written by smp.save, smp::ckpt::write_file or torch.save");
    }
    if (const auto* bo = zip.find(prefix + "byteorder")) {
      const std::string order = zip.read(*bo);
      SMP_CHECK(order == "little", CheckpointError, "checkpoint file '", path,
                "' was written on a big-endian machine (byteorder '", order,
                "'); smp reads little-endian checkpoints only; re-save it on a little-endian host");
    }
    if (const auto* ix = zip.find(prefix + kIndexRecord)) {
      parse_index(zip.read(*ix));
      has_index = true;
    }
  }

  [[noreturn]] void bad_index(const std::string& why) const { internal::throw_bad_index(path, why); }

  void parse_index(const std::string& text) {
    index = internal::index_from_json(text, path);
    for (TensorEntry& e : index.tensors) {
        // The index must agree with the ZIP structure.
        const auto* rec = zip.find(prefix + "data/" + e.key);
        if (rec == nullptr) bad_index("tensor '" + internal::join_path(e.path) + "' names record data/" + e.key + ", which is missing");
        std::int64_t numel = 1;
        for (auto d : e.shape) numel *= d;
        const std::uint64_t es = c10::elementSize(e.dtype);
        if (rec->data_offset != e.offset || rec->crc != e.crc32 ||
            static_cast<std::uint64_t>(numel) * es != e.nbytes ||
            e.nbytes + static_cast<std::uint64_t>(e.storage_offset) * es > rec->size) {
          bad_index("the entry of tensor '" + internal::join_path(e.path) +
                    "' does not match record data/" + e.key);
        }
        e.storage_nbytes = rec->size;
    }
  }

  internal::Unpickled unpickle() const {
    return internal::unpickle(zip.read(*pkl), path);
  }

  /// Index derived from data.pkl for files without smp's record.
  void derive_index() const {
    const internal::Unpickled u = unpickle();
    internal::for_each_tensor(u, path, [&](const std::vector<std::string>& p,
                                           const internal::UnpickledTensor& t) {
      const auto& s = u.storages.at(t.storage);
      const auto* rec = record(s);
      TensorEntry e;
      e.path = p;
      e.key = s.key;
      e.dtype = s.dtype;
      e.shape = t.size;
      e.stride = t.stride;
      e.storage_offset = t.storage_offset;
      e.offset = rec->data_offset;
      std::int64_t numel = 1;
      for (auto d : t.size) numel *= d;
      e.nbytes = static_cast<std::uint64_t>(numel) * c10::elementSize(s.dtype);
      e.storage_nbytes = rec->size;
      e.crc32 = rec->crc;
      derived.tensors.push_back(std::move(e));
    });
  }

  const ZipReader::Entry* record(const internal::UnpickledStorage& s) const {
    const auto* rec = zip.find(prefix + "data/" + s.key);
    SMP_CHECK(rec != nullptr, CorruptCheckpointError, "checkpoint file '", path,
              "' is damaged: data.pkl references storage '", s.key, "' but the record '", prefix,
              "data/", s.key, "' is missing; restore it from a good copy");
    std::uint64_t want = 0;
    SMP_CHECK(!__builtin_mul_overflow(s.numel, static_cast<std::uint64_t>(c10::elementSize(s.dtype)),
                                      &want),
              CorruptCheckpointError, "checkpoint file '", path,
              "' is damaged: storage '", s.key, "' declares ", s.numel,
              " elements, more bytes than 64 bits count; restore it from a good copy");
    SMP_CHECK(rec->method == 0, CheckpointError, "checkpoint file '", path, "': record '",
              rec->name, "' is compressed; checkpoints must store tensor data uncompressed");
    SMP_CHECK(rec->size == want, CorruptCheckpointError, "checkpoint file '", path,
              "' is damaged: record '", rec->name, "' has ", rec->size, " bytes but storage '",
              s.key, "' needs ", want, "; restore it from a good copy");
    return rec;
  }

  /// Reads bytes [begin, begin + len) of `rec` and returns their CRC-32 (0
  /// when `crc` is false). Into `dst + begin` on the host; with `pool`, into
  /// a staging slot that is checked there and copied into `device_bytes` (a
  /// uint8 device tensor) at the same offset. `times`, when given, adds the
  /// thread-seconds spent in each step.
  std::uint32_t read_chunk(const ZipReader::Entry& rec, std::uint64_t begin, std::size_t len,
                           void* dst, bool crc, const at::Tensor& device_bytes,
                           internal::SlotPool* pool, ChunkTimes* times) const {
    std::uint32_t out = 0;
    auto t = std::chrono::steady_clock::now();
    auto lap = [&](std::atomic<std::int64_t> ChunkTimes::*field) {
      const auto now = std::chrono::steady_clock::now();
      if (times != nullptr) {
        (times->*field) += std::chrono::duration_cast<std::chrono::nanoseconds>(now - t).count();
      }
      t = now;
    };
    if (pool == nullptr) {
      char* p = static_cast<char*>(dst) + begin;
      zip.file().pread_exact(p, len, rec.data_offset + begin);
      lap(&ChunkTimes::pread_ns);
      if (crc) out = internal::crc32_update(0, p, len);
      lap(&ChunkTimes::crc_ns);
      return out;
    }
    const std::size_t slot = pool->acquire();
    lap(&ChunkTimes::wait_ns);
    try {
      char* p = pool->data(slot);
      zip.file().pread_exact(p, len, rec.data_offset + begin);
      lap(&ChunkTimes::pread_ns);
      if (crc) out = internal::crc32_update(0, p, len);
      lap(&ChunkTimes::crc_ns);
      device_bytes.narrow(0, static_cast<std::int64_t>(begin), static_cast<std::int64_t>(len))
          .copy_(pool->tensor(slot, len));
      lap(&ChunkTimes::copy_ns);
    } catch (...) {
      pool->release(slot);
      throw;
    }
    pool->release(slot);
    return out;
  }

  /// Reads a whole record into dst in parallel chunks; returns its CRC-32.
  std::uint32_t read_record(const ZipReader::Entry& rec, void* dst, int threads, bool crc) const {
    const std::uint64_t n = rec.size;
    const std::size_t chunks = static_cast<std::size_t>((n + kChunk - 1) / kChunk);
    std::vector<std::uint32_t> crcs(chunks, 0);
    parallel_for(chunks, threads, [&](std::size_t k) {
      const std::uint64_t begin = k * kChunk;
      crcs[k] = read_chunk(rec, begin, chunk_length(n, begin), dst, crc, {}, nullptr, nullptr);
    });
    std::uint32_t total = 0;
    for (std::size_t k = 0; k < chunks; ++k) {
      total = k == 0 ? crcs[k] : internal::crc32_join(total, crcs[k], chunk_length(n, k * kChunk));
    }
    return total;
  }

  [[noreturn]] void crc_mismatch(const ZipReader::Entry& rec, const std::string& key,
                                 const std::string& tensor_path, std::uint32_t got) const {
    SMP_THROW(CorruptCheckpointError, "checkpoint file '", path, "' is damaged: the data of tensor '",
              tensor_path, "' (storage key '", key, "', record '", rec.name,
              "') fails its CRC-32 check (stored ", crc_hex(rec.crc), ", computed ", crc_hex(got),
              "); restore the file from a good copy or write the checkpoint again");
  }

  std::string path;
  ZipReader zip;
  std::string prefix;
  const ZipReader::Entry* pkl = nullptr;
  bool has_index = false;
  Index index;
  mutable std::once_flag derived_once;
  mutable Index derived;
};

Reader::Reader(const std::string& path) {
  // A pre-1.6 torch.save file is a bare pickle, not a ZIP archive.
  {
    File f = File::open_read(path);
    if (f.size() >= 2) {
      unsigned char head[2];
      f.pread_exact(head, 2, 0);
      if (head[0] == 0x80 && head[1] <= 5) {
        SMP_THROW(CheckpointError, "'", path, "' is not an smp or torch checkpoint in the zip "
                  "format: it is a legacy (pre-1.6) torch.save pickle; load it with torch.load "
                  "and save it again with torch.save or smp.save");
      }
    }
  }
  impl_ = std::make_unique<Impl>(path);
}

Reader::~Reader() = default;
Reader::Reader(Reader&&) noexcept = default;
Reader& Reader::operator=(Reader&&) noexcept = default;

const std::string& Reader::path() const { return impl_->path; }
bool Reader::has_index() const { return impl_->has_index; }

const Index& Reader::index() const {
  if (impl_->has_index) return impl_->index;
  std::call_once(impl_->derived_once, [this] { impl_->derive_index(); });
  return impl_->derived;
}

std::vector<std::string> Reader::verify_records(
    const std::function<void(std::uint64_t, std::uint64_t)>& on_bytes) const {
  const Impl& im = *impl_;
  std::map<std::string, std::string> tensor_of;  // record name -> first tensor path
  if (im.has_index) {
    for (const TensorEntry& e : im.index.tensors) {
      tensor_of.emplace(im.prefix + "data/" + e.key, internal::join_path(e.path));
    }
  }
  std::uint64_t total = 0, done = 0;
  for (const auto& e : im.zip.entries()) total += e.size;
  std::vector<char> buf(static_cast<std::size_t>(std::min<std::uint64_t>(kChunk, total + 1)));
  std::vector<std::string> problems;
  for (const auto& e : im.zip.entries()) {
    std::uint32_t crc = 0;
    for (std::uint64_t off = 0; off < e.size; off += buf.size()) {
      const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), e.size - off));
      im.zip.file().pread_exact(buf.data(), n, e.data_offset + off);
      crc = internal::crc32_update(crc, buf.data(), n);
      done += n;
      if (on_bytes) on_bytes(done, total);
    }
    if (crc != e.crc) {
      char hex[64];
      std::snprintf(hex, sizeof(hex), "stored CRC-32 %08x, computed %08x", e.crc, crc);
      auto t = tensor_of.find(e.name);
      problems.push_back(detail::str(
          "'", im.path, "': record '", e.name, "'",
          t != tensor_of.end() ? detail::str(" (data of tensor '", t->second, "')") : std::string(),
          " is damaged: ", hex));
    }
  }
  return problems;
}

Value Reader::read_object(const ReadOptions& options, ReadStats* stats) const {
  const Impl& im = *impl_;
  auto t0 = std::chrono::steady_clock::now();
  const internal::Unpickled u = im.unpickle();
  if (stats != nullptr) stats->unpickle_seconds = since(t0);

  // The first path that uses each storage, for error messages.
  std::vector<std::string> storage_path(u.storages.size());
  std::vector<std::vector<std::string>> leaf_paths;
  internal::for_each_tensor(u, im.path, [&](const std::vector<std::string>& p,
                                            const internal::UnpickledTensor& t) {
    if (storage_path[t.storage].empty()) storage_path[t.storage] = internal::join_path(p);
    leaf_paths.push_back(p);
  });

  t0 = std::chrono::steady_clock::now();
  const IoDefaults defaults = io_defaults();
  const int threads = options.threads > 0 ? options.threads : defaults.threads;
  // A device destination: chunks go through the pinned staging pool and are
  // copied straight into the device storages.
  const bool to_device = !options.device.is_cpu();
  std::unique_lock<std::mutex> pool_lock;
  internal::SlotPool* pool =
      to_device ? &internal::staging_pool(defaults.pool_bytes, &pool_lock) : nullptr;
  std::vector<at::Tensor> storages(u.storages.size());
  std::vector<const ZipReader::Entry*> records(u.storages.size());
  for (std::size_t i = 0; i < u.storages.size(); ++i) {
    records[i] = im.record(u.storages[i]);
    storages[i] = at::empty({static_cast<std::int64_t>(u.storages[i].numel)},
                            at::TensorOptions().dtype(u.storages[i].dtype).device(options.device));
    if (!to_device) internal::advise_huge_pages(storages[i].data_ptr(), records[i]->size);
  }
  // Every chunk of every record is one task for the same threads: no barrier
  // between records, and small records fill the gaps of large ones. The
  // per-chunk CRC-32s are joined per record afterwards.
  struct Task {
    std::size_t storage;
    std::uint64_t begin;
    std::size_t length;
  };
  std::vector<Task> tasks;
  std::vector<std::size_t> first_task(records.size() + 1, 0);
  for (std::size_t i = 0; i < records.size(); ++i) {
    first_task[i] = tasks.size();
    for (std::uint64_t b = 0; b < records[i]->size; b += kChunk) {
      tasks.push_back({i, b, chunk_length(records[i]->size, b)});
    }
  }
  first_task[records.size()] = tasks.size();
  std::vector<at::Tensor> device_bytes(records.size());
  if (to_device) {
    for (std::size_t i = 0; i < records.size(); ++i) {
      if (records[i]->size > 0) device_bytes[i] = storages[i].view({-1}).view(at::kByte);
    }
  }
  std::vector<std::uint32_t> chunk_crc(tasks.size(), 0);
  ChunkTimes times;
  parallel_for(tasks.size(), threads, [&](std::size_t k) {
    const Task& t = tasks[k];
    chunk_crc[k] = im.read_chunk(*records[t.storage], t.begin, t.length,
                                 to_device ? nullptr : storages[t.storage].data_ptr(),
                                 options.verify_checksums, device_bytes[t.storage],
                                 to_device ? pool : nullptr, &times);
  });
  if (options.verify_checksums) {
    for (std::size_t i = 0; i < records.size(); ++i) {
      std::uint32_t crc = 0;
      for (std::size_t k = first_task[i]; k < first_task[i + 1]; ++k) {
        crc = k == first_task[i] ? chunk_crc[k]
                                 : internal::crc32_join(crc, chunk_crc[k], tasks[k].length);
      }
      if (crc != records[i]->crc) {
        im.crc_mismatch(*records[i], u.storages[i].key, storage_path[i], crc);
      }
    }
  }
  if (stats != nullptr) {
    stats->read_seconds = since(t0);
    for (const auto* r : records) stats->tensor_bytes += r->size;
    stats->profile["threads"] = static_cast<double>(std::min<std::size_t>(
        tasks.size(), static_cast<std::size_t>(std::max(threads, 1))));
    stats->profile["pread"] = times.pread_ns.load() * 1e-9;
    stats->profile["crc32"] = times.crc_ns.load() * 1e-9;
    if (to_device) {
      stats->profile["h2d_copy"] = times.copy_ns.load() * 1e-9;
      stats->profile["slot_wait"] = times.wait_ns.load() * 1e-9;
    }
  }

  t0 = std::chrono::steady_clock::now();
  Value out = internal::to_value(u, storages, im.path);

  // Attach shard specs from the index: leaves come in the same depth-first order.
  if (im.has_index && im.index.tensors.size() == leaf_paths.size()) {
    std::size_t k = 0;
    std::function<void(Value&)> attach = [&](Value& v) {
      switch (v.kind()) {
        case Value::Kind::kTensor: {
          const TensorEntry& e = im.index.tensors[k];
          if (e.shard && e.path == leaf_paths[k]) v.set_shard(e.shard);
          ++k;
          break;
        }
        case Value::Kind::kList:
        case Value::Kind::kTuple:
          for (auto& x : v.items()) attach(x);
          break;
        case Value::Kind::kDict:
          for (auto& kv : v.pairs()) attach(kv.second);
          if (!v.attributes().is_none()) {
            Value attrs = v.attributes();
            attach(attrs);
            v.set_attributes(std::move(attrs));
          }
          break;
        default: break;
      }
    };
    attach(out);
  }
  if (stats != nullptr) stats->build_seconds = since(t0);
  return out;
}

void Reader::read_tensor_bytes(const TensorEntry& entry, std::uint64_t offset,
                               std::uint64_t length, void* dst) const {
  SMP_CHECK(entry.contiguous(), CheckpointError, "checkpoint file '", impl_->path,
            "': tensor '", internal::join_path(entry.path),
            "' is not stored contiguously (a strided view in a torch.save file); read it whole "
            "with read_tensor");
  SMP_CHECK(offset <= entry.nbytes && length <= entry.nbytes - offset, CheckpointError,
            "checkpoint file '", impl_->path, "': byte range [", offset, ", ", offset + length,
            ") is outside tensor '", internal::join_path(entry.path), "' (", entry.nbytes,
            " bytes)");
  if (length == 0) return;
  const std::uint64_t start = entry.offset +
                              static_cast<std::uint64_t>(entry.storage_offset) *
                                  c10::elementSize(entry.dtype) + offset;
  impl_->zip.file().pread_exact(dst, static_cast<std::size_t>(length), start);
}

at::Tensor Reader::read_tensor(const TensorEntry& entry, const ReadOptions& options) const {
  const Impl& im = *impl_;
  const ZipReader::Entry* rec = im.zip.find(im.prefix + "data/" + entry.key);
  SMP_CHECK(rec != nullptr, CorruptCheckpointError, "checkpoint file '", im.path,
            "' is damaged: tensor '", internal::join_path(entry.path), "' is in record '",
            im.prefix, "data/", entry.key, "', which is missing; restore it from a good copy");
  const std::uint64_t es = c10::elementSize(entry.dtype);
  SMP_CHECK(rec->size % es == 0 && rec->method == 0, CorruptCheckpointError,
            "checkpoint file '", im.path, "' is damaged: record '", rec->name,
            "' does not hold whole ", dtype_name(entry.dtype), " elements");
  at::Tensor storage = at::empty({static_cast<std::int64_t>(rec->size / es)},
                                 at::TensorOptions().dtype(entry.dtype));
  const std::uint32_t crc =
      im.read_record(*rec, storage.data_ptr(),
                     options.threads > 0 ? options.threads : io_defaults().threads,
                     options.verify_checksums);
  if (options.verify_checksums && crc != rec->crc) {
    im.crc_mismatch(*rec, entry.key, internal::join_path(entry.path), crc);
  }
  // The view must stay inside the record (the index is data from the file).
  std::int64_t numel = 1, last = entry.storage_offset;
  bool ok = entry.shape.size() == entry.stride.size() && entry.storage_offset >= 0;
  for (std::size_t i = 0; ok && i < entry.shape.size(); ++i) {
    ok = entry.shape[i] >= 0 && entry.stride[i] >= 0;
    numel *= entry.shape[i];
    if (entry.shape[i] > 0) last += (entry.shape[i] - 1) * entry.stride[i];
  }
  SMP_CHECK(ok && (numel == 0 || last < storage.numel()), CorruptCheckpointError,
            "checkpoint file '", im.path, "' is damaged: tensor '",
            internal::join_path(entry.path), "' reaches outside its record '", rec->name, "'");
  at::Tensor out = storage.as_strided(entry.shape, entry.stride, entry.storage_offset);
  if (entry.nbytes != rec->size) out = out.clone();
  return out;
}

}  // namespace ckpt
}  // namespace smp

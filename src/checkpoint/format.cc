#include "smp/checkpoint/format.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <exception>
#include <mutex>
#include <random>
#include <thread>

#include "checkpoint/pickle_reader.h"
#include "checkpoint/pickle_writer.h"
#include "checkpoint/zip.h"
#include "checkpoint/metadata.h"
#include "smp/config.h"
#include "smp/core/error.h"

namespace smp {
namespace ckpt {

using internal::File;
using internal::ZipLayout;
using internal::ZipReader;

namespace {

constexpr std::size_t kChunk = std::size_t{16} << 20;  // unit of parallel I/O and CRC
using internal::kIndexRecord;

double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string crc_hex(std::uint32_t crc) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", crc);
  return buf;
}

/// Runs fn(0..n-1) on up to `threads` threads; rethrows the first failure
/// (remaining tasks are skipped once one failed).
void parallel_for(std::size_t n, int threads, const std::function<void(std::size_t)>& fn) {
  const std::size_t workers = std::min<std::size_t>(n, static_cast<std::size_t>(std::max(threads, 1)));
  if (workers <= 1) {
    for (std::size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex mu;
  auto body = [&] {
    while (!failed.load()) {
      const std::size_t i = next.fetch_add(1);
      if (i >= n) return;
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) error = std::current_exception();
        failed = true;
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (std::size_t i = 0; i + 1 < workers; ++i) pool.emplace_back(body);
  body();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

std::string archive_name(const std::string& path) {
  std::string base = path.substr(path.find_last_of('/') == std::string::npos
                                     ? 0
                                     : path.find_last_of('/') + 1);
  // os.path.splitext: a leading dot does not start an extension.
  const std::size_t dot = base.find_last_of('.');
  if (dot != std::string::npos && dot > 0 && base.find_first_not_of('.') < dot) {
    base = base.substr(0, dot);
  }
  return base.empty() ? "archive" : base;
}

std::string parent_dir(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string serialization_id() {
  std::random_device rd;
  std::mt19937_64 gen((static_cast<std::uint64_t>(rd()) << 32) ^ rd() ^
                      static_cast<std::uint64_t>(::getpid()));
  std::string id;
  for (int i = 0; i < 40; ++i) id += static_cast<char>('0' + gen() % 10);
  return id;
}

std::vector<std::int64_t> contiguous_strides(const std::vector<std::int64_t>& shape) {
  std::vector<std::int64_t> s(shape.size());
  std::int64_t acc = 1;
  for (std::size_t i = shape.size(); i-- > 0;) {
    s[i] = acc;
    acc *= std::max<std::int64_t>(shape[i], 1);
  }
  return s;
}

/// Host, contiguous, conj/neg resolved: the exact bytes of a storage record.
at::Tensor host_bytes(const at::Tensor& t) {
  at::Tensor h = t.detach();
  if (!h.device().is_cpu()) h = h.to(at::kCPU);
  h = h.resolve_conj().resolve_neg();
  return h.contiguous();
}

}  // namespace

bool TensorEntry::contiguous() const {
  std::int64_t expected = 1;
  for (std::size_t i = shape.size(); i-- > 0;) {
    if (shape[i] != 1 && stride[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

const TensorEntry* Index::find(const std::vector<std::string>& path) const {
  for (const auto& e : tensors) {
    if (e.path == path) return &e;
  }
  return nullptr;
}

// ---- writing --------------------------------------------------------------

WriteStats write_file(const std::string& path, const Value& object, const WriteOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  WriteStats stats;
  SMP_CHECK(!path.empty(), CheckpointError, "checkpoint path is empty; give a file name");
  SMP_CHECK(options.alignment >= 64 && options.alignment <= 65536 &&
                (options.alignment & (options.alignment - 1)) == 0,
            CheckpointError, "WriteOptions.alignment ", options.alignment, " for '", path,
            "' is invalid; use a power of two between 64 and 65536 (default 4096)");
  SMP_CHECK(options.threads >= 1, CheckpointError, "WriteOptions.threads is ", options.threads,
            " for '", path, "'; use 1 or more");

  // 1. Pickle and lay out every record; offsets are final from here on.
  internal::Pickled pickled = internal::pickle_object(object);
  stats.pickle_seconds = since(t0);

  auto t1 = std::chrono::steady_clock::now();
  std::vector<at::Tensor> host(pickled.storages.size());
  for (std::size_t i = 0; i < host.size(); ++i) host[i] = host_bytes(pickled.storages[i].tensor);
  stats.copy_seconds = since(t1);

  const std::string a = archive_name(path) + "/";
  const std::string storage_alignment = std::to_string(options.alignment);
  const std::string sid = serialization_id();
  ZipLayout layout(options.alignment, options.force_zip64);
  const std::size_t pkl = layout.add(a + "data.pkl", pickled.data.size(), /*size_field=*/true);
  std::vector<std::pair<std::size_t, std::string>> small;  // record index, bytes
  small.emplace_back(layout.add(a + ".format_version", 1), "1");
  small.emplace_back(layout.add(a + ".storage_alignment", storage_alignment.size()),
                     storage_alignment);
  small.emplace_back(layout.add(a + "byteorder", 6), "little");
  std::vector<std::size_t> storage_record(pickled.storages.size());
  for (std::size_t i = 0; i < pickled.storages.size(); ++i) {
    storage_record[i] = layout.add(a + "data/" + pickled.storages[i].key, pickled.storages[i].nbytes);
    stats.tensor_bytes += pickled.storages[i].nbytes;
  }
  small.emplace_back(layout.add(a + "version", 2), "3\n");
  small.emplace_back(layout.add(a + ".data/serialization_id", sid.size()), sid);
  stats.tensors = pickled.tensors.size();
  stats.records = pickled.storages.size();

  // 2. Write into the temporary file.
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  ::unlink(tmp.c_str());  // a leftover of a crashed writer with our pid
  File file = File::create(tmp);
  try {
    t1 = std::chrono::steady_clock::now();
    struct Task {
      std::size_t storage;
      std::uint64_t begin, length;
    };
    std::vector<Task> tasks;
    for (std::size_t i = 0; i < host.size(); ++i) {
      const std::uint64_t n = pickled.storages[i].nbytes;
      for (std::uint64_t off = 0; off < n; off += kChunk) {
        tasks.push_back({i, off, std::min<std::uint64_t>(kChunk, n - off)});
      }
    }
    std::vector<std::uint32_t> task_crc(tasks.size());
    parallel_for(tasks.size(), options.threads, [&](std::size_t k) {
      const Task& t = tasks[k];
      const auto* base = static_cast<const char*>(host[t.storage].data_ptr()) + t.begin;
      file.pwrite_all(base, static_cast<std::size_t>(t.length),
                      layout.entry(storage_record[t.storage]).data_offset + t.begin);
      task_crc[k] = internal::crc32_update(0, base, static_cast<std::size_t>(t.length));
    });
    std::vector<std::uint32_t> storage_crc(host.size(), 0);
    for (std::size_t k = 0; k < tasks.size(); ++k) {
      const Task& t = tasks[k];
      storage_crc[t.storage] = t.begin == 0 ? task_crc[k]
                                            : internal::crc32_join(storage_crc[t.storage],
                                                                   task_crc[k], t.length);
    }
    for (std::size_t i = 0; i < host.size(); ++i) layout.set_crc(storage_record[i], storage_crc[i]);
    host.clear();  // release host copies early

    // The index: offsets and CRCs are known now.
    Index index;
    index.info = options.info;
    for (const auto& leaf : pickled.tensors) {
      const auto& s = pickled.storages[leaf.storage];
      const auto& rec = layout.entry(storage_record[leaf.storage]);
      TensorEntry e;
      e.path = leaf.path;
      e.key = s.key;
      e.dtype = s.dtype;
      e.shape = leaf.shape;
      e.stride = contiguous_strides(leaf.shape);
      e.offset = rec.data_offset;
      e.nbytes = s.nbytes;
      e.crc32 = rec.crc;
      e.shard = leaf.shard;
      index.tensors.push_back(std::move(e));
    }
    const std::string index_text = internal::index_to_json(index);
    small.emplace_back(layout.add(a + kIndexRecord, index_text.size()), index_text);
    small.emplace_back(pkl, pickled.data);

    // Small records, every local header and descriptor, the central directory.
    for (auto& rec : small) {
      layout.set_crc(rec.first, internal::crc32_update(0, rec.second.data(), rec.second.size()));
    }
    for (const auto& rec : small) {
      file.pwrite_all(rec.second.data(), rec.second.size(), layout.entry(rec.first).data_offset);
    }
    std::string headers;
    for (std::size_t i = 0; i < layout.count(); ++i) {
      const auto& e = layout.entry(i);
      const std::string h = layout.local_header(i);
      file.pwrite_all(h.data(), h.size(), e.header_offset);
      const std::string d = layout.data_descriptor(i);
      if (!d.empty()) file.pwrite_all(d.data(), d.size(), e.data_offset + e.size);
    }
    const std::string cd = layout.central_directory();
    file.pwrite_all(cd.data(), cd.size(), layout.records_end());
    stats.bytes = layout.total_size();
    stats.write_seconds = since(t1);

    // 3. Make it durable and visible.
    t1 = std::chrono::steady_clock::now();
    if (options.fsync) file.sync();
    file.close();
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      internal::throw_syscall(path, "rename", errno,
                              "the checkpoint was written to '" + tmp + "' but could not be moved "
                              "into place; check the directory's permissions");
    }
    if (options.fsync) internal::sync_directory(parent_dir(path));
    stats.sync_seconds = since(t1);
  } catch (...) {
    file = File();  // closes
    ::unlink(tmp.c_str());
    throw;
  }
  stats.seconds = since(t0);
  return stats;
}

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
    const std::uint64_t want = s.numel * c10::elementSize(s.dtype);
    SMP_CHECK(rec->method == 0, CheckpointError, "checkpoint file '", path, "': record '",
              rec->name, "' is compressed; checkpoints must store tensor data uncompressed");
    SMP_CHECK(rec->size == want, CorruptCheckpointError, "checkpoint file '", path,
              "' is damaged: record '", rec->name, "' has ", rec->size, " bytes but storage '",
              s.key, "' needs ", want, "; restore it from a good copy");
    return rec;
  }

  /// Reads a whole record into dst in parallel chunks; returns its CRC-32.
  std::uint32_t read_record(const ZipReader::Entry& rec, void* dst, int threads,
                            bool crc) const {
    const std::uint64_t n = rec.size;
    const std::size_t chunks = static_cast<std::size_t>((n + kChunk - 1) / kChunk);
    std::vector<std::uint32_t> crcs(chunks, 0);
    parallel_for(chunks, threads, [&](std::size_t k) {
      const std::uint64_t begin = k * kChunk;
      const std::size_t len = static_cast<std::size_t>(std::min<std::uint64_t>(kChunk, n - begin));
      char* p = static_cast<char*>(dst) + begin;
      zip.file().pread_exact(p, len, rec.data_offset + begin);
      if (crc) crcs[k] = internal::crc32_update(0, p, len);
    });
    std::uint32_t total = 0;
    for (std::size_t k = 0; k < chunks; ++k) {
      const std::uint64_t len = std::min<std::uint64_t>(kChunk, n - k * kChunk);
      total = k == 0 ? crcs[k] : internal::crc32_join(total, crcs[k], len);
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
  std::vector<at::Tensor> storages(u.storages.size());
  std::vector<const ZipReader::Entry*> records(u.storages.size());
  for (std::size_t i = 0; i < u.storages.size(); ++i) {
    records[i] = im.record(u.storages[i]);
    storages[i] = at::empty({static_cast<std::int64_t>(u.storages[i].numel)},
                            at::TensorOptions().dtype(u.storages[i].dtype));
  }
  // Large records are split across the threads inside read_record; small ones
  // are read by one thread each.
  std::vector<std::size_t> big, little;
  for (std::size_t i = 0; i < records.size(); ++i) {
    (records[i]->size > kChunk ? big : little).push_back(i);
  }
  auto load = [&](std::size_t i, int threads) {
    const std::uint32_t crc =
        im.read_record(*records[i], storages[i].data_ptr(), threads, options.verify_checksums);
    if (options.verify_checksums && crc != records[i]->crc) {
      im.crc_mismatch(*records[i], u.storages[i].key, storage_path[i], crc);
    }
  };
  for (std::size_t i : big) load(i, options.threads);
  parallel_for(little.size(), options.threads, [&](std::size_t k) { load(little[k], 1); });
  if (stats != nullptr) {
    stats->read_seconds = since(t0);
    for (const auto* r : records) stats->tensor_bytes += r->size;
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
      im.read_record(*rec, storage.data_ptr(), options.threads, options.verify_checksums);
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

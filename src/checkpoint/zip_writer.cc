// Zip writer: lays out a torch.save-compatible ZIP archive (ZipLayout) and
// writes a Value into one (write_file): pickle, parallel chunked pwrite + CRC-32
// of the tensor records, the index, headers and central directory.
#include "checkpoint/zip_writer.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "checkpoint/io.h"
#include "checkpoint/metadata.h"
#include "checkpoint/pickle_writer.h"
#include "checkpoint/pipeline.h"
#include "checkpoint/value_util.h"
#include "checkpoint/zip_records.h"
#include "smp/checkpoint/format.h"
#include "smp/config.h"
#include "smp/core/error.h"

namespace smp {
namespace ckpt {
namespace internal {

// ---- ZipLayout ------------------------------------------------------------

ZipLayout::ZipLayout(std::size_t alignment, bool force_zip64)
    : alignment_(alignment), force_zip64_(force_zip64) {
  SMP_CHECK(alignment >= 1 && alignment <= 65536 && (alignment & (alignment - 1)) == 0,
            CheckpointError, "checkpoint alignment ", alignment,
            " is invalid; use a power of two between 1 and 65536 (default 4096)");
}

namespace {

// Size of the ZIP64 extra field of a local header, as PyTorch computes it.
std::size_t local_zip64_extra(std::uint64_t header, std::uint64_t size, bool force) {
  const bool big_size = force || size >= kMax32;
  const bool big_offset = force || header >= kMax32;
  if (!big_size && !big_offset) return 0;
  return 4 + (big_size ? 16 : 0) + (big_offset ? 8 : 0);
}

}  // namespace

std::size_t ZipLayout::add(const std::string& name, std::uint64_t size, bool size_field) {
  SMP_CHECK(name.size() < 0xFFFF, CheckpointError, "ZIP record name too long: ", name);
  Entry e;
  e.name = name;
  e.size = size;
  e.size_field = size_field;
  e.header_offset = cursor_;
  e.zip64 = force_zip64_ || size >= kMax32 || cursor_ >= kMax32;
  const std::uint64_t start = cursor_ + kLocalHeaderSize + name.size() +
                              local_zip64_extra(cursor_, size, force_zip64_) +
                              (size_field ? 12 : 0) + 4;
  const std::uint64_t pad = (alignment_ - start % alignment_) % alignment_;
  e.data_offset = start + pad;
  e.end = e.data_offset + size;
  if (size > 0) e.end += e.zip64 ? 24 : 16;
  cursor_ = e.end;
  entries_.push_back(std::move(e));
  return entries_.size() - 1;
}

std::string ZipLayout::local_header(std::size_t index) const {
  const Entry& e = entries_.at(index);
  const std::size_t z64 = local_zip64_extra(e.header_offset, e.size, force_zip64_);
  const std::uint64_t fb_start = e.header_offset + kLocalHeaderSize + e.name.size() + z64 +
                                 (e.size_field ? 12 : 0);
  const std::uint64_t pad = e.data_offset - fb_start - 4;
  std::string extra;
  if (z64 > 0) {
    put16(extra, kZip64ExtraId);
    put16(extra, static_cast<std::uint16_t>(z64 - 4));
    if (force_zip64_ || e.size >= kMax32) {
      put64(extra, e.size);
      put64(extra, e.size);
    }
    if (force_zip64_ || e.header_offset >= kMax32) put64(extra, e.header_offset);
  }
  if (e.size_field) {
    put16(extra, kSizeExtraId);
    put16(extra, 8);
    put64(extra, total_size());
  }
  extra += "FB";
  put16(extra, static_cast<std::uint16_t>(pad));
  extra.append(static_cast<std::size_t>(pad), 'Z');

  std::string h;
  put32(h, kLocalHeaderSig);
  put16(h, e.zip64 ? 45 : 20);  // version needed
  put16(h, e.size > 0 ? (kFlagDescriptor | kFlagUtf8) : kFlagUtf8);
  put16(h, 0);  // stored
  put16(h, 0);  // time
  put16(h, 0x21);  // date: 1980-01-01
  put32(h, 0);  // crc: in the data descriptor
  const std::uint32_t sz = (z64 > 0 && (force_zip64_ || e.size >= kMax32)) ? 0xFFFFFFFFu : 0u;
  put32(h, sz);
  put32(h, sz);
  put16(h, static_cast<std::uint16_t>(e.name.size()));
  put16(h, static_cast<std::uint16_t>(extra.size()));
  h += e.name;
  h += extra;
  return h;
}

std::string ZipLayout::data_descriptor(std::size_t index) const {
  const Entry& e = entries_.at(index);
  std::string d;
  if (e.size == 0) return d;
  put32(d, kDataDescriptorSig);
  put32(d, e.crc);
  if (e.zip64) {
    put64(d, e.size);
    put64(d, e.size);
  } else {
    put32(d, static_cast<std::uint32_t>(e.size));
    put32(d, static_cast<std::uint32_t>(e.size));
  }
  return d;
}

std::string ZipLayout::central_directory() const {
  std::string cd;
  for (const Entry& e : entries_) {
    const bool big_size = force_zip64_ || e.size >= kMax32;
    const bool big_offset = force_zip64_ || e.header_offset >= kMax32;
    std::string extra;
    if (big_size || big_offset) {
      put16(extra, kZip64ExtraId);
      put16(extra, static_cast<std::uint16_t>((big_size ? 16 : 0) + (big_offset ? 8 : 0)));
      if (big_size) {
        put64(extra, e.size);
        put64(extra, e.size);
      }
      if (big_offset) put64(extra, e.header_offset);
    }
    put32(cd, kCentralSig);
    put16(cd, 0x0300 | 45);  // made by: unix, 4.5
    put16(cd, e.zip64 ? 45 : 20);
    put16(cd, e.size > 0 ? (kFlagDescriptor | kFlagUtf8) : kFlagUtf8);
    put16(cd, 0);
    put16(cd, 0);
    put16(cd, 0x21);
    put32(cd, e.crc);
    put32(cd, big_size ? 0xFFFFFFFFu : static_cast<std::uint32_t>(e.size));
    put32(cd, big_size ? 0xFFFFFFFFu : static_cast<std::uint32_t>(e.size));
    put16(cd, static_cast<std::uint16_t>(e.name.size()));
    put16(cd, static_cast<std::uint16_t>(extra.size()));
    put16(cd, 0);  // comment
    put16(cd, 0);  // disk
    put16(cd, 0);  // internal attributes
    put32(cd, 0100644u << 16);  // external attributes: regular file 0644
    put32(cd, big_offset ? 0xFFFFFFFFu : static_cast<std::uint32_t>(e.header_offset));
    cd += e.name;
    cd += extra;
  }
  const std::uint64_t cd_offset = cursor_;
  const std::uint64_t cd_size = cd.size();
  const std::uint64_t n = entries_.size();
  const bool zip64 = force_zip64_ || n >= 0xFFFF || cd_offset >= kMax32 || cd_size >= kMax32;
  if (zip64) {
    const std::uint64_t end64_offset = cd_offset + cd_size;
    put32(cd, kEnd64Sig);
    put64(cd, kEnd64Size - 12);
    put16(cd, 0x0300 | 45);
    put16(cd, 45);
    put32(cd, 0);
    put32(cd, 0);
    put64(cd, n);
    put64(cd, n);
    put64(cd, cd_size);
    put64(cd, cd_offset);
    put32(cd, kEnd64LocatorSig);
    put32(cd, 0);
    put64(cd, end64_offset);
    put32(cd, 1);
  }
  put32(cd, kEndSig);
  put16(cd, 0);
  put16(cd, 0);
  put16(cd, static_cast<std::uint16_t>(std::min<std::uint64_t>(n, 0xFFFF)));
  put16(cd, static_cast<std::uint16_t>(std::min<std::uint64_t>(n, 0xFFFF)));
  put32(cd, static_cast<std::uint32_t>(std::min<std::uint64_t>(cd_size, kMax32)));
  put32(cd, static_cast<std::uint32_t>(std::min<std::uint64_t>(cd_offset, kMax32)));
  put16(cd, 0);
  return cd;
}

std::uint64_t ZipLayout::total_size() const {
  std::uint64_t cd = 0;
  for (const Entry& e : entries_) {
    const bool big_size = force_zip64_ || e.size >= kMax32;
    const bool big_offset = force_zip64_ || e.header_offset >= kMax32;
    cd += kCentralHeaderSize + e.name.size();
    if (big_size || big_offset) cd += 4 + (big_size ? 16 : 0) + (big_offset ? 8 : 0);
  }
  const std::uint64_t n = entries_.size();
  const bool zip64 = force_zip64_ || n >= 0xFFFF || cursor_ >= kMax32 || cd >= kMax32;
  return cursor_ + cd + (zip64 ? kEnd64Size + kEnd64LocatorSize : 0) + kEndSize;
}

}  // namespace internal

using internal::File;
using internal::kIndexRecord;
using internal::seconds_since;
using internal::ZipLayout;

namespace {

double since(std::chrono::steady_clock::time_point t0) { return seconds_since(t0); }

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

std::vector<std::int64_t> contiguous_strides(const std::vector<std::int64_t>& shape) {
  std::vector<std::int64_t> s(shape.size());
  std::int64_t acc = 1;
  for (std::size_t i = shape.size(); i-- > 0;) {
    s[i] = acc;
    acc *= std::max<std::int64_t>(shape[i], 1);
  }
  return s;
}

/// The 40 decimal digits torch.save writes as .data/serialization_id.
std::string serialization_id() {
  std::string id;
  for (int i = 0; i < 40; ++i) id += static_cast<char>('0' + internal::random_u64() % 10);
  return id;
}

}  // namespace

// ---- writing --------------------------------------------------------------

namespace {

// write_file and write_file_streaming: `produce` null writes the tensors of
// `object`, all copied to the host first; otherwise each record's bytes come
// from produce(placeholder), one record at a time, released once written.
WriteStats write_impl(const std::string& path, const Value& object, const WriteOptions& options,
                      const TensorProducer* produce) {
  const auto t0 = std::chrono::steady_clock::now();
  WriteStats stats;
  SMP_CHECK(!path.empty(), CheckpointError, "checkpoint path is empty; give a file name");
  SMP_CHECK(options.alignment >= 64 && options.alignment <= 65536 &&
                (options.alignment & (options.alignment - 1)) == 0,
            CheckpointError, "WriteOptions.alignment ", options.alignment, " for '", path,
            "' is invalid; use a power of two between 64 and 65536 (default 4096)");
  SMP_CHECK(options.threads >= 0, CheckpointError, "WriteOptions.threads is ", options.threads,
            " for '", path, "'; use 1 or more (0: SMP_CKPT_THREADS or the machine's default)");
  const IoDefaults defaults = io_defaults();
  const int threads = options.threads > 0 ? options.threads : defaults.threads;
  const std::size_t pool_bytes = options.pool_bytes > 0 ? options.pool_bytes : defaults.pool_bytes;
  const bool o_direct = options.o_direct.value_or(defaults.o_direct);

  // 1. Pickle and lay out every record; offsets are final from here on.
  internal::Pickled pickled = internal::pickle_object(object);
  stats.pickle_seconds = since(t0);

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

  // 2. Write the records, then make the file durable and visible.
  auto write_records = [&](File& file) {
    const auto t1 = std::chrono::steady_clock::now();
    // Tensor data: produce == nullptr writes every record through the pipeline
    // at once; a producer's records go one at a time (each released once written).
    auto write = [&](const std::vector<std::size_t>& which, std::vector<at::Tensor> tensors) {
      std::vector<internal::RecordWrite> writes(which.size());
      for (std::size_t j = 0; j < which.size(); ++j) {
        writes[j].tensor = std::move(tensors[j]);
        writes[j].nbytes = pickled.storages[which[j]].nbytes;
        writes[j].offset = layout.entry(storage_record[which[j]]).data_offset;
      }
      internal::PipelineStats ps;
      const std::vector<std::uint32_t> crc =
          internal::write_records(file, writes, threads, pool_bytes, o_direct, &ps,
                                  options.stage_host_tensors, defaults.early_writeback);
      stats.copy_seconds += ps.copy_seconds;
      for (const auto& kv : ps.profile) {
        if (kv.first == "threads") {
          stats.profile[kv.first] = std::max(stats.profile[kv.first], kv.second);
        } else {
          stats.profile[kv.first] += kv.second;
        }
      }
      for (std::size_t j = 0; j < which.size(); ++j) layout.set_crc(storage_record[which[j]], crc[j]);
    };
    if (produce == nullptr) {
      std::vector<std::size_t> all(pickled.storages.size());
      std::vector<at::Tensor> tensors(all.size());
      for (std::size_t i = 0; i < all.size(); ++i) {
        all[i] = i;
        tensors[i] = pickled.storages[i].tensor;
      }
      write(all, std::move(tensors));
    } else {
      for (std::size_t i = 0; i < pickled.storages.size(); ++i) {
        const internal::PickledStorage& s = pickled.storages[i];
        const auto tc = std::chrono::steady_clock::now();
        at::Tensor t = (*produce)(s.tensor);
        SMP_CHECK(t.defined() && t.scalar_type() == s.dtype &&
                      static_cast<std::uint64_t>(t.numel()) == s.numel,
                  CheckpointError, "writing '", path, "': the producer of record data/", s.key,
                  " returned ", t.defined() ? describe_tensor(t) : std::string("nothing"),
                  " but the object holds ", s.numel, " elements of ", dtype_name(s.dtype));
        stats.copy_seconds += since(tc);
        write({i}, {std::move(t)});  // one record in memory at a time
      }
    }

    // The index: offsets and CRCs are known now.
    const auto t_small = std::chrono::steady_clock::now();
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
    stats.profile["small_records"] = since(t_small);
    stats.write_seconds = since(t1);

  };
  const auto t_write = std::chrono::steady_clock::now();
  if (options.atomic) {
    internal::atomic_write(path, write_records, options.fsync);
  } else {
    internal::write_new(path, write_records, options.fsync);
  }
  stats.sync_seconds = std::max(0.0, since(t_write) - stats.write_seconds);
  stats.profile["fsync"] = stats.sync_seconds;
  stats.seconds = since(t0);
  return stats;
}

}  // namespace

WriteStats write_file(const std::string& path, const Value& object, const WriteOptions& options) {
  return write_impl(path, object, options, nullptr);
}

WriteStats write_file_streaming(const std::string& path, const Value& object,
                                const TensorProducer& produce, const WriteOptions& options) {
  SMP_CHECK(static_cast<bool>(produce), CheckpointError, "write_file_streaming('", path,
            "'): no producer given");
  return write_impl(path, object, options, &produce);
}

}  // namespace ckpt
}  // namespace smp

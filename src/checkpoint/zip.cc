#include "checkpoint/zip.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>

#include "smp/core/error.h"

namespace smp {
namespace ckpt {
namespace internal {

namespace {

constexpr std::uint32_t kLocalHeaderSig = 0x04034b50;
constexpr std::uint32_t kDataDescriptorSig = 0x08074b50;
constexpr std::uint32_t kCentralSig = 0x02014b50;
constexpr std::uint32_t kEndSig = 0x06054b50;
constexpr std::uint32_t kEnd64Sig = 0x06064b50;
constexpr std::uint32_t kEnd64LocatorSig = 0x07064b50;
constexpr std::uint64_t kMax32 = 0xFFFFFFFFull;
constexpr std::uint16_t kZip64ExtraId = 0x0001;
/// "sm": smp's extra field holding the total file size (8 bytes).
constexpr std::uint16_t kSizeExtraId = 0x6d73;
constexpr std::size_t kLocalHeaderSize = 30;
constexpr std::size_t kCentralHeaderSize = 46;
constexpr std::size_t kEndSize = 22;
constexpr std::size_t kEnd64Size = 56;
constexpr std::size_t kEnd64LocatorSize = 20;
constexpr std::uint16_t kFlagDescriptor = 0x0008;
constexpr std::uint16_t kFlagUtf8 = 0x0800;

void put16(std::string& out, std::uint16_t v) {
  out += static_cast<char>(v & 0xFF);
  out += static_cast<char>(v >> 8);
}
void put32(std::string& out, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) out += static_cast<char>((v >> (8 * i)) & 0xFF);
}
void put64(std::string& out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out += static_cast<char>((v >> (8 * i)) & 0xFF);
}
std::uint16_t get16(const unsigned char* p) {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}
std::uint32_t get32(const unsigned char* p) {
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
         (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}
std::uint64_t get64(const unsigned char* p) {
  return static_cast<std::uint64_t>(get32(p)) | (static_cast<std::uint64_t>(get32(p + 4)) << 32);
}

std::string hint_for(int err) {
  switch (err) {
    case ENOENT: return "check that the file (or its directory) exists";
    case ENOTDIR: return "a component of the path is a regular file, not a directory";
    case EACCES:
    case EPERM: return "check the permissions of the file and its directory";
    case ENOSPC:
    case EDQUOT: return "free some space on the file system or write elsewhere";
    case EROFS: return "the file system is read-only; write elsewhere";
    case EISDIR: return "the path is a directory; give a file name";
    default: return {};
  }
}

}  // namespace

void throw_syscall(const std::string& path, const char* call, int err, const std::string& hint) {
  std::string h = hint.empty() ? hint_for(err) : hint;
  SMP_THROW(CheckpointError, "checkpoint file '", path, "': ", call, " failed: ",
            std::strerror(err), h.empty() ? "" : "; ", h);
}

// ---- File -----------------------------------------------------------------

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

File::File(File&& other) noexcept : fd_(other.fd_), path_(std::move(other.path_)) {
  other.fd_ = -1;
}

File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.fd_;
    path_ = std::move(other.path_);
    other.fd_ = -1;
  }
  return *this;
}

File File::open_read(const std::string& path) {
  File f;
  f.path_ = path;
  f.fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd_ < 0) throw_syscall(path, "open", errno);
  struct stat st {};
  if (::fstat(f.fd_, &st) != 0) throw_syscall(path, "fstat", errno);
  if (S_ISDIR(st.st_mode)) throw_syscall(path, "open", EISDIR);
  return f;
}

File File::create(const std::string& path) {
  File f;
  f.path_ = path;
  f.fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (f.fd_ < 0) throw_syscall(path, "open", errno);
  return f;
}

std::uint64_t File::size() const {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) throw_syscall(path_, "fstat", errno);
  return static_cast<std::uint64_t>(st.st_size);
}

void File::pread_exact(void* dst, std::size_t n, std::uint64_t offset) const {
  auto* p = static_cast<char*>(dst);
  std::size_t done = 0;
  while (done < n) {
    const std::size_t chunk = std::min<std::size_t>(n - done, std::size_t{1} << 30);
    const ssize_t r = ::pread(fd_, p + done, chunk, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw_syscall(path_, "pread", errno);
    }
    if (r == 0) {
      SMP_THROW(CorruptCheckpointError, "checkpoint file '", path_, "' is truncated: reading ", n,
                " bytes at offset ", offset, " needs ", offset + n, " bytes but the file has ",
                size(), "; the file was cut short (an interrupted copy or write), restore it");
    }
    done += static_cast<std::size_t>(r);
  }
}

void File::pwrite_all(const void* src, std::size_t n, std::uint64_t offset) const {
  const auto* p = static_cast<const char*>(src);
  std::size_t done = 0;
  while (done < n) {
    const std::size_t chunk = std::min<std::size_t>(n - done, std::size_t{1} << 30);
    const ssize_t r = ::pwrite(fd_, p + done, chunk, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw_syscall(path_, "pwrite", errno);
    }
    done += static_cast<std::size_t>(r);
  }
}

void File::truncate(std::uint64_t size) const {
  if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) throw_syscall(path_, "ftruncate", errno);
}

void File::sync() const {
  if (::fsync(fd_) != 0) throw_syscall(path_, "fsync", errno);
}

void File::close() {
  if (fd_ < 0) return;
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) throw_syscall(path_, "close", errno);
}

void sync_directory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw_syscall(dir, "open (directory)", errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some file systems cannot fsync a directory; the rename is still done.
  if (rc != 0 && err != EINVAL && err != ENOTSUP) throw_syscall(dir, "fsync (directory)", err);
}

std::uint32_t crc32_update(std::uint32_t crc, const void* data, std::size_t n) {
  const auto* p = static_cast<const Bytef*>(data);
  uLong c = crc;
  while (n > 0) {
    const std::size_t chunk = std::min<std::size_t>(n, std::size_t{1} << 30);
    c = ::crc32(c, p, static_cast<uInt>(chunk));
    p += chunk;
    n -= chunk;
  }
  return static_cast<std::uint32_t>(c);
}

std::uint32_t crc32_join(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t len_b) {
  return static_cast<std::uint32_t>(
      ::crc32_combine64(crc_a, crc_b, static_cast<z_off64_t>(len_b)));
}

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
    if (header + kLocalHeaderSize > file_size_) {
      corrupt(path, "record '" + entry.name + "' starts past the end of the file");
    }
    file_.pread_exact(lh, sizeof(lh), header);
    if (get32(lh) != kLocalHeaderSig) {
      corrupt(path, "record '" + entry.name + "' has no local header at offset " +
                        std::to_string(header));
    }
    entry.data_offset = header + kLocalHeaderSize + get16(lh + 26) + get16(lh + 28);
    const std::uint64_t stored = entry.method == 0 ? usize : csize;
    if (entry.data_offset + stored > file_size_) {
      SMP_THROW(CorruptCheckpointError, "checkpoint file '", path, "' is truncated: record '",
                entry.name, "' needs bytes up to offset ", entry.data_offset + stored,
                " but the file has ", file_size_,
                " bytes; restore it from a good copy or write the checkpoint again");
    }
    by_name_.emplace(entry.name, entries_.size());
    entries_.push_back(std::move(entry));
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
}  // namespace ckpt
}  // namespace smp

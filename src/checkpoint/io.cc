// io: the only place checkpoint bytes meet the file system: File (checked
// positional I/O), atomic_write and move_into_place (temporary + fsync +
// rename + directory fsync), path helpers, ids and parallel_for (the CRC-32
// declared in io.h is in crc32.cc).
#include "checkpoint/io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <random>
#include <thread>

#include "smp/core/error.h"

namespace smp {
namespace ckpt {
namespace internal {

namespace {

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

File File::open_direct(const std::string& path) {
  File f;
  f.path_ = path;
#ifdef O_DIRECT
  f.fd_ = ::open(path.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC);
#endif
  return f;  // fd_ < 0: no O_DIRECT here (EINVAL on tmpfs and some others)
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

void File::start_writeback(std::uint64_t offset, std::size_t n) const {
#if defined(__linux__) && defined(SYNC_FILE_RANGE_WRITE)
  // Best effort: a file system without it (or an error the final fsync will
  // report anyway) leaves the bytes to that fsync.
  (void)::sync_file_range(fd_, static_cast<off_t>(offset), static_cast<off_t>(n),
                          SYNC_FILE_RANGE_WRITE);
#else
  (void)offset;
  (void)n;
#endif
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


// ---- paths -----------------------------------------------------------------

std::string parent_dir(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string base_name(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string join_dir(const std::string& dir, const std::string& name) {
  return dir == "." ? name : (dir == "/" ? "/" + name : dir + "/" + name);
}

// ---- durable renames ----------------------------------------------------------

void move_into_place(const std::string& tmp, const std::string& path, bool fsync,
                     const std::string& hint) {
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    throw_syscall(path, "rename", errno,
                  hint.empty() ? "the new file was written to '" + tmp +
                                     "' but could not be moved into place; check the "
                                     "directory's permissions"
                               : hint);
  }
  if (fsync) sync_directory(parent_dir(path));
}

void write_new(const std::string& path, const std::function<void(File&)>& write, bool fsync) {
  ::unlink(path.c_str());  // a leftover of a crashed writer
  File file = File::create(path);
  try {
    write(file);
    if (fsync) file.sync();
    file.close();
  } catch (...) {
    file = File();  // closes
    ::unlink(path.c_str());
    throw;
  }
}

void atomic_write(const std::string& path, const std::function<void(File&)>& write, bool fsync) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  write_new(tmp, write, fsync);
  try {
    move_into_place(tmp, path, fsync);
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
}

void atomic_write(const std::string& path, const std::string& bytes, bool fsync) {
  atomic_write(path, [&](File& f) { f.pwrite_all(bytes.data(), bytes.size(), 0); }, fsync);
}

// ---- ids and threads -------------------------------------------------------------

std::uint64_t random_u64() {
  static std::mutex mu;
  static std::mt19937_64 gen([] {
    std::random_device rd;
    return (static_cast<std::uint64_t>(rd()) << 32) ^ rd() ^
           static_cast<std::uint64_t>(::getpid()) ^
           static_cast<std::uint64_t>(
               std::chrono::steady_clock::now().time_since_epoch().count());
  }());
  std::lock_guard<std::mutex> lock(mu);
  return gen();
}

void parallel_for(std::size_t n, int threads, const std::function<void(std::size_t)>& fn) {
  const std::size_t workers =
      std::min<std::size_t>(n, static_cast<std::size_t>(std::max(threads, 1)));
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

}  // namespace internal
}  // namespace ckpt
}  // namespace smp

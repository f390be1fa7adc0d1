// io: the only place checkpoint bytes meet the file system: File (checked
// positional I/O), atomic_write and move_into_place (temporary + fsync +
// rename + directory fsync), path helpers, ids and parallel_for (the CRC-32
// declared in io.h is in crc32.cc).
#include "checkpoint/io.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
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
    case EIO: return "the device reported an I/O error; check the disk (dmesg) or write elsewhere";
    default: return {};
  }
}

// ---- fault injection (SMP_FAULT_POINT; tests only) ---------------------------------

struct FaultSpec {
  bool active = false;
  std::string point;
  long n = 0;
  int err = 0;      // errno to inject; 0: kill the process
  bool exit = false;
  std::string filter;
  std::atomic<long> hits{0};
};

FaultSpec* parse_fault_spec() {
  const char* env = std::getenv("SMP_FAULT_POINT");
  if (env == nullptr || *env == '\0') return nullptr;
  auto* s = new FaultSpec();  // lives for the process
  std::string text = env;
  const std::size_t at = text.find('@');
  if (at != std::string::npos) {
    s->filter = text.substr(at + 1);
    text.resize(at);
  }
  const std::size_t c1 = text.find(':');
  const std::size_t c2 = c1 == std::string::npos ? c1 : text.find(':', c1 + 1);
  s->point = text.substr(0, c1);
  if (c1 != std::string::npos) s->n = std::strtol(text.c_str() + c1 + 1, nullptr, 10);
  const std::string action = c2 == std::string::npos ? "kill" : text.substr(c2 + 1);
  if (action == "enospc") s->err = ENOSPC;
  else if (action == "eio") s->err = EIO;
  else if (action == "exit") s->exit = true;
  else if (action != "kill") {
    std::fprintf(stderr, "smp: SMP_FAULT_POINT='%s': unknown action '%s' (kill, exit, enospc, "
                 "eio); ignored\n", env, action.c_str());
    delete s;
    return nullptr;
  }
  s->active = !s->point.empty() && s->n > 0;
  return s;
}

FaultSpec* const g_fault = parse_fault_spec();

}  // namespace

int fault_point(const char* point, const std::string& path) {
  if (g_fault == nullptr) return 0;  // the one branch outside tests
  FaultSpec& s = *g_fault;
  if (!s.active || s.point != point) return 0;
  if (!s.filter.empty() && base_name(path).find(s.filter) == std::string::npos) return 0;
  if (s.hits.fetch_add(1) + 1 != s.n) return 0;
  if (s.err != 0) return s.err;
  std::fprintf(stderr, "smp: SMP_FAULT_POINT %s:%ld hit at '%s' (pid %d): killing the process\n",
               point, s.n, path.c_str(), static_cast<int>(::getpid()));
  std::fflush(stderr);
  if (s.exit) ::_exit(86);
  ::raise(SIGKILL);
  ::_exit(137);
}

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
  if (const int err = fault_point("create", path)) throw_syscall(path, "open", err);
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
  if (const int err = fault_point("write", path_)) throw_syscall(path_, "pwrite", err);
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
  fault_point("write.after", path_);
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
  if (const int err = fault_point("fsync", path_)) throw_syscall(path_, "fsync", err);
  if (::fsync(fd_) != 0) throw_syscall(path_, "fsync", errno);
  fault_point("fsync.after", path_);
}

void File::close() {
  if (fd_ < 0) return;
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) throw_syscall(path_, "close", errno);
}

void sync_directory(const std::string& dir) {
  if (const int err = fault_point("dirsync", dir)) throw_syscall(dir, "fsync (directory)", err);
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
  const int injected = fault_point("rename", path);
  if (injected != 0 || ::rename(tmp.c_str(), path.c_str()) != 0) {
    throw_syscall(path, "rename", injected != 0 ? injected : errno,
                  hint.empty() ? "the new file was written to '" + tmp +
                                     "' but could not be moved into place; check the "
                                     "directory's permissions"
                               : hint);
  }
  fault_point("rename.after", path);
  if (fsync) sync_directory(parent_dir(path));
}

std::string replace_directory(const std::string& staging, const std::string& dir,
                              const std::string& old) {
  struct stat st {};
  const bool exists = ::stat(dir.c_str(), &st) == 0;
  int err = fault_point("exchange", dir);
  if (err == 0 && !exists) {
    if (::rename(staging.c_str(), dir.c_str()) != 0) err = errno;
  } else if (err == 0) {
#if defined(SYS_renameat2)
    constexpr unsigned kExchange = 2;  // RENAME_EXCHANGE
    if (::syscall(SYS_renameat2, AT_FDCWD, staging.c_str(), AT_FDCWD, dir.c_str(), kExchange) !=
        0) {
      err = errno;
    }
#else
    err = ENOSYS;
#endif
    if (err == EINVAL || err == ENOSYS || err == ENOTSUP) {  // no exchange here: two renames
      err = 0;
      if (::rename(dir.c_str(), old.c_str()) != 0) throw_syscall(dir, "rename", errno);
      fault_point("exchange.between", old);
      if (::rename(staging.c_str(), dir.c_str()) != 0) err = errno;
      if (err == 0) {
        fault_point("exchange.after", dir);
        sync_directory(parent_dir(dir));
        return old;
      }
    }
  }
  if (err != 0) {
    throw_syscall(dir, "rename", err, "the new checkpoint was written to '" + staging +
                                          "' but could not be moved into place; check the "
                                          "directory's permissions");
  }
  fault_point("exchange.after", dir);
  sync_directory(parent_dir(dir));
  return exists ? staging : std::string();
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

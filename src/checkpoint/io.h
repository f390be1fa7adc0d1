#pragma once
/// io (internal): the only place checkpoint bytes meet the file system.
/// File: an owned descriptor with checked positional I/O; atomic_write and
/// move_into_place: the one way a file appears under its name (temporary,
/// fsync, rename, directory fsync); CRC-32; path helpers; the random ids of
/// saves and archives; parallel_for. Every failing system call throws
/// CheckpointError naming the file, the call and strerror.

#include <cstddef>
#include <cstdint>
#include <chrono>
#include <functional>
#include <string>

namespace smp {
namespace ckpt {
namespace internal {

/// Fault injection for tests (docs/file_format.md §12): SMP_FAULT_POINT=
/// "<point>:<n>[:<action>][@<name substring>]" makes the n-th hit (1-based,
/// counted per process, only on files whose base name holds the substring) of the named
/// point act: "kill" (default: raise(SIGKILL)), "exit" (_exit(86)), "enospc" or
/// "eio" (the wrapped call fails with that errno). Points: "create", "write",
/// "write.after" (around each pwrite), "fsync", "fsync.after", "rename",
/// "rename.after", "dirsync", "exchange", "exchange.after" (replace_directory).
/// Parsed once at load; unset, a hit is one branch.
/// Returns the errno to inject (0: none).
int fault_point(const char* point, const std::string& path);

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
  /// A second, O_DIRECT descriptor for writing an existing file; not open
  /// (is_open() false) where the file system refuses O_DIRECT.
  static File open_direct(const std::string& path);

  const std::string& path() const { return path_; }
  bool is_open() const { return fd_ >= 0; }
  std::uint64_t size() const;

  /// Reads exactly n bytes at offset; a short read (end of file) throws
  /// CorruptCheckpointError naming the file, the range and the file size.
  void pread_exact(void* dst, std::size_t n, std::uint64_t offset) const;
  void pwrite_all(const void* src, std::size_t n, std::uint64_t offset) const;
  /// Sets the file length (used to reserve the final size up front).
  void truncate(std::uint64_t size) const;
  /// Asks the kernel to start writing [offset, offset + n) to the disk now
  /// (sync_file_range SYNC_FILE_RANGE_WRITE; it does not wait), so that the
  /// final sync() finds most pages written. A no-op where unsupported.
  void start_writeback(std::uint64_t offset, std::size_t n) const;
  void sync() const;
  /// Closes, checking close()'s result.
  void close();

 private:
  int fd_ = -1;
  std::string path_;
};

/// fsync of a directory, so that a rename inside it is durable.
void sync_directory(const std::string& dir);

/// CRC-32 (zip's; the same value as zlib's crc32) of a buffer of any size,
/// continuing from `crc`: folded with carry-less multiplication where the CPU
/// has it, zlib's table otherwise (crc32.cc).
std::uint32_t crc32_update(std::uint32_t crc, const void* data, std::size_t n);
/// The same through zlib only (tests compare the two).
std::uint32_t crc32_update_zlib(std::uint32_t crc, const void* data, std::size_t n);
/// CRC-32 of the concatenation A+B from crc(A), crc(B) and len(B).
std::uint32_t crc32_join(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t len_b);

/// "dir/name" -> "dir" ("." without a slash, "/" for "/name").
std::string parent_dir(const std::string& path);
/// "dir/name" -> "name".
std::string base_name(const std::string& path);
/// parent_dir's inverse: "." and "/" handled.
std::string join_dir(const std::string& dir, const std::string& name);

/// Renames `tmp` over `path`, then (with `fsync`) fsyncs the directory so that
/// the rename is durable. `hint` replaces the default advice of the error.
void move_into_place(const std::string& tmp, const std::string& path, bool fsync,
                     const std::string& hint = {});

/// Puts the directory `staging` under the name `dir` in one step: a rename
/// when `dir` does not exist, else an atomic exchange (renameat2
/// RENAME_EXCHANGE), so that `dir` always names a complete directory; where
/// the file system has no exchange, `dir` is first renamed to `old` (a window
/// in which `dir` is missing). The parent is fsynced. Returns the directory
/// now holding the previous contents ("" when there were none) for the caller
/// to remove.
std::string replace_directory(const std::string& staging, const std::string& dir,
                              const std::string& old);

/// Writes `path` atomically: `write` fills "<path>.tmp-<pid>", which is
/// fsynced (with `fsync`), closed and moved into place. On any error the
/// temporary is removed and an existing `path` is left as it was.
void atomic_write(const std::string& path, const std::function<void(File&)>& write,
                  bool fsync = true);
/// Writes `path` itself (no temporary: for a caller that already writes under
/// a temporary name and renames it later, like SaveSession): removes a file of
/// that name, creates it, runs `write`, fsyncs (with `fsync`) and closes it.
/// On any error the file is removed.
void write_new(const std::string& path, const std::function<void(File&)>& write, bool fsync);
/// atomic_write of a byte string.
void atomic_write(const std::string& path, const std::string& bytes, bool fsync = true);

/// The unit of parallel I/O and CRC-32 of tensor records.
constexpr std::size_t kIoChunk = std::size_t{16} << 20;

/// Seconds from t0 to now.
inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// 64 random bits (one seeded generator per process; thread-safe).
std::uint64_t random_u64();

/// Runs fn(0..n-1) on up to `threads` threads; rethrows the first failure
/// (remaining tasks are skipped once one failed).
void parallel_for(std::size_t n, int threads, const std::function<void(std::size_t)>& fn);

}  // namespace internal
}  // namespace ckpt
}  // namespace smp

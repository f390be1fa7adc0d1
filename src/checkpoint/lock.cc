// Lock: the flock on "<f>.smp_lock" that serialises concurrent saves to one name.
#include "checkpoint/lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <thread>

#include "checkpoint/io.h"
#include "smp/core/error.h"

namespace smp {
namespace ckpt {
namespace internal {

std::string lock_file_name(const std::string& f) { return f + ".smp_lock"; }

bool lock_is_held(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  int rc;
  do {
    rc = ::flock(fd, LOCK_EX | LOCK_NB);
  } while (rc != 0 && errno == EINTR);
  const bool held = rc != 0 && errno == EWOULDBLOCK;
  ::close(fd);  // releases our probe lock, if we got it
  return held;
}

SaveLock::~SaveLock() { release(); }

void SaveLock::release() {
  if (fd_ >= 0) {
    // Removed while still locked: a waiter that opened this file sees, once it
    // gets the lock, that the name no longer leads to it and opens it anew.
    ::unlink(path_.c_str());
    ::flock(fd_, LOCK_UN);
    ::close(fd_);
    fd_ = -1;
  }
}

void SaveLock::acquire(const std::string& path, double timeout_s, const std::string& what) {
  release();
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  auto sleep = std::chrono::milliseconds(1);
reopen:
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    throw_syscall(path, "open", errno,
                  "the lock file of a save is created next to the checkpoint; check the "
                  "directory's permissions");
  }
  while (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    if (err == EINTR) continue;
    if (err != EWOULDBLOCK) {
      ::close(fd);
      throw_syscall(path, "flock", err,
                    "the file system may not support flock; save to a local or lock-capable "
                    "file system");
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      ::close(fd);
      SMP_THROW(CheckpointError, what, " did not start: another save to the same name (another "
                "job or process) still held the lock file '", path, "' after ", timeout_s,
                " s. Concurrent saves to one name are serialised; give each job its own "
                "checkpoint path, or raise SMP_CHECKPOINT_TIMEOUT if the other save is only "
                "slow. The checkpoint under this name is whatever the other save left "
                "(complete)");
    }
    std::this_thread::sleep_for(sleep);
    sleep = std::min(sleep * 2, std::chrono::milliseconds(50));
  }
  // The holder before us may have removed the file after we opened it.
  struct stat held {}, named {};
  if (::fstat(fd, &held) != 0 || ::stat(path.c_str(), &named) != 0 ||
      held.st_ino != named.st_ino || held.st_dev != named.st_dev) {
    ::close(fd);
    goto reopen;
  }
  fd_ = fd;
  path_ = path;
}

}  // namespace internal
}  // namespace ckpt
}  // namespace smp

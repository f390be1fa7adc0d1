#pragma once
/// Lock (internal): the exclusive flock on "<f>.smp_lock" that serialises saves
/// to one checkpoint name across processes and jobs (held by the save's lowest
/// participant from before the save id is drawn until the save completes).

#include <string>

namespace smp {
namespace ckpt {
namespace internal {

/// "<f>.smp_lock": the lock file next to the checkpoint `f` (empty; it exists
/// while a save holds it, or after a save was killed, until the next save).
std::string lock_file_name(const std::string& f);

/// True when a live process holds the flock on `path` (false when the file
/// does not exist, or exists unlocked: left by a killed save).
bool lock_is_held(const std::string& path);

/// An exclusive flock(2) on a lock file, released (and the file removed) by
/// release() or the destructor; the process's death releases it too, so a
/// crashed save never blocks the next one.
class SaveLock {
 public:
  SaveLock() = default;
  ~SaveLock();
  SaveLock(const SaveLock&) = delete;
  SaveLock& operator=(const SaveLock&) = delete;

  /// Locks `path` (created when missing), waiting up to `timeout_s` seconds.
  /// Throws CheckpointError naming the lock file and `what` ("smp.save of
  /// '<f>'") when another process still holds it at the deadline, or when the
  /// file cannot be created or locked (the system's error).
  void acquire(const std::string& path, double timeout_s, const std::string& what);
  void release();
  bool held() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
  std::string path_;
};

}  // namespace internal
}  // namespace ckpt
}  // namespace smp

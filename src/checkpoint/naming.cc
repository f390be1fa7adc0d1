#include "smp/checkpoint/naming.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>

namespace smp {
namespace ckpt {

namespace {
bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}
}  // namespace

std::string partial_file_name(const std::string& f, const PartName& part,
                              const std::string& suffix) {
  std::string name = f + "_" + std::to_string(part.pp_rank) + "_" + std::to_string(part.tp_rank);
  if (part.rdp_rank) name += "_" + std::to_string(*part.rdp_rank);
  return name + suffix;
}

std::string manifest_file_name(const std::string& f) { return f + ".smp_manifest.json"; }

std::string temporary_file_name(const std::string& name, const std::string& save_id) {
  return name + ".tmp-" + save_id;
}

std::string alternate_pt_name(const std::string& f) {
  return ends_with(f, ".pt") ? f.substr(0, f.size() - 3) : f + ".pt";
}

std::vector<std::string> partial_candidates(const std::string& f, int pp_rank, int tp_rank,
                                            int rdp_rank) {
  std::vector<std::string> out;
  auto add = [&](const std::string& name) {
    if (std::find(out.begin(), out.end(), name) == out.end()) out.push_back(name);
  };
  for (const std::string& base : {f, alternate_pt_name(f)}) {
    if (base.empty()) continue;
    const PartName v3{pp_rank, tp_rank, rdp_rank};
    const PartName v2{pp_rank, tp_rank, std::nullopt};
    add(partial_file_name(base, v3));
    add(partial_file_name(base, v3, ".pt"));
    add(partial_file_name(base, v2));
    add(partial_file_name(base, v2, ".pt"));
  }
  return out;
}

std::vector<std::string> files_with_prefix(const std::string& f, std::size_t limit) {
  const std::size_t slash = f.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : f.substr(0, slash));
  const std::string base = slash == std::string::npos ? f : f.substr(slash + 1);
  std::string stem = base;
  if (ends_with(stem, ".pt")) stem = stem.substr(0, stem.size() - 3);
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.size() > stem.size() && name.compare(0, stem.size(), stem) == 0 &&
        (name[stem.size()] == '_' || name[stem.size()] == '.')) {
      out.push_back(slash == std::string::npos ? name : dir + (dir == "/" ? "" : "/") + name);
    }
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  if (out.size() > limit) out.resize(limit);
  return out;
}

bool file_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace ckpt
}  // namespace smp

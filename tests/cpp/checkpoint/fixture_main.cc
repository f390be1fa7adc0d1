// smp_ckpt_fixture: writes checkpoint fixtures for the Python tests and dumps
// any checkpoint (smp or torch.save) read through smp's safe reader.
//
//   smp_ckpt_fixture write DIR   writes DIR/{everything,tied,zip64,big,sharded}.pt
//   smp_ckpt_fixture dump FILE   prints a canonical dump of the object
//   smp_ckpt_fixture index FILE  prints the tensor index, one line per tensor
//
// The canonical dump is what tests/python/test_checkpoint_format.py computes
// for the Python object: see canonical() there.

#include <ATen/ATen.h>

#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>

#include "fixtures.h"
#include "smp/checkpoint/format.h"
#include "smp/core/error.h"

namespace {

using smp::ckpt::Value;

std::string hex(const std::string& s) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

void canonical(const Value& v, std::ostringstream& os) {
  switch (v.kind()) {
    case Value::Kind::kNone: os << "None"; break;
    case Value::Kind::kBool: os << (v.as_bool() ? "True" : "False"); break;
    case Value::Kind::kInt: os << v.as_int(); break;
    case Value::Kind::kFloat: {
      char buf[40];
      std::snprintf(buf, sizeof(buf), "%.17g", v.as_float());
      os << "f:" << buf;
      break;
    }
    case Value::Kind::kString: os << "s:" << hex(v.as_string()); break;
    case Value::Kind::kBytes: os << "b:" << hex(v.as_bytes()); break;
    case Value::Kind::kList:
    case Value::Kind::kTuple: {
      os << (v.is_list() ? "[" : "(");
      for (std::size_t i = 0; i < v.items().size(); ++i) {
        if (i) os << ", ";
        canonical(v.items()[i], os);
      }
      os << (v.is_list() ? "]" : ")");
      break;
    }
    case Value::Kind::kDict: {
      os << (v.ordered() ? "OrderedDict{" : "{");
      for (std::size_t i = 0; i < v.pairs().size(); ++i) {
        if (i) os << ", ";
        canonical(v.pairs()[i].first, os);
        os << ": ";
        canonical(v.pairs()[i].second, os);
      }
      os << "}";
      if (v.ordered() && !v.attributes().is_none()) {
        os << "#attrs";
        canonical(v.attributes(), os);
      }
      break;
    }
    case Value::Kind::kTensor: os << smp::ckpt::describe_tensor(v.tensor()); break;
  }
}

int write_fixtures(const std::string& dir) {
  using namespace smp::ckpt;
  write_file(dir + "/everything.pt", testing::everything());
  write_file(dir + "/tied.pt", testing::tied());
  WriteOptions z64;
  z64.force_zip64 = true;
  write_file(dir + "/zip64.pt", testing::everything(), z64);
  // Several records and one larger than the 16 MiB I/O chunk.
  WriteOptions big;
  big.threads = 4;
  write_file(dir + "/big.pt",
             Value::ordered_dict({{"a", at::arange(5 << 20, at::kFloat)},
                                  {"b", at::arange(1000, at::kLong)},
                                  {"c", at::arange(3, at::kFloat)}}),
             big);
  WriteOptions info;
  info.info = {{"tp_rank", "1"}};
  write_file(dir + "/sharded.pt",
             Value::dict({{"w", Value(at::arange(6, at::kFloat).reshape({2, 3}),
                                      smp::ShardSpec{{2, 6}, 1, 2, 1})}}),
             info);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " write DIR | dump FILE | index FILE\n";
    return 2;
  }
  const std::string cmd = argv[1], arg = argv[2];
  try {
    if (cmd == "write") return write_fixtures(arg);
    smp::ckpt::Reader reader(arg);
    if (cmd == "dump") {
      std::ostringstream os;
      canonical(reader.read_object(), os);
      std::cout << os.str() << "\n";
      return 0;
    }
    if (cmd == "index") {
      std::cout << "has_index " << (reader.has_index() ? 1 : 0) << "\n";
      for (const auto& e : reader.index().tensors) {
        std::string path;
        for (const auto& c : e.path) path += (path.empty() ? "" : "/") + c;
        std::cout << path << " key=" << e.key << " dtype=" << smp::ckpt::dtype_name(e.dtype)
                  << " offset=" << e.offset << " nbytes=" << e.nbytes << " crc32=" << e.crc32
                  << (e.shard ? " shard=dim" + std::to_string(e.shard->split_dim) + ":" +
                                    std::to_string(e.shard->shard_index) + "/" +
                                    std::to_string(e.shard->num_shards)
                              : "")
                  << "\n";
      }
      return 0;
    }
    std::cerr << "unknown command '" << cmd << "'\n";
    return 2;
  } catch (const smp::Error& e) {
    std::cerr << "smp error: " << e.what() << "\n";
    return 1;
  }
}

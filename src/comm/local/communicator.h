#pragma once
// Local backend: a group of one process (world size 1). Every collective is a copy.

#include <memory>
#include <string>

#include "smp/comm/communicator.h"

namespace smp::local {

std::unique_ptr<Communicator> make_group(const std::string& name);

}  // namespace smp::local

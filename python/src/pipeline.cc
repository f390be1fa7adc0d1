// smp._C.pipeline: the pipeline schedules (smp/pipeline/schedule.h). Pure
// computation; actions come back as (kind name, microbatch) tuples.

#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include "bindings.h"
#include "smp/pipeline/schedule.h"

namespace py = pybind11;

namespace smp::python {

namespace {

std::vector<std::pair<std::string, int>> to_tuples(const std::vector<pipeline::Action>& actions) {
  std::vector<std::pair<std::string, int>> out;
  out.reserve(actions.size());
  for (const auto& a : actions) out.emplace_back(pipeline::to_string(a.kind), a.microbatch);
  return out;
}

pipeline::ScheduleOptions options(int num_stages, int microbatches, const std::string& kind,
                                  int active_microbatches) {
  return {num_stages, microbatches, pipeline::parse_schedule_kind(kind), active_microbatches};
}

}  // namespace

void bind_pipeline(py::module_& root) {
  py::module_ m = root.def_submodule("pipeline", "Pipeline schedules (smp.pipeline).");
  m.def(
      "build_schedule",
      [](int num_stages, int stage, int microbatches, const std::string& kind, int active) {
        return to_tuples(pipeline::build_schedule(options(num_stages, microbatches, kind, active),
                                                  stage));
      },
      py::arg("num_stages"), py::arg("stage"), py::arg("microbatches"),
      py::arg("kind") = "interleaved", py::arg("active_microbatches") = 0,
      "The ordered actions of `stage` in one step: a list of (kind, microbatch), kind one of "
      "'RecvActivation', 'Forward', 'SendActivation', 'RecvGrad', 'Backward', 'SendGrad'.\n\n"
      "    smp._C.pipeline.build_schedule(2, 0, 4, 'interleaved')");
  m.def(
      "build_schedules",
      [](int num_stages, int microbatches, const std::string& kind, int active) {
        std::vector<std::vector<std::pair<std::string, int>>> out;
        for (const auto& s :
             pipeline::build_schedules(options(num_stages, microbatches, kind, active)))
          out.push_back(to_tuples(s));
        return out;
      },
      py::arg("num_stages"), py::arg("microbatches"), py::arg("kind") = "interleaved",
      py::arg("active_microbatches") = 0, "build_schedule for every stage, index = stage.");
}

}  // namespace smp::python

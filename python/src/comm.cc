// Communication: byte messages and collectives for the object API (pickled
// objects), and tensor collectives over smp's groups. Every blocking call
// releases the GIL.

#include <torch/extension.h>

#include <pybind11/stl.h>

#include "bindings.h"
#include "smp/runtime.h"
#include "smp/torch/collectives.h"

namespace py = pybind11;

namespace smp::python {

void bind_comm(py::module_& m) {
  // ---- bytes (object API) ------------------------------------------------
  m.def(
      "send_bytes",
      [](const py::bytes& data, int dest, std::optional<double> timeout) {
        std::string buf = data;
        const CommOptions options = comm_options(timeout);
        py::gil_scoped_release release;
        smp::communicator(CommGroup::kWorld).send_bytes(buf, dest, options);
      },
      py::arg("data"), py::arg("dest"), py::arg("timeout") = py::none(),
      R"doc(Sends a byte message to world rank `dest`, which calls recv_bytes.

    >>> smp._C.send_bytes(pickle.dumps(obj), 1)    # on rank 0
    >>> obj = pickle.loads(smp._C.recv_bytes(0))   # on rank 1
)doc");
  m.def(
      "recv_bytes",
      [](int src, std::optional<double> timeout) {
        const CommOptions options = comm_options(timeout);
        std::string buf;
        {
          py::gil_scoped_release release;
          buf = smp::communicator(CommGroup::kWorld).recv_bytes(src, options);
        }
        return py::bytes(buf);
      },
      py::arg("src"), py::arg("timeout") = py::none(),
      "Receives the next byte message from world rank `src` (see send_bytes).");
  m.def(
      "allgather_bytes",
      [](const py::bytes& data, CommGroup group, std::optional<double> timeout) {
        std::string buf = data;
        const CommOptions options = comm_options(timeout);
        std::vector<std::string> parts;
        {
          py::gil_scoped_release release;
          parts = smp::communicator(group).allgather_bytes(buf, options);
        }
        py::list out;
        for (const auto& p : parts) out.append(py::bytes(p));
        return out;
      },
      py::arg("data"), py::arg("group"), py::arg("timeout") = py::none(),
      R"doc(Every member's bytes, index = group rank.

    >>> smp._C.allgather_bytes(b"%d" % smp.tp_rank(), smp.CommGroup.TP_GROUP)
    [b'0', b'1']
)doc");
  m.def(
      "broadcast_bytes",
      [](const py::bytes& data, int root, CommGroup group, std::optional<double> timeout) {
        std::string buf = data;
        const CommOptions options = comm_options(timeout);
        std::string out;
        {
          py::gil_scoped_release release;
          out = smp::communicator(group).broadcast_bytes(buf, root, options);
        }
        return py::bytes(out);
      },
      py::arg("data"), py::arg("root"), py::arg("group"), py::arg("timeout") = py::none(),
      R"doc(The bytes of group rank `root` on every member (others pass any bytes).

    >>> smp._C.broadcast_bytes(b"x" if smp.rank() == 0 else b"", 0, smp.CommGroup.WORLD)
    b'x'
)doc");
  m.def(
      "barrier",
      [](CommGroup group, std::optional<double> timeout) {
        const CommOptions options = comm_options(timeout);
        py::gil_scoped_release release;
        smp::communicator(group).barrier(options);
      },
      py::arg("group") = CommGroup::kWorld, py::arg("timeout") = py::none(),
      R"doc(Blocks until every member of the group has called it.

    >>> smp._C.barrier(smp.CommGroup.DP_GROUP, timeout=30)
)doc");

  // ---- tensors -----------------------------------------------------------
  m.def(
      "allreduce",
      [](at::Tensor tensor, CommGroup group, ReduceOp op, std::optional<double> timeout) {
        const CommOptions options = comm_options(timeout);
        {
          py::gil_scoped_release release;
          smp::allreduce(tensor, group, op, options);
        }
        return tensor;
      },
      py::arg("tensor"), py::arg("group") = CommGroup::kWorld, py::arg("op") = ReduceOp::kSum,
      py::arg("timeout") = py::none(),
      R"doc(Reduces `tensor` in place over the group and returns it.

    >>> t = torch.full((4,), float(smp.tp_rank()))
    >>> smp._C.allreduce(t, smp.CommGroup.TP_GROUP, smp.ReduceOp.SUM)   # tp 2: all 1.0
)doc");
  m.def(
      "allgather",
      [](const at::Tensor& tensor, CommGroup group, std::optional<double> timeout) {
        const CommOptions options = comm_options(timeout);
        py::gil_scoped_release release;
        return smp::allgather(tensor, group, options);
      },
      py::arg("tensor"), py::arg("group") = CommGroup::kWorld, py::arg("timeout") = py::none(),
      R"doc(Returns a tensor [group size, *tensor.shape], member i's tensor at [i].

    >>> smp._C.allgather(torch.tensor([smp.tp_rank()]), smp.CommGroup.TP_GROUP)
    tensor([[0], [1]])
)doc");
  m.def(
      "reduce_scatter",
      [](const at::Tensor& tensor, CommGroup group, ReduceOp op, std::optional<double> timeout) {
        const CommOptions options = comm_options(timeout);
        py::gil_scoped_release release;
        return smp::reduce_scatter(tensor, group, op, options);
      },
      py::arg("tensor"), py::arg("group") = CommGroup::kWorld, py::arg("op") = ReduceOp::kSum,
      py::arg("timeout") = py::none(),
      R"doc(Reduces `tensor` ([group size * n, ...]) and returns this rank's block of n rows.

    >>> smp._C.reduce_scatter(torch.ones(4), smp.CommGroup.TP_GROUP)   # tp 2
    tensor([2., 2.])
)doc");
  m.def(
      "broadcast",
      [](at::Tensor tensor, int root, CommGroup group, std::optional<double> timeout) {
        const CommOptions options = comm_options(timeout);
        {
          py::gil_scoped_release release;
          smp::broadcast(tensor, root, group, options);
        }
        return tensor;
      },
      py::arg("tensor"), py::arg("root"), py::arg("group") = CommGroup::kWorld,
      py::arg("timeout") = py::none(),
      R"doc(Copies group rank `root`'s tensor into `tensor` on every member; returns it.

    >>> smp._C.broadcast(t, 0, smp.CommGroup.DP_GROUP)
)doc");
  m.def(
      "send",
      [](const at::Tensor& tensor, int peer, RankType rank_type, std::optional<double> timeout) {
        const CommOptions options = comm_options(timeout);
        py::gil_scoped_release release;
        smp::send(tensor, peer, rank_type, options);
      },
      py::arg("tensor"), py::arg("peer"), py::arg("rank_type") = RankType::kWorldRank,
      py::arg("timeout") = py::none(),
      R"doc(Sends `tensor` to the member of this process's group of `rank_type` whose
rank of that type is `peer`; it calls recv with a tensor of the same shape and dtype.

    >>> smp._C.send(t, smp.pp_rank() + 1, smp.RankType.PP_RANK)   # next stage
)doc");
  m.def(
      "recv",
      [](at::Tensor tensor, int peer, RankType rank_type, std::optional<double> timeout) {
        const CommOptions options = comm_options(timeout);
        {
          py::gil_scoped_release release;
          smp::recv(tensor, peer, rank_type, options);
        }
        return tensor;
      },
      py::arg("tensor"), py::arg("peer"), py::arg("rank_type") = RankType::kWorldRank,
      py::arg("timeout") = py::none(),
      R"doc(Receives into `tensor` from `peer` (a rank of `rank_type`, see send); returns it.

    >>> smp._C.recv(torch.empty(4), smp.pp_rank() - 1, smp.RankType.PP_RANK)
)doc");
}

}  // namespace smp::python

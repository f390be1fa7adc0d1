// smp._C.nn: the tensor-parallel autograd functions (smp/nn/functional.h),
// layer forwards (smp/nn/layers.h) and parameter layouts
// (smp/nn/param_layout.h) that the Python modules in smp.nn are built on.
// Every call that communicates releases the GIL.

#include <torch/csrc/utils/pybind.h>

#include <pybind11/stl.h>

#include <map>

#include "bindings.h"
#include "smp/nn/functional.h"
#include "smp/nn/layers.h"
#include "smp/nn/modules.h"
#include "smp/nn/param_layout.h"

namespace py = pybind11;

namespace smp::python {
namespace {

/// A ParamGetter over a name -> tensor map (undefined for absent names).
smp::nn::ParamGetter getter(const std::map<std::string, at::Tensor>& params) {
  return [&params](const std::string& name) {
    auto it = params.find(name);
    return it == params.end() ? at::Tensor() : it->second;
  };
}

}  // namespace

void bind_nn(py::module_& root) {
  py::module_ m = root.def_submodule("nn", "Tensor-parallel functions and layers (smp.nn).");
  using namespace smp::nn;

  // ---- functional ---------------------------------------------------------
  m.def(
      "gather_batch",
      [](const at::Tensor& x, CommGroup group) {
        py::gil_scoped_release release;
        return gather_batch(x, group);
      },
      py::arg("x"), py::arg("group") = CommGroup::kTpGroup,
      "Concatenates every member's x along dim 0 in group order (sizes may differ). "
      "Backward: each member gets the sum over members of its rows' gradients.");
  m.def(
      "reduce_scatter_batch",
      [](const at::Tensor& x, std::int64_t local_batch, CommGroup group) {
        py::gil_scoped_release release;
        return reduce_scatter_batch(x, local_batch, group);
      },
      py::arg("x"), py::arg("local_batch"), py::arg("group") = CommGroup::kTpGroup,
      "Sum over members of this rank's `local_batch` rows of x (the rows of every member's "
      "batch in group order). Backward: gathers the gradients of all rows.");
  m.def(
      "reduce_from_group",
      [](const at::Tensor& x, CommGroup group) {
        py::gil_scoped_release release;
        return reduce_from_group(x, group);
      },
      py::arg("x"), py::arg("group") = CommGroup::kTpGroup,
      "Sum over the group. Backward: identity.");
  m.def(
      "copy_to_group",
      [](const at::Tensor& x, CommGroup group) {
        py::gil_scoped_release release;
        return copy_to_group(x, group);
      },
      py::arg("x"), py::arg("group") = CommGroup::kTpGroup,
      "Identity. Backward: sum of the gradients over the group.");
  m.def(
      "scatter_to_group",
      [](const at::Tensor& x, std::int64_t dim, CommGroup group) {
        py::gil_scoped_release release;
        return scatter_to_group(x, dim, group);
      },
      py::arg("x"), py::arg("dim"), py::arg("group") = CommGroup::kTpGroup,
      "This rank's piece of x along dim (remainder to the lowest ranks). Backward: gathers.");
  m.def(
      "gather_from_group",
      [](const at::Tensor& x, std::int64_t dim, CommGroup group) {
        py::gil_scoped_release release;
        return gather_from_group(x, dim, group);
      },
      py::arg("x"), py::arg("dim"), py::arg("group") = CommGroup::kTpGroup,
      "Concatenation of every member's x along dim. Backward: this rank's piece.");
  m.def(
      "allgather_along",
      [](const at::Tensor& x, std::int64_t dim, CommGroup group) {
        py::gil_scoped_release release;
        return allgather_along(x, dim, group);
      },
      py::arg("x"), py::arg("dim"), py::arg("group") = CommGroup::kTpGroup,
      R"doc(Not differentiable: every member's x concatenated along dim (sizes may differ).

    >>> smp._C.nn.allgather_along(torch.ones(2, smp.tp_rank() + 1), 1)   # tp 2: [2, 3]
)doc");

  // ---- layouts ------------------------------------------------------------
  py::class_<ParamLayout>(m, "ParamLayout",
                          "A full parameter of a tensor-parallel module and how tp ranks hold it.")
      .def_readonly("name", &ParamLayout::name)
      .def_property_readonly("global_shape",
                             [](const ParamLayout& p) { return py::tuple(py::cast(p.global_shape)); })
      .def_property_readonly("split_dim", [](const ParamLayout& p) -> std::optional<int> {
        if (p.is_split()) return p.split_dim;
        return std::nullopt;
      })
      .def_property_readonly("holder", [](const ParamLayout& p) -> std::optional<int> {
        if (p.holder >= 0) return p.holder;
        return std::nullopt;
      })
      .def("held_by", &ParamLayout::held_by, py::arg("tp_rank"))
      .def("distributed", &ParamLayout::distributed)
      .def("local_shape", &ParamLayout::local_shape, py::arg("tp_size"), py::arg("tp_rank"))
      .def("offset",
           [](const ParamLayout& p, int tp_size, int tp_rank) {
             return p.spec(tp_size, tp_rank).offset();
           },
           py::arg("tp_size"), py::arg("tp_rank"))
      .def("__repr__", [](const ParamLayout& p) {
        std::string shape;
        for (std::size_t i = 0; i < p.global_shape.size(); ++i)
          shape += (i ? ", " : "") + std::to_string(p.global_shape[i]);
        return "ParamLayout('" + p.name + "', [" + shape + "], split_dim=" +
               std::to_string(p.split_dim) + ", holder=" + std::to_string(p.holder) + ")";
      });
  m.def("linear_layout", &linear_layout, py::arg("in_features"), py::arg("out_features"),
        py::arg("bias"));
  m.def("embedding_layout", &embedding_layout, py::arg("num_embeddings"),
        py::arg("embedding_dim"), py::arg("vocab_parallel"), py::arg("padding_idx") = -1);
  m.def(
      "transformer_layout",
      [](std::int64_t heads, std::int64_t head_size, std::int64_t hidden, std::int64_t inter,
         bool pre, bool post, double initializer_range) {
        TransformerConfig c{heads, head_size, hidden, inter, pre, post, initializer_range};
        return transformer_layout(c);
      },
      py::arg("num_attention_heads"), py::arg("attention_head_size"), py::arg("hidden_size"),
      py::arg("intermediate_size"), py::arg("pre_layernorm"), py::arg("post_layernorm"),
      py::arg("initializer_range") = 0.02);
  m.def("init_local", &init_local, py::arg("layouts"), py::arg("seed"), py::arg("tp_size"),
        py::arg("tp_rank"),
        "This tp rank's slices of the full parameters drawn from `seed` (same on every rank).");
  m.def("local_slice", &local_slice, py::arg("layout"), py::arg("full"), py::arg("tp_size"),
        py::arg("tp_rank"));
  m.def(
      "gather_full",
      [](const ParamLayout& layout, std::optional<at::Tensor> local, const at::Tensor& like) {
        const at::Tensor mine = local ? *local : at::Tensor();
        py::gil_scoped_release release;
        return gather_full(layout, mine, like.options());
      },
      py::arg("layout"), py::arg("local"), py::arg("like"),
      "Collective over TP_GROUP: the full parameter; `local` is None where not held, `like` "
      "gives dtype and device there.");

  // ---- layers -------------------------------------------------------------
  m.def(
      "linear_forward",
      [](const at::Tensor& x, const at::Tensor& weight, std::optional<at::Tensor> bias,
         std::int64_t in_offset, bool prescaled_batch) {
        py::gil_scoped_release release;
        return linear_forward(x, weight, bias, in_offset, prescaled_batch);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("in_offset"),
      py::arg("prescaled_batch"));
  m.def(
      "embedding_forward",
      [](const at::Tensor& ids, const at::Tensor& weight, std::int64_t full_dim,
         std::int64_t offset, bool vocab_parallel, std::optional<std::int64_t> padding_idx,
         bool prescaled_batch, std::int64_t num_embeddings) {
        py::gil_scoped_release release;
        return embedding_forward(ids, weight, full_dim, offset, vocab_parallel, padding_idx,
                                 prescaled_batch, num_embeddings);
      },
      py::arg("ids"), py::arg("weight"), py::arg("full_dim"), py::arg("offset"),
      py::arg("vocab_parallel"), py::arg("padding_idx"), py::arg("prescaled_batch"),
      py::arg("num_embeddings") = -1);

  py::class_<TransformerOptions>(m, "TransformerOptions")
      .def_readwrite("local_heads", &TransformerOptions::local_heads)
      .def_readwrite("head_size", &TransformerOptions::head_size)
      .def_readwrite("attention_dropout", &TransformerOptions::attention_dropout)
      .def_readwrite("hidden_dropout", &TransformerOptions::hidden_dropout)
      .def_readwrite("activation", &TransformerOptions::activation)
      .def_readwrite("layernorm_epsilon", &TransformerOptions::layernorm_epsilon)
      .def_readwrite("pre_layernorm", &TransformerOptions::pre_layernorm)
      .def_readwrite("post_layernorm", &TransformerOptions::post_layernorm)
      .def_readwrite("causal", &TransformerOptions::causal)
      .def_readwrite("training", &TransformerOptions::training)
      .def_readwrite("prescaled_batch", &TransformerOptions::prescaled_batch)
      .def_readwrite("attention_in_fp32", &TransformerOptions::attention_in_fp32);
  m.def(
      "transformer_options",
      [](std::int64_t heads, std::int64_t head_size, bool pre, bool post, double attention_dropout,
         double hidden_dropout, const std::string& activation, double eps, bool causal,
         bool prescaled_batch, int tp_size) {
        TransformerConfig c;
        c.num_attention_heads = heads;
        c.attention_head_size = head_size;
        c.pre_layernorm = pre;
        c.post_layernorm = post;
        return transformer_options(c, attention_dropout, hidden_dropout, activation, eps, causal,
                                   prescaled_batch, tp_size);
      },
      py::arg("num_attention_heads"), py::arg("attention_head_size"), py::arg("pre_layernorm"),
      py::arg("post_layernorm"), py::arg("attention_dropout"), py::arg("hidden_dropout"),
      py::arg("activation"), py::arg("layernorm_epsilon"), py::arg("causal"),
      py::arg("prescaled_batch"), py::arg("tp_size"),
      "Checks the split of a transformer layer over tp_size ranks; its forward options.");
  m.def(
      "transformer_layer_forward",
      [](const at::Tensor& x, std::optional<at::Tensor> mask,
         const std::map<std::string, at::Tensor>& params, const TransformerOptions& options) {
        py::gil_scoped_release release;
        const TransformerWeights w =
            transformer_weights(getter(params), options.pre_layernorm, options.post_layernorm);
        return transformer_layer_forward(x, mask, w, options);
      },
      py::arg("x"), py::arg("attention_mask"), py::arg("params"), py::arg("options"),
      "One transformer layer; `params` maps this rank's parameter names (transformer_layout) "
      "to tensors.");
  m.def(
      "attention_forward",
      [](const at::Tensor& x, std::optional<at::Tensor> cross_states,
         std::optional<at::Tensor> mask, const std::map<std::string, at::Tensor>& params,
         const TransformerOptions& options) {
        py::gil_scoped_release release;
        const AttentionWeights w =
            attention_weights(getter(params), "", options.pre_layernorm, options.post_layernorm);
        return attention_forward(x, cross_states, mask, w, options);
      },
      py::arg("x"), py::arg("cross_states"), py::arg("attention_mask"), py::arg("params"),
      py::arg("options"),
      "One attention sublayer; `params` maps this rank's parameter names (query.weight, ...) "
      "to tensors; cross_states None for self-attention.");
  m.def(
      "mlp_forward",
      [](const at::Tensor& x, const std::map<std::string, at::Tensor>& params,
         const TransformerOptions& options) {
        py::gil_scoped_release release;
        const MlpWeights w =
            mlp_weights(getter(params), "", options.pre_layernorm, options.post_layernorm);
        return mlp_forward(x, w, options);
      },
      py::arg("x"), py::arg("params"), py::arg("options"),
      "One MLP sublayer; `params` maps this rank's parameter names (dense1.weight, ...) to "
      "tensors.");
  m.def(
      "replicated_dropout",
      [](const at::Tensor& t, double p, bool training, bool prescaled_batch) {
        py::gil_scoped_release release;
        return replicated_dropout(t, p, training, prescaled_batch);
      },
      py::arg("t"), py::arg("p"), py::arg("training"), py::arg("prescaled_batch"),
      "Dropout whose mask tp rank 0 draws and broadcasts when prescaled_batch is on.");
}

}  // namespace smp::python

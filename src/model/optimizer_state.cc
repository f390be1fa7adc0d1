#include "model/optimizer_state.h"

#include <ATen/ATen.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <utility>

#include "smp/core/error.h"

namespace smp {
namespace detail {
namespace {

using ckpt::Value;
namespace optim = torch::optim;

enum class Kind { kAdam, kAdamW, kSGD, kAdagrad, kRMSprop };

Kind kind_of(const optim::Optimizer& o) {
  if (dynamic_cast<const optim::Adam*>(&o)) return Kind::kAdam;
  if (dynamic_cast<const optim::AdamW*>(&o)) return Kind::kAdamW;
  if (dynamic_cast<const optim::SGD*>(&o)) return Kind::kSGD;
  if (dynamic_cast<const optim::Adagrad*>(&o)) return Kind::kAdagrad;
  if (dynamic_cast<const optim::RMSprop*>(&o)) return Kind::kRMSprop;
  SMP_THROW(NotSupportedError, "smp::DistributedOptimizer state dicts support torch::optim::Adam, "
            "AdamW, SGD, Adagrad and RMSprop (the state layouts shared with Python's torch.optim); "
            "this optimizer is none of them");
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kAdam: return "Adam";
    case Kind::kAdamW: return "AdamW";
    case Kind::kSGD: return "SGD";
    case Kind::kAdagrad: return "Adagrad";
    case Kind::kRMSprop: return "RMSprop";
  }
  return "?";
}

void* key_of(const at::Tensor& p) { return p.unsafeGetTensorImpl(); }

/// Python keeps "step" as a float32 0-dim tensor.
Value step_value(std::int64_t step) {
  return Value(at::scalar_tensor(static_cast<double>(step), at::kFloat));
}

double number(const Value& v, const std::string& what) {
  if (v.is_bool()) return v.as_bool() ? 1.0 : 0.0;
  if (v.is_int() || v.is_float()) return v.as_float();
  if (v.is_tensor() && v.tensor().numel() == 1) return v.tensor().item<double>();
  SMP_THROW(ConfigError, "smp::DistributedOptimizer::load_state_dict: ", what,
            " must be a number, got ", v.repr());
}

bool flag(const Value& v, const std::string& what) {
  if (v.is_none()) return false;
  return number(v, what) != 0.0;
}

std::int64_t step_of(const Value& state, const std::string& name) {
  const Value* s = state.find("step");
  SMP_CHECK(s != nullptr, ConfigError, "smp::DistributedOptimizer::load_state_dict: the state of "
            "parameter '", name, "' has no 'step'; it was saved by another optimizer class");
  return static_cast<std::int64_t>(std::llround(number(*s, "state 'step' of '" + name + "'")));
}

/// State tensor `key` of `state` for `param`: a copy on the parameter's
/// device (and dtype when floating, as torch.optim's load_state_dict casts).
at::Tensor state_tensor(const Value& state, const char* key, const at::Tensor& param,
                        const std::string& name, bool required = true) {
  const Value* v = state.find(key);
  if (v == nullptr || v->is_none()) {
    SMP_CHECK(!required, ConfigError, "smp::DistributedOptimizer::load_state_dict: the state of "
              "parameter '", name, "' has no '", key, "'; it was saved by another optimizer "
              "class or with other options");
    return at::Tensor();
  }
  SMP_CHECK(v->is_tensor(), ConfigError, "smp::DistributedOptimizer::load_state_dict: state '",
            key, "' of parameter '", name, "' must be a tensor, got ", v->repr());
  const at::Tensor& t = v->tensor();
  SMP_CHECK(t.sizes() == param.sizes(), ConfigError,
            "smp::DistributedOptimizer::load_state_dict: state '", key, "' of parameter '", name,
            "' has shape ", t.sizes(), " but the parameter has ", param.sizes());
  const auto dtype = t.is_floating_point() ? param.scalar_type() : t.scalar_type();
  return t.to(param.device(), dtype, /*non_blocking=*/false, /*copy=*/true);
}

template <class S>
Value adam_state(const S& s) {
  Value d = Value::dict();
  d.set("step", step_value(s.step()));
  d.set("exp_avg", s.exp_avg());
  d.set("exp_avg_sq", s.exp_avg_sq());
  if (s.max_exp_avg_sq().defined()) d.set("max_exp_avg_sq", s.max_exp_avg_sq());
  return d;
}

template <class S>
std::unique_ptr<S> adam_state_from(const Value& v, const at::Tensor& p, const std::string& n) {
  auto s = std::make_unique<S>();
  s->step(step_of(v, n));
  s->exp_avg(state_tensor(v, "exp_avg", p, n));
  s->exp_avg_sq(state_tensor(v, "exp_avg_sq", p, n));
  at::Tensor m = state_tensor(v, "max_exp_avg_sq", p, n, /*required=*/false);
  if (m.defined()) s->max_exp_avg_sq(m);
  return s;
}

template <class O>
Value adam_hyper(const O& o, bool decoupled) {
  Value d = Value::dict();
  d.set("lr", o.lr());
  d.set("betas", Value::tuple({std::get<0>(o.betas()), std::get<1>(o.betas())}));
  d.set("eps", o.eps());
  d.set("weight_decay", o.weight_decay());
  d.set("amsgrad", o.amsgrad());
  d.set("maximize", false);
  d.set("foreach", Value());
  d.set("capturable", false);
  d.set("differentiable", false);
  d.set("fused", Value());
  d.set("decoupled_weight_decay", decoupled);
  return d;
}

/// Calls `set(value)` when the saved group has `key`.
template <class F>
void read(const Value& saved, const char* key, F set) {
  const Value* v = saved.find(key);
  if (v != nullptr) set(*v);
}

template <class O>
void set_adam_hyper(O& o, const Value& g, bool decoupled) {
  read(g, "decoupled_weight_decay", [&](const Value& v) {
    SMP_CHECK(flag(v, "decoupled_weight_decay") == decoupled, ConfigError,
              "smp::DistributedOptimizer::load_state_dict: the param group was saved with "
              "decoupled_weight_decay=", flag(v, "decoupled_weight_decay") ? "True" : "False",
              " (torch.optim.", decoupled ? "Adam" : "AdamW", ") but this optimizer is torch::optim::",
              decoupled ? "AdamW" : "Adam", "; build the optimizer class the state was saved with");
  });
  read(g, "lr", [&](const Value& v) { o.lr(number(v, "lr")); });
  read(g, "betas", [&](const Value& v) {
    SMP_CHECK((v.is_tuple() || v.is_list()) && v.size() == 2, ConfigError,
              "smp::DistributedOptimizer::load_state_dict: betas must be a pair, got ", v.repr());
    o.betas(std::make_tuple(number(v.items()[0], "betas[0]"), number(v.items()[1], "betas[1]")));
  });
  read(g, "eps", [&](const Value& v) { o.eps(number(v, "eps")); });
  read(g, "weight_decay", [&](const Value& v) { o.weight_decay(number(v, "weight_decay")); });
  read(g, "amsgrad", [&](const Value& v) { o.amsgrad(flag(v, "amsgrad")); });
}

template <class S>
const S& as(const optim::OptimizerParamState& s) {
  return static_cast<const S&>(s);
}

template <class O>
O& options(optim::Optimizer& o, std::size_t g) {
  return static_cast<O&>(o.param_groups().at(g).options());
}
template <class O>
const O& options(const optim::Optimizer& o, std::size_t g) {
  return static_cast<const O&>(o.param_groups().at(g).options());
}

}  // namespace

std::string optimizer_kind(const optim::Optimizer& optimizer) {
  return kind_name(kind_of(optimizer));
}

Value param_state_value(const optim::Optimizer& o, const at::Tensor& param) {
  const Kind kind = kind_of(o);
  const auto it = o.state().find(key_of(param));
  if (it == o.state().end() || it->second == nullptr) return Value();
  const optim::OptimizerParamState& s = *it->second;
  Value d = Value::dict();
  switch (kind) {
    case Kind::kAdam: return adam_state(as<optim::AdamParamState>(s));
    case Kind::kAdamW: return adam_state(as<optim::AdamWParamState>(s));
    case Kind::kSGD: {
      const auto& st = as<optim::SGDParamState>(s);
      if (!st.momentum_buffer().defined()) return Value();
      d.set("momentum_buffer", st.momentum_buffer());
      return d;
    }
    case Kind::kAdagrad: {
      const auto& st = as<optim::AdagradParamState>(s);
      d.set("step", step_value(st.step()));
      d.set("sum", st.sum());
      return d;
    }
    case Kind::kRMSprop: {
      const auto& st = as<optim::RMSpropParamState>(s);
      d.set("step", step_value(st.step()));
      d.set("square_avg", st.square_avg());
      if (st.momentum_buffer().defined()) d.set("momentum_buffer", st.momentum_buffer());
      if (st.grad_avg().defined()) d.set("grad_avg", st.grad_avg());
      return d;
    }
  }
  return Value();
}

std::unique_ptr<optim::OptimizerParamState> make_param_state(const optim::Optimizer& o,
                                                            const at::Tensor& p, const Value& v,
                                                            const std::string& n) {
  const Kind kind = kind_of(o);
  SMP_CHECK(v.is_dict(), ConfigError, "smp::DistributedOptimizer::load_state_dict: the state of "
            "parameter '", n, "' must be a dict, got ", v.repr());
  std::unique_ptr<optim::OptimizerParamState> s;
  switch (kind) {
    case Kind::kAdam: s = adam_state_from<optim::AdamParamState>(v, p, n); break;
    case Kind::kAdamW: s = adam_state_from<optim::AdamWParamState>(v, p, n); break;
    case Kind::kSGD: {
      at::Tensor buf = state_tensor(v, "momentum_buffer", p, n, /*required=*/false);
      if (!buf.defined()) return nullptr;
      auto st = std::make_unique<optim::SGDParamState>();
      st->momentum_buffer(buf);
      s = std::move(st);
      break;
    }
    case Kind::kAdagrad: {
      auto st = std::make_unique<optim::AdagradParamState>();
      st->step(step_of(v, n));
      st->sum(state_tensor(v, "sum", p, n));
      s = std::move(st);
      break;
    }
    case Kind::kRMSprop: {
      auto st = std::make_unique<optim::RMSpropParamState>();
      st->step(step_of(v, n));
      st->square_avg(state_tensor(v, "square_avg", p, n));
      at::Tensor m = state_tensor(v, "momentum_buffer", p, n, false);
      if (m.defined()) st->momentum_buffer(m);
      at::Tensor g = state_tensor(v, "grad_avg", p, n, false);
      if (g.defined()) st->grad_avg(g);
      s = std::move(st);
      break;
    }
  }
  return s;
}

void clear_state(optim::Optimizer& o) {
  const Kind kind = kind_of(o);
  for (std::size_t g = 0; g < o.param_groups().size(); ++g) {
    for (const at::Tensor& p : o.param_groups()[g].params()) {
      o.state().erase(key_of(p));
      // libtorch's Adagrad creates every parameter's state at construction
      // and expects it in step(), as torch.optim.Adagrad does.
      if (kind == Kind::kAdagrad) {
        auto st = std::make_unique<optim::AdagradParamState>();
        st->step(0);
        st->sum(at::full_like(p.detach(),
                              options<optim::AdagradOptions>(o, g).initial_accumulator_value(),
                              at::MemoryFormat::Preserve));
        o.state()[key_of(p)] = std::move(st);
      }
    }
  }
}

Value group_hyper(const optim::Optimizer& o, std::size_t g) {
  const Kind kind = kind_of(o);
  Value d = Value::dict();
  switch (kind) {
    case Kind::kAdam: return adam_hyper(options<optim::AdamOptions>(o, g), false);
    case Kind::kAdamW: return adam_hyper(options<optim::AdamWOptions>(o, g), true);
    case Kind::kSGD: {
      const auto& op = options<optim::SGDOptions>(o, g);
      d.set("lr", op.lr());
      d.set("momentum", op.momentum());
      d.set("dampening", op.dampening());
      d.set("weight_decay", op.weight_decay());
      d.set("nesterov", op.nesterov());
      d.set("maximize", false);
      d.set("foreach", Value());
      d.set("differentiable", false);
      d.set("fused", Value());
      return d;
    }
    case Kind::kAdagrad: {
      const auto& op = options<optim::AdagradOptions>(o, g);
      d.set("lr", op.lr());
      d.set("lr_decay", op.lr_decay());
      d.set("eps", op.eps());
      d.set("weight_decay", op.weight_decay());
      d.set("initial_accumulator_value", op.initial_accumulator_value());
      d.set("foreach", Value());
      d.set("maximize", false);
      d.set("differentiable", false);
      d.set("fused", Value());
      return d;
    }
    case Kind::kRMSprop: {
      const auto& op = options<optim::RMSpropOptions>(o, g);
      d.set("lr", op.lr());
      d.set("momentum", op.momentum());
      d.set("alpha", op.alpha());
      d.set("eps", op.eps());
      d.set("centered", op.centered());
      d.set("weight_decay", op.weight_decay());
      d.set("capturable", false);
      d.set("foreach", Value());
      d.set("maximize", false);
      d.set("differentiable", false);
      return d;
    }
  }
  return d;
}

void set_group_hyper(optim::Optimizer& o, std::size_t g, const Value& saved) {
  const Kind kind = kind_of(o);
  SMP_CHECK(saved.is_dict(), ConfigError, "smp::DistributedOptimizer::load_state_dict: "
            "param_groups[", g, "] must be a dict, got ", saved.repr());
  read(saved, "maximize", [&](const Value& v) {
    SMP_CHECK(!flag(v, "maximize"), NotSupportedError, "smp::DistributedOptimizer::"
              "load_state_dict: param_groups[", g, "] was saved with maximize=True, which "
              "libtorch's torch::optim::", kind_name(kind), " does not support");
  });
  switch (kind) {
    case Kind::kAdam: set_adam_hyper(options<optim::AdamOptions>(o, g), saved, false); return;
    case Kind::kAdamW: set_adam_hyper(options<optim::AdamWOptions>(o, g), saved, true); return;
    case Kind::kSGD: {
      auto& op = options<optim::SGDOptions>(o, g);
      read(saved, "lr", [&](const Value& v) { op.lr(number(v, "lr")); });
      read(saved, "momentum", [&](const Value& v) { op.momentum(number(v, "momentum")); });
      read(saved, "dampening", [&](const Value& v) { op.dampening(number(v, "dampening")); });
      read(saved, "weight_decay", [&](const Value& v) { op.weight_decay(number(v, "weight_decay")); });
      read(saved, "nesterov", [&](const Value& v) { op.nesterov(flag(v, "nesterov")); });
      return;
    }
    case Kind::kAdagrad: {
      auto& op = options<optim::AdagradOptions>(o, g);
      read(saved, "lr", [&](const Value& v) { op.lr(number(v, "lr")); });
      read(saved, "lr_decay", [&](const Value& v) { op.lr_decay(number(v, "lr_decay")); });
      read(saved, "eps", [&](const Value& v) { op.eps(number(v, "eps")); });
      read(saved, "weight_decay", [&](const Value& v) { op.weight_decay(number(v, "weight_decay")); });
      read(saved, "initial_accumulator_value", [&](const Value& v) {
        op.initial_accumulator_value(number(v, "initial_accumulator_value"));
      });
      return;
    }
    case Kind::kRMSprop: {
      auto& op = options<optim::RMSpropOptions>(o, g);
      read(saved, "lr", [&](const Value& v) { op.lr(number(v, "lr")); });
      read(saved, "momentum", [&](const Value& v) { op.momentum(number(v, "momentum")); });
      read(saved, "alpha", [&](const Value& v) { op.alpha(number(v, "alpha")); });
      read(saved, "eps", [&](const Value& v) { op.eps(number(v, "eps")); });
      read(saved, "centered", [&](const Value& v) { op.centered(flag(v, "centered")); });
      read(saved, "weight_decay", [&](const Value& v) { op.weight_decay(number(v, "weight_decay")); });
      return;
    }
  }
}

// ---- byte encoding ------------------------------------------------------------

namespace {

void put_raw(std::string& out, const void* data, std::size_t n) {
  out.append(static_cast<const char*>(data), n);
}
void put_u64(std::string& out, std::uint64_t v) { put_raw(out, &v, sizeof v); }
void put_str(std::string& out, const std::string& s) {
  put_u64(out, s.size());
  out += s;
}

void encode(const Value& v, std::string& out) {
  switch (v.kind()) {
    case Value::Kind::kNone: out += 'N'; return;
    case Value::Kind::kBool: out += v.as_bool() ? 'T' : 'F'; return;
    case Value::Kind::kInt: {
      out += 'i';
      const std::int64_t i = v.as_int();
      put_raw(out, &i, sizeof i);
      return;
    }
    case Value::Kind::kFloat: {
      out += 'f';
      const double d = v.as_float();
      put_raw(out, &d, sizeof d);
      return;
    }
    case Value::Kind::kString: out += 's'; put_str(out, v.as_string()); return;
    case Value::Kind::kBytes: out += 'y'; put_str(out, v.as_bytes()); return;
    case Value::Kind::kList:
    case Value::Kind::kTuple:
      out += v.is_list() ? 'l' : 't';
      put_u64(out, v.size());
      for (const Value& x : v.items()) encode(x, out);
      return;
    case Value::Kind::kDict:
      out += v.ordered() ? 'o' : 'd';
      put_u64(out, v.size());
      for (const auto& [k, x] : v.pairs()) {
        encode(k, out);
        encode(x, out);
      }
      return;
    case Value::Kind::kTensor: {
      out += 'x';
      const at::Tensor t = v.tensor().detach().to(at::kCPU).contiguous();
      put_str(out, ckpt::dtype_name(t.scalar_type()));
      put_u64(out, static_cast<std::uint64_t>(t.dim()));
      for (std::int64_t s : t.sizes()) put_u64(out, static_cast<std::uint64_t>(s));
      put_raw(out, t.data_ptr(), t.nbytes());
      return;
    }
  }
}

struct Reader {
  const std::string& in;
  std::size_t pos = 0;

  void need(std::size_t n) {
    SMP_CHECK(pos + n <= in.size(), Error, "smp: truncated encoded value (", in.size(),
              " bytes, need ", pos + n, ")");
  }
  std::uint64_t u64() {
    std::uint64_t v;
    need(sizeof v);
    std::memcpy(&v, in.data() + pos, sizeof v);
    pos += sizeof v;
    return v;
  }
  std::string str() {
    const std::uint64_t n = u64();
    need(n);
    std::string s = in.substr(pos, n);
    pos += n;
    return s;
  }
  Value value() {
    need(1);
    const char tag = in[pos++];
    switch (tag) {
      case 'N': return Value();
      case 'T': return Value(true);
      case 'F': return Value(false);
      case 'i': {
        const std::uint64_t u = u64();
        std::int64_t i;
        std::memcpy(&i, &u, sizeof i);
        return Value(i);
      }
      case 'f': {
        const std::uint64_t u = u64();
        double d;
        std::memcpy(&d, &u, sizeof d);
        return Value(d);
      }
      case 's': return Value(str());
      case 'y': return Value::bytes(str());
      case 'l':
      case 't': {
        const std::uint64_t n = u64();
        Value::Items items;
        for (std::uint64_t i = 0; i < n; ++i) items.push_back(value());
        return tag == 'l' ? Value::list(std::move(items)) : Value::tuple(std::move(items));
      }
      case 'd':
      case 'o': {
        const std::uint64_t n = u64();
        Value::Pairs pairs;
        for (std::uint64_t i = 0; i < n; ++i) {
          Value k = value();
          pairs.emplace_back(std::move(k), value());
        }
        return tag == 'd' ? Value::dict(std::move(pairs)) : Value::ordered_dict(std::move(pairs));
      }
      case 'x': {
        const auto dtype = ckpt::dtype_from_name(str());
        std::vector<std::int64_t> sizes(u64());
        for (auto& s : sizes) s = static_cast<std::int64_t>(u64());
        at::Tensor t = at::empty(sizes, at::TensorOptions().dtype(dtype));
        need(t.nbytes());
        std::memcpy(t.data_ptr(), in.data() + pos, t.nbytes());
        pos += t.nbytes();
        return Value(t);
      }
      default:
        SMP_THROW(Error, "smp: corrupt encoded value (tag ", static_cast<int>(tag), " at byte ",
                  pos - 1, ")");
    }
  }
};

}  // namespace

std::string encode_value(const Value& value) {
  std::string out;
  encode(value, out);
  return out;
}

Value decode_value(const std::string& bytes) {
  Reader r{bytes};
  Value v = r.value();
  SMP_CHECK(r.pos == bytes.size(), Error, "smp: encoded value has ", bytes.size() - r.pos,
            " trailing bytes");
  return v;
}

}  // namespace detail
}  // namespace smp

"""What a script or framework integration written for smp v1 calls beyond
ranks and groups: __version__, smp.state, config keys, DistributedOptimizer as
a torch.optim.Optimizer (LR schedulers), smp.amp.GradScaler,
resume_from_checkpoint's arguments, activation checkpointing functions and the
names smp refuses with NotSupportedError. Single process here; the multi-rank
parts run mp/v1_api.py under mpirun."""

import copy
import subprocess
import sys

import pytest
import torch

from conftest import _env, ok_ranks, run_mpi

pytestmark = pytest.mark.timeout(240)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.fc2 = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def wrapped(smp, opt_cls=torch.optim.Adam, **opt_kwargs):
    torch.manual_seed(0)
    model = smp.DistributedModel(Net())
    optimizer = smp.DistributedOptimizer(opt_cls(model.parameters(), lr=0.1, **opt_kwargs))
    return model, optimizer


def train(model, optimizer, steps=2):
    for i in range(steps):
        optimizer.zero_grad()
        loss = model(torch.full((3, 4), float(i + 1))).square().mean()
        model.backward(loss)
        optimizer.step()


# ---- version, smp.state, config ------------------------------------------------------

def test_version_importable_from_the_v1_package():
    code = ("from smdistributed.modelparallel import __version__; import smp; "
            "import smdistributed.modelparallel.torch as smp2; "
            "assert __version__ == smp.__version__ == smp2.__version__ == smp._C.version(); "
            "print('version', __version__)")
    out = subprocess.run([sys.executable, "-c", code], env=_env(None), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "version " in out.stdout, out.stdout + out.stderr


def test_state_cfg_has_every_config_key(smp_single):
    smp = smp_single
    assert smp.state.cfg is None and not smp.state.initialized  # as smp v1 before init
    assert smp.num_microbatches() == 1
    smp.init({"microbatches": 4, "prescaled_batch": True, "skip_tracing": True})
    cfg = smp.state.cfg
    resolved = smp.config()
    for key in smp._C.valid_config_keys():
        assert hasattr(cfg, key), key
    for key, value in resolved.items():
        assert getattr(cfg, key) == value, key
    assert cfg.microbatches == 4 and cfg.prescaled_batch is True
    assert cfg.fp16 is False and cfg.bf16 is False and cfg.shard_optimizer_state is False
    assert cfg.pipeline == "interleaved" and cfg.partitions == 1 and cfg.skip_tracing is True
    assert cfg._match_weights is False and cfg.zero2d_enabled() is False
    assert smp.num_microbatches() == smp.state.num_microbatches() == 4
    with pytest.raises(AttributeError, match="smp config has no key 'no_such_key'"):
        cfg.no_such_key
    with pytest.raises(smp.StateError, match="read-only"):
        cfg.fp16 = True
    assert smp.state.initialized and smp.state.is_tracing() is False and not smp.is_tracing()
    assert smp.state.core.rank() == 0 and smp.state.get_model_parallel_world_size() == 1


def test_state_model_optimizer_and_translate_functions(smp_single):
    smp = smp_single
    smp.init({})
    assert smp.state.model is None and smp.state.optimizer is None
    model, optimizer = wrapped(smp)
    assert smp.state.model is model and smp.state.optimizer is optimizer
    fns = smp.state.module_manager.translate_functions
    assert isinstance(fns, list)
    fns.append(lambda sd: sd)
    assert smp.state.module_manager.translate_functions[-1] is fns[-1]
    fns.pop()


def test_state_process_groups_need_ddp(smp_single):
    smp = smp_single
    smp.init({"ddp": True})
    assert smp.state.dp_process_group is smp.get_dp_process_group()
    assert smp.state.get_data_parallel_group() is smp.get_rdp_process_group()
    with pytest.raises(AttributeError, match="no attribute 'nothing_process_group'"):
        smp.state.nothing_process_group


V1_KEYS = {
    "skip_tracing": True, "checkpoint_attentions": False, "static_mode": True, "fast_mode": True,
    "_match_weights": True, "_fp32_grad_accumulation": False,
    "sharded_data_parallel_degree": 1, "sdp_reduce_bucket_size": 5e8,
    "sdp_param_persistence_threshold": 1000000, "sdp_max_live_parameters": 1e9,
    "sdp_hierarchical_allgather": True, "sdp_gradient_clipping": 1.0,
    "deterministic_server": True, "delayed_parameter_initialization": False,
    "offload_activations": False, "activation_loading_horizon": 4, "tensor_parallel_seed": 0,
    "memory_weight": 0.2, "optimize": "speed", "horovod": False, "predefined_hooks": True,
    "ddp_dist_backend": "auto", "placement_strategy": "cluster", "pipeline": "interleaved",
}


def test_init_accepts_v1_keys_and_logs_no_op_keys_once():
    # A fresh process: the warning is printed once per key and process.
    code = ("import smp\n"
            f"keys = {V1_KEYS!r}\n"
            "smp.init(dict(keys))\n"
            "assert smp.state.cfg.static_mode is True\n"
            "assert smp.state.cfg.sdp_reduce_bucket_size == 500000000\n"
            "smp.shutdown()\n"
            "smp.init(dict(keys))\n"
            "smp.shutdown()\n"
            "print('v1 keys OK')\n")
    out = subprocess.run([sys.executable, "-c", code], env=_env(None), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "v1 keys OK" in out.stdout, out.stdout + out.stderr
    err = out.stderr
    line = ("smp config key 'skip_tracing' is accepted for smp v1 compatibility and has no "
            "effect: smp does not trace the model")
    assert err.count(line) == 1, err
    assert "smp config key 'static_mode' is accepted" in err
    assert "'tensor_parallel_seed' is accepted" not in err  # a key that has an effect


@pytest.mark.parametrize("config, needle", [
    ({"sharded_data_parallel_degree": 2, "ddp": True},
     "smp config key 'sharded_data_parallel_degree' is 2: sharded data parallelism"),
    ({"offload_activations": True}, "smp config key 'offload_activations' is true"),
    ({"horovod": True}, "smp config key 'horovod' is true"),
])
def test_unsupported_feature_keys_raise_not_supported(smp_single, config, needle):
    smp = smp_single
    with pytest.raises(smp.NotSupportedError) as e:
        smp.init(config)
    assert needle in str(e.value)
    assert not smp.is_initialized()


def test_unknown_keys_are_all_named(smp_single):
    smp = smp_single
    with pytest.raises(smp.ConfigError) as e:
        smp.init({"microbatchez": 2, "pipline": "simple", "ddp": True})
    msg = str(e.value)
    assert "unknown smp config keys 'microbatchez' (value 2), 'pipline' (value 'simple')" in msg
    assert "valid keys:" in msg


# ---- DistributedOptimizer --------------------------------------------------------------

def test_distributed_optimizer_is_the_same_torch_optimizer(smp_single):
    smp = smp_single
    smp.init({})
    torch.manual_seed(0)
    model = smp.DistributedModel(Net())
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    optimizer = smp.DistributedOptimizer(adam)
    assert optimizer is adam  # smp v1 returns the same object
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert isinstance(optimizer, torch.optim.Adam)
    assert isinstance(optimizer, smp.DistributedOptimizer)
    assert type(optimizer).__name__ == "Adam" and repr(optimizer).startswith("Adam (")
    assert optimizer.optimizer is optimizer  # smp v1's fp16 wrapper attribute
    assert smp.DistributedOptimizer(optimizer) is optimizer  # wrapping twice is harmless
    with pytest.raises(smp.NotSupportedError, match="add_param_group"):
        optimizer.add_param_group({"params": []})


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)),
], ids=["StepLR", "LambdaLR"])
def test_lr_scheduler_on_distributed_optimizer(smp_single, make):
    smp = smp_single
    smp.init({})
    model, optimizer = wrapped(smp)
    plain_model = Net()
    plain_model.load_state_dict(model.get_module().state_dict())
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=0.1)
    sched, plain_sched = make(optimizer), make(plain_opt)
    for i in range(3):
        optimizer.zero_grad()
        model.backward(model(torch.full((3, 4), float(i + 1))).square().mean())
        optimizer.step()
        sched.step()
        plain_opt.zero_grad()
        plain_model(torch.full((3, 4), float(i + 1))).square().mean().backward()
        plain_opt.step()
        plain_sched.step()
        assert optimizer.param_groups[0]["lr"] == plain_opt.param_groups[0]["lr"]
    for (n, p), q in zip(model.get_module().named_parameters(), plain_model.parameters()):
        assert torch.allclose(p, q), n
    assert sched.state_dict()["last_epoch"] == 3


def test_state_dict_arguments_and_orig_methods(smp_single):
    smp = smp_single
    smp.init({})
    model, optimizer = wrapped(smp)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(1))
    train(model, optimizer)
    assert len(calls) == 2  # torch's step hooks run once per step
    orig = optimizer.orig_state_dict()
    assert not any(k.startswith("_smp") for k in orig)
    local = optimizer.local_state_dict(cast_to_cpu=True, gather_if_shard=True)
    assert local["_smp_is_partial"] is True and local["_smp_param_names"]
    assert local.keys() == optimizer.local_state_dict().keys()
    on_device = optimizer.local_state_dict(cast_to_cpu=False)
    assert all(v.device.type == "cpu" for st in local["state"].values() for v in st.values()
               if torch.is_tensor(v))
    # cast_to_cpu=False returns the live state (on the CPU already here).
    st0 = optimizer.state[next(iter(model.parameters()))]["exp_avg"]
    assert on_device["state"][0]["exp_avg"] is st0
    full = optimizer.state_dict(cast_to_cpu=True)
    assert optimizer.local_optimizer_state_dict()["_smp_is_partial"] is True
    # load back with smp v1's arguments into a fresh optimizer over the same model
    saved = copy.deepcopy(local)
    train(model, optimizer, steps=1)
    optimizer.load_state_dict(saved, gather_if_shard=False)
    for i, p in enumerate(model.parameters()):
        assert torch.equal(optimizer.state[p]["exp_avg"], saved["state"][i]["exp_avg"])
    optimizer.load_local_optimizer_state_dict(copy.deepcopy(local))
    with pytest.raises(smp.CheckpointError, match="expects a partial state dict"):
        optimizer.load_local_optimizer_state_dict(dict(full, _smp_is_partial=False))
    optimizer.orig_load_state_dict(orig)
    assert optimizer.orig_step is not None and optimizer.orig_zero_grad() is None
    # deepcopy of a wrapped optimizer keeps its class
    assert isinstance(copy.deepcopy(optimizer), smp.DistributedOptimizer)


# ---- amp, checkpoint functions, compat names, stubs -----------------------------------

def test_grad_scaler_single_process(smp_single):
    smp = smp_single
    smp.init({})
    model, optimizer = wrapped(smp, torch.optim.SGD)
    scaler = smp.amp.GradScaler(init_scale=4.0, device="cpu")
    assert isinstance(scaler, torch.amp.GradScaler)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.ones(3, 4)).sum()
    model.backward(scaler.scale(loss))
    next(iter(model.parameters())).grad[0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # skipped
    assert scaler.get_scale() == 2.0
    optimizer.zero_grad()
    model.backward(scaler.scale(model(torch.ones(3, 4)).sum()))
    scaler.step(optimizer)
    scaler.update()
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0


def test_resume_from_checkpoint_arguments(smp_single, tmp_path):
    smp = smp_single
    smp.init({})
    model, optimizer = wrapped(smp)
    train(model, optimizer)
    smp.save_checkpoint(str(tmp_path), "t1", partial=False, model=model, optimizer=optimizer)
    seen = []

    def translate(sd):
        seen.append(sorted(k for k in sd if not k.startswith("_smp")))
        return sd

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    smp.resume_from_checkpoint(str(tmp_path), tag="t1", partial=False, strict=True,
                               load_optimizer=True, load_sharded_optimizer_state=True,
                               translate_function=translate)
    assert seen == [["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]]
    assert any(p.abs().sum() > 0 for p in model.parameters())
    # partial, with the same arguments
    smp.save_checkpoint(str(tmp_path), "t2", partial=True, model=model, optimizer=optimizer)
    smp.resume_from_checkpoint(str(tmp_path), partial=True, strict=True, load_optimizer=False,
                               load_sharded_optimizer_state=False, translate_function=translate)


def test_resume_from_checkpoint_loads_the_model_and_optimizer_it_is_given(smp_single, tmp_path):
    """model= / optimizer= name what resume_from_checkpoint loads into; this
    process's DistributedModel / DistributedOptimizer are only the default."""
    smp = smp_single
    smp.init({})
    model, optimizer = wrapped(smp)
    train(model, optimizer)
    smp.save_checkpoint(str(tmp_path), "t1", partial=False, model=model, optimizer=optimizer)
    saved = {k: v.clone() for k, v in model.get_module().state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    # A plain module of the same shape, and a plain optimizer over it.
    plain = Net()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    loaded = []
    plain_opt.load_state_dict = lambda sd: loaded.append(sd)
    smp.resume_from_checkpoint(str(tmp_path), tag="t1", partial=False, model=plain,
                               optimizer=plain_opt)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert len(loaded) == 1
    # The current (wrapped) model was left alone; without model= it is the default.
    assert all(p.abs().sum() == 0 for p in model.parameters())
    smp.resume_from_checkpoint(str(tmp_path), tag="t1", partial=False, load_optimizer=False)
    for k, v in model.get_module().state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_activation_checkpoint_functions_match_plain_forward(smp_single):
    smp = smp_single
    smp.init({})
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4),
                              torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    ref = seq(x).sum()
    ref_grads = torch.autograd.grad(ref, list(seq.parameters()))
    for strategy in ("each", "contiguous", "group_2"):
        out = smp.checkpoint_sequential(seq, x, strategy=strategy).sum()
        grads = torch.autograd.grad(out, list(seq.parameters()))
        assert torch.allclose(out, ref)
        assert all(torch.allclose(a, b) for a, b in zip(grads, ref_grads)), strategy
    from smdistributed.modelparallel.torch.patches.checkpoint import checkpoint

    out = checkpoint(seq, x).sum()
    assert torch.allclose(out, ref)
    assert smp.patches.checkpoint.checkpoint_sequential is smp.checkpoint_sequential
    with pytest.raises(smp.ConfigError, match="got 'groups'"):
        smp.checkpoint_sequential(seq, x, strategy="groups")
    with pytest.raises(smp.ConfigError, match="expects a torch.nn.Module"):
        checkpoint(lambda t: t, x)


def test_model_creation_sets_dtype_and_marks_tensor_parallelism(smp_single):
    smp = smp_single
    smp.init({})
    with smp.model_creation(tensor_parallelism=True, dtype=torch.float64):
        lin = torch.nn.Linear(2, 2)
    assert lin.weight.dtype == torch.float64 and torch.get_default_dtype() == torch.float32
    assert smp.tp.tp_config(lin) == {}
    with smp.model_creation():
        lin2 = torch.nn.Linear(2, 2)
    assert smp.tp.tp_config(lin2) is None and lin2.weight.dtype == torch.float32


@pytest.mark.parametrize("make, needle", [
    (lambda smp: smp.nn.FlashAttentionLayer(), "scaled_dot_product_attention"),
    (lambda smp: smp.optimizers.FusedAdam([]), "torch.optim.Adam(params, fused=True)"),
    (lambda smp: smp.optimizers.FusedLamb([]), "apex.optimizers.FusedLAMB"),
    (lambda smp: smp.optimizers.FusedNovoGrad([]), "apex.optimizers.FusedNovoGrad"),
    (lambda smp: wrapped(smp)[0].cpu(), "state_dict(gather_to_rank0=True)"),
    (lambda smp: wrapped(smp)[1].local_fp16_state_dict(), "smp.amp.GradScaler"),
    (lambda smp: wrapped(smp)[1].clip_master_grads(1.0), "clip_grad_norm_"),
    (lambda smp: wrapped(smp)[0].join(), "same number of batches"),
    (lambda smp: wrapped(smp)[0].register_comm_hook(None, None), "after model.backward()"),
])
def test_unsupported_names_raise_not_supported(smp_single, make, needle):
    smp = smp_single
    smp.init({})
    with pytest.raises(smp.NotSupportedError) as e:
        make(smp)
    assert needle in str(e.value)
    assert "not supported" in str(e.value)


def test_model_v1_queries(smp_single):
    smp = smp_single
    smp.init({})
    model, _ = wrapped(smp)
    assert model.partitioned is True
    assert list(model.distributed_modules()) == []
    names = [n for n, _ in model.default_reducer_named_parameters()]
    assert names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert list(model.scaled_batch_reducer_named_parameters()) == []
    p = next(iter(model.parameters()))
    assert not model.is_scaled_batch_parameter(p) and not model.is_distributed_buffer(p)
    assert not model.is_scaled_batch_buffer(p)


@pytest.mark.mpi
def test_v1_api_multi_rank():
    out = run_mpi(4, "v1_api.py").stdout
    assert ok_ranks(out, "v1_api") == [0, 1, 2, 3], out

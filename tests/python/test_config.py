"""smp.init config handling from Python: error classes and their messages."""

import json

import pytest

from conftest import run_mpi

pytestmark = pytest.mark.timeout(120)


def test_exception_hierarchy(smp_single):
    smp = smp_single
    assert issubclass(smp.SMPError, RuntimeError)
    assert issubclass(smp.ConfigError, smp.SMPError) and issubclass(smp.ConfigError, ValueError)
    assert issubclass(smp.StateError, smp.SMPError)
    assert issubclass(smp.CommError, smp.SMPError)
    assert issubclass(smp.CommTimeoutError, smp.CommError)
    assert issubclass(smp.CommTimeoutError, TimeoutError)
    assert issubclass(smp.NotSupportedError, smp.SMPError)
    assert issubclass(smp.NotSupportedError, NotImplementedError)
    assert smp.ConfigError.__module__ == "smp"


def test_unknown_key_lists_valid_keys(smp_single):
    smp = smp_single
    with pytest.raises(smp.ConfigError) as e:
        smp.init({"pipeline_parallel_degre": 2})
    msg = str(e.value)
    assert "unknown smp config key 'pipeline_parallel_degre'" in msg
    assert "valid keys:" in msg
    for key in ("pipeline_parallel_degree", "tensor_parallel_degree", "ddp", "microbatches",
                "placement_strategy", "partitions"):
        assert key in msg
    assert not smp.is_initialized()


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"ddp": [1]}, "smp config key 'ddp' has a value of type list ([1]); smp config values "
                       "must be bool, int, float or str"),
        ({"microbatches": None}, "smp config key 'microbatches' has a value of type NoneType"),
        ({"pipeline_parallel_degree": "two"}, "'pipeline_parallel_degree' must be an integer"),
        ({"ddp": 3.5}, "'ddp' must be a boolean"),
        ({"pipeline": "fast"}, "'pipeline' is 'fast'; valid values: 'interleaved', 'simple'"),
        ({"placement_strategy": "DPX"}, "DPX"),
        ({"microbatches": 0}, "'microbatches' is 0; it must be >= 1"),
        ({1: 2}, "smp config keys must be strings, got int 1"),
    ],
)
def test_bad_values(smp_single, config, needle):
    smp = smp_single
    with pytest.raises(smp.ConfigError) as e:
        smp.init(config)
    assert needle in str(e.value)
    assert isinstance(e.value, ValueError)


def test_config_not_a_dict(smp_single):
    smp = smp_single
    with pytest.raises(smp.ConfigError, match="expects a dict of smp config keys, got list"):
        smp.init([("ddp", True)])


def test_tensor_parallel_needs_ddp(smp_single):
    smp = smp_single
    with pytest.raises(smp.ConfigError) as e:
        smp.init({"tensor_parallel_degree": 2})
    assert "tensor_parallel_degree=2 without ddp" in str(e.value)
    assert '"ddp": True' in str(e.value)


def test_accepted_types_and_defaults(smp_single):
    smp = smp_single
    smp.init({"partitions": 1, "memory_weight": 0.5, "optimize": "memory", "ddp": False,
              "microbatches": 4})
    cfg = smp.config()
    assert cfg["pipeline_parallel_degree"] == 1
    assert cfg["memory_weight"] == 0.5
    assert cfg["optimize"] == "memory"
    assert cfg["microbatches"] == 4
    assert cfg["active_microbatches"] == 3  # pp + 2 when not given
    assert cfg["placement_strategy"] == "cluster"


def test_none_config_is_empty(smp_single):
    smp = smp_single
    smp.init()
    assert smp.size() == 1 and smp.rank() == 0
    assert smp.config()["ddp"] is False


def test_init_twice_is_state_error(smp_single):
    smp = smp_single
    smp.init({})
    with pytest.raises(smp.StateError) as e:
        smp.init({})
    assert "already called" in str(e.value)
    assert smp.is_initialized()


def test_init_after_shutdown(smp_single):
    smp = smp_single
    smp.init({})
    smp.shutdown()
    assert not smp.is_initialized()
    smp.init({"microbatches": 2})
    assert smp.config()["microbatches"] == 2


@pytest.mark.parametrize(
    "fn", ["rank", "size", "local_rank", "pp_rank", "tp_size", "dp_rank", "rdp_size", "mp_rank",
           "get_tp_group", "get_world_group"])
def test_query_before_init_is_state_error(smp_single, fn):
    smp = smp_single
    assert not smp.is_initialized()
    with pytest.raises(smp.StateError, match="smp.init"):
        getattr(smp, fn)()


def test_env_overrides_dict_key(smp_single, monkeypatch):
    smp = smp_single
    monkeypatch.setenv("SM_HP_MP_PARAMETERS", json.dumps({"microbatches": 8, "pipeline": "simple"}))
    smp.init({"microbatches": 2, "fp16": True})
    cfg = smp.config()
    assert cfg["microbatches"] == 8
    assert cfg["pipeline"] == "simple"
    assert cfg["fp16"] is True


def test_env_bad_json_names_variable(smp_single, monkeypatch):
    smp = smp_single
    monkeypatch.setenv("SM_HP_MP_PARAMETERS", "{microbatches: 8}")
    with pytest.raises(smp.ConfigError, match="SM_HP_MP_PARAMETERS"):
        smp.init({})


def test_resolve_config_needs_no_init(smp_single):
    smp = smp_single
    cfg = smp._C.resolve_config({"partitions": 2}, read_env=False)
    assert cfg["pipeline_parallel_degree"] == 2
    assert cfg["active_microbatches"] == 4
    assert "ddp" in smp._C.valid_config_keys()


@pytest.mark.mpi
def test_world_size_mismatch_under_mpirun():
    res = run_mpi(3, "world_mismatch.py", expect_rc=None)
    assert res.stdout.count("world_mismatch OK") == 3, res.stdout
    # A rank that caught the ConfigError must be able to exit normally: init
    # must not leave MPI initialized-but-not-finalized behind when it fails.
    assert res.returncode == 0, (
        "every rank caught the ConfigError, yet mpirun reports an abnormal exit "
        f"(status {res.returncode}); a failed smp.init must finalize MPI again\n{res.stdout}"
    )

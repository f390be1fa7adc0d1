# mpirun -np 3: pipeline_parallel_degree 2 does not divide the world size 3.
import smp

try:
    smp.init({"pipeline_parallel_degree": 2, "ddp": True})
except smp.ConfigError as e:
    msg = str(e)
    assert "world size 3" in msg, msg
    assert "pipeline_parallel_degree (2)" in msg, msg
    assert not smp.is_initialized()
    print("world_mismatch OK", flush=True)
else:
    raise AssertionError("smp.init with pp=2 on 3 ranks did not raise ConfigError")

"""Pipeline parallelism: smp.step and StepOutput (step.py), the schedule
engine (engine.py over smp._C.pipeline), partitioning (partition.py) and
PipelineModule (module.py). See docs/pipeline.md."""

from smp.pipeline.engine import current_step, last_step_stats  # noqa: F401
from smp.pipeline.module import PipelineModule  # noqa: F401
from smp.pipeline.partition import get_partition, partition, set_partition  # noqa: F401
from smp.pipeline.step import StepOutput, split_microbatches, step  # noqa: F401

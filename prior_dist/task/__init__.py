"""The PRIOR task: a batch and a stage plan in, named losses out (model + losses, no engine).

`PriorTask` is the module a DeepSpeed engine wraps; `stage_plan` says which losses each stage
of the curriculum runs; the task draws its own sample-tied noise and starts its own prototype
bank.
"""

from prior_dist.task.curriculum import LOSS_NAMES, StagePlan, stage_plan
from prior_dist.task.task import PriorTask

__all__ = ["LOSS_NAMES", "PriorTask", "StagePlan", "stage_plan"]

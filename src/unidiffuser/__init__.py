"""UniDiffuser: one transformer that learns every distribution of multi-modal data."""

from .network import PRESETS, Modality, UViT, UViTConfig, image, label, preset, sequence, vector
from .objective import unidiffuser_loss
from .schedule import NoiseSchedule
from .solvers import sample, sample_ddim, sample_dpmpp_2m, sample_dpmpp_singlestep
from .tasks import CHAINS, MODES, TASKS, Task, TaskModel, generate, generate_chain

__version__ = "0.1.0"

__all__ = [
    "CHAINS",
    "MODES",
    "PRESETS",
    "TASKS",
    "Modality",
    "NoiseSchedule",
    "Task",
    "TaskModel",
    "UViT",
    "UViTConfig",
    "generate",
    "generate_chain",
    "image",
    "label",
    "preset",
    "sample",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_dpmpp_singlestep",
    "sequence",
    "unidiffuser_loss",
    "vector",
]

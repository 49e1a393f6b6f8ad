"""The check a run's settings pass before any model or data loads: every area's own check
(each beside the code it protects), in the order a run meets them. A failure is a
``ConfigError`` naming the problem and the fix (exit 2 from the command line)."""

from llm_finetune.adapters import check_adapter_settings
from llm_finetune.data.loaders import check_data_settings
from llm_finetune.engine import check_engine_settings
from llm_finetune.float8 import check_float8_settings
from llm_finetune.model import is_vision_model, weights_on_disk
from llm_finetune.precision import check_precision_settings
from llm_finetune.preference import check_preference_settings
from llm_finetune.profiling import check_profiling_settings
from llm_finetune.quantization import check_quantization_settings
from llm_finetune.samples import check_sample_settings
from llm_finetune.trackers import check_tracker_packages
from llm_finetune.train import check_training_numbers
from llm_finetune.training_checkpoint import check_resume_settings
from llm_finetune.vision import check_vision_settings


def validate(run, world_size: int, cuda: bool) -> None:
    """Refuse combinations that cannot work, before any model or data is loaded."""
    t = run.train
    check_training_numbers(t)
    check_tracker_packages(t)
    check_profiling_settings(t, cuda)
    check_resume_settings(t, world_size)
    check_engine_settings(run, world_size, cuda)
    check_precision_settings(run, cuda)
    check_float8_settings(run, cuda)
    check_adapter_settings(run)
    check_quantization_settings(t, weights_on_disk)
    check_data_settings(run)
    check_sample_settings(t)
    check_preference_settings(run)
    # a hub model's config is read by the run itself (finetuning.main), not here
    check_vision_settings(run, is_vision_model(t.model_name, local_only=True))

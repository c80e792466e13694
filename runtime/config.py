"""Moved: the model config lives in runtime/model_config.py. This alias keeps the modules that
other branches are moving out (app/layersplit_batch.py, runtime/models/kernel_check.py,
runtime/weights/quant_eval.py) importing until they use the new path; then delete it."""

from runtime.model_config import ModelConfig, load_config  # noqa: F401

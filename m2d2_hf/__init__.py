"""m2d2_hf: M2D2 / M2D-CLAP (2025) audio and audio-language models for Hugging Face transformers.

Importing the package registers its classes with the transformers Auto classes, so `AutoModel`,
`AutoFeatureExtractor`, `AutoProcessor` and `pipeline(...)` load saved M2D2 folders.
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForPreTraining,
    AutoProcessor,
)

from .configuration_m2d2 import M2D2AudioConfig, M2D2Config, M2D2PreTrainingConfig
from .cpu_inference import optimize_for_cpu_inference
from .feature_extraction_m2d2 import M2D2FeatureExtractor
from .modeling_m2d2 import (
    M2D2AudioModel,
    M2D2AudioModelOutput,
    M2D2ClapModel,
    M2D2ClapOutput,
    M2D2ForAudioClassification,
    M2D2PreTrainedModel,
    frame_timestamps,
)
from .modeling_m2d2_pretraining import M2D2ForPreTraining, M2D2PreTrainingOutput
from .pipelines import M2D2AudioClassificationPipeline, M2D2ZeroShotAudioClassificationPipeline, register_pipelines
from .processing_m2d2 import M2D2Processor


def _register() -> None:
    AutoConfig.register(M2D2AudioConfig.model_type, M2D2AudioConfig, exist_ok=True)
    AutoConfig.register(M2D2Config.model_type, M2D2Config, exist_ok=True)
    AutoConfig.register(M2D2PreTrainingConfig.model_type, M2D2PreTrainingConfig, exist_ok=True)
    AutoModel.register(M2D2AudioConfig, M2D2AudioModel, exist_ok=True)
    AutoModel.register(M2D2Config, M2D2ClapModel, exist_ok=True)
    AutoModelForPreTraining.register(M2D2PreTrainingConfig, M2D2ForPreTraining, exist_ok=True)
    AutoModelForAudioClassification.register(M2D2AudioConfig, M2D2ForAudioClassification, exist_ok=True)
    for config_class in (M2D2AudioConfig, M2D2Config):
        AutoFeatureExtractor.register(config_class, M2D2FeatureExtractor, exist_ok=True)
    AutoProcessor.register(M2D2Config, M2D2Processor, exist_ok=True)
    register_pipelines()

    # Saved folders then carry the defining modules and an `auto_map`, so they also load with
    # trust_remote_code=True where m2d2_hf is not installed.
    M2D2AudioConfig.register_for_auto_class()
    M2D2Config.register_for_auto_class()
    M2D2PreTrainingConfig.register_for_auto_class()
    M2D2AudioModel.register_for_auto_class("AutoModel")
    M2D2ClapModel.register_for_auto_class("AutoModel")
    M2D2ForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    M2D2ForAudioClassification.register_for_auto_class("AutoModelForAudioClassification")
    M2D2FeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
    M2D2Processor.register_for_auto_class("AutoProcessor")


_register()

__version__ = "0.1.0"

__all__ = [
    "M2D2AudioConfig",
    "M2D2AudioModel",
    "M2D2AudioModelOutput",
    "M2D2ClapModel",
    "M2D2ClapOutput",
    "M2D2Config",
    "M2D2FeatureExtractor",
    "M2D2ForAudioClassification",
    "M2D2ForPreTraining",
    "M2D2PreTrainedModel",
    "M2D2PreTrainingConfig",
    "M2D2PreTrainingOutput",
    "M2D2Processor",
    "M2D2AudioClassificationPipeline",
    "M2D2ZeroShotAudioClassificationPipeline",
    "frame_timestamps",
    "optimize_for_cpu_inference",
]

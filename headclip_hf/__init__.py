"""headclip_hf: HeadCLIP zero-shot anomaly detection for the Hugging Face ecosystem.

Importing the package registers `HeadCLIPConfig`, `HeadCLIPModel` and `HeadCLIPProcessor` with `AutoConfig`,
`AutoModel` and `AutoProcessor`, and marks the config and model for Hub remote code (`save_pretrained` ships
`configuration_headclip.py` and `modeling_headclip.py` with an `auto_map`).
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .adapters import load_headclip_model, load_headclip_model_and_processor
from .configuration_headclip import DEFAULT_CLIP_CHECKPOINT, DEFAULT_IMAGE_SIZE, HeadCLIPConfig
from .data import ANOMALY_FEATURES, AnomalyCollator, load_anomaly_dataset, make_transform
from .dataset_export import export_anomaly_dataset, upload_anomaly_dataset
from .evaluation import evaluate_model
from .metrics import AnomalyDetectionResults, AnomalyMetricsAccumulator, MetricResult, UndefinedMetricError
from .modeling_headclip import HeadCLIPModel, HeadCLIPOutput
from .pipeline_headclip import ZeroShotAnomalyDetectionPipeline, register_pipeline
from .processing_headclip import HeadCLIPProcessor
from .provenance import headclip_parameters_hash
from .references import encode_reference_images, load_reference_embeds, save_reference_embeds, select_k_shot
from .reporting import save_results

__version__ = "0.1.0"

AutoConfig.register(HeadCLIPConfig.model_type, HeadCLIPConfig, exist_ok=True)
AutoModel.register(HeadCLIPConfig, HeadCLIPModel, exist_ok=True)
AutoProcessor.register(HeadCLIPConfig, HeadCLIPProcessor, exist_ok=True)
HeadCLIPConfig.register_for_auto_class()
HeadCLIPModel.register_for_auto_class("AutoModel")
HeadCLIPProcessor.register_for_auto_class("AutoProcessor")
register_pipeline()

__all__ = [
    "ANOMALY_FEATURES",
    "AnomalyCollator",
    "AnomalyDetectionResults",
    "AnomalyMetricsAccumulator",
    "DEFAULT_CLIP_CHECKPOINT",
    "DEFAULT_IMAGE_SIZE",
    "HeadCLIPConfig",
    "HeadCLIPModel",
    "HeadCLIPOutput",
    "HeadCLIPProcessor",
    "MetricResult",
    "UndefinedMetricError",
    "ZeroShotAnomalyDetectionPipeline",
    "__version__",
    "encode_reference_images",
    "evaluate_model",
    "export_anomaly_dataset",
    "headclip_parameters_hash",
    "load_anomaly_dataset",
    "load_headclip_model",
    "load_headclip_model_and_processor",
    "load_reference_embeds",
    "make_transform",
    "save_reference_embeds",
    "save_results",
    "select_k_shot",
    "upload_anomaly_dataset",
]

"""headclip_hf: HeadCLIP zero-shot anomaly detection for the Hugging Face ecosystem.

Importing the package registers `HeadCLIPConfig`, `HeadCLIPModel` and `HeadCLIPProcessor` with `AutoConfig`,
`AutoModel` and `AutoProcessor`, and marks the three for Hub remote code: `save_pretrained` ships
`configuration_headclip.py`, `modeling_headclip.py`, `processing_headclip.py` and `image_utils_headclip.py` (which
the processor imports) with an `auto_map`; a model published with `headclip push` also carries
`pipeline_headclip.py` for the "zero-shot-anomaly-detection" pipeline.

Where PyTorch cannot be imported (a deployment machine with ONNX Runtime or OpenVINO), the package still imports:
`headclip_hf.export.ExportedDetector` runs exported models there, and the names below raise an `ImportError` that
says PyTorch is needed.
"""

__version__ = "0.1.0"

try:
    import torch  # noqa: F401
except ImportError as error:
    _torch_import_error: ImportError | None = error
else:
    _torch_import_error = None

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

    AutoConfig.register(HeadCLIPConfig.model_type, HeadCLIPConfig, exist_ok=True)
    AutoModel.register(HeadCLIPConfig, HeadCLIPModel, exist_ok=True)
    AutoProcessor.register(HeadCLIPConfig, HeadCLIPProcessor, exist_ok=True)
    HeadCLIPConfig.register_for_auto_class()
    HeadCLIPModel.register_for_auto_class("AutoModel")
    HeadCLIPProcessor.register_for_auto_class("AutoProcessor")
    register_pipeline()


def __getattr__(name: str):
    if _torch_import_error is not None and name in __all__:
        raise ImportError(
            f"headclip_hf.{name} needs PyTorch, which cannot be imported here ({_torch_import_error}): install it "
            "(pip install torch). Exported models run without it: headclip_hf.export.ExportedDetector(folder)."
        ) from _torch_import_error
    raise AttributeError(f"module 'headclip_hf' has no attribute {name!r}")


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

"""raygen.metrics: FID/KID on pluggable, named feature extractors; CLIP scoring
and best-of-n reranking; reconstruction, codebook and likelihood metrics.

No Ray, no MLflow: functions return plain numbers and dicts for the caller to log.
"""
from raygen.metrics.clip import HFClipScorer, ImageTextScorer, TrainedClipScorer, load_scorer
from raygen.metrics.domain import DomainFitConfig, fit_domain_features, fit_images, load_domain_extractor
from raygen.metrics.errors import MetricsError
from raygen.metrics.extractors import FeatureExtractor, TorchExtractor, load_extractor
from raygen.metrics.fid import FIDEvaluator, compute_fid, fid_floor, get_dataset_extractor
from raygen.metrics.frechet import frechet_distance, gaussian_stats, kernel_distance
from raygen.metrics.preprocess import Preprocess
from raygen.metrics.recon import (bits_per_dim, codebook_metrics, fidelity_metrics, l1_per_image, mse_per_image,
                                  psnr_per_image, reconstruction_metrics, ssim_per_image)
from raygen.metrics.reference import ReferenceStats, dataset_checksum, reference_stats
from raygen.metrics.rerank import BestOfN

__all__ = [
    "BestOfN", "DomainFitConfig", "FIDEvaluator", "FeatureExtractor", "HFClipScorer", "ImageTextScorer",
    "MetricsError", "Preprocess", "ReferenceStats", "TorchExtractor", "TrainedClipScorer", "bits_per_dim",
    "codebook_metrics", "compute_fid", "dataset_checksum", "fidelity_metrics", "fid_floor", "fit_domain_features", "fit_images",
    "frechet_distance", "gaussian_stats", "get_dataset_extractor", "kernel_distance", "l1_per_image",
    "load_domain_extractor", "load_extractor", "load_inception", "load_scorer", "mse_per_image", "psnr_per_image",
    "reconstruction_metrics", "reference_stats", "ssim_per_image",
]


def __getattr__(name):
    # torchvision (1.5 s to import) is loaded only when Inception is asked for
    if name == "load_inception":
        from raygen.metrics.inception import load_inception
        return load_inception
    raise AttributeError(f"module 'raygen.metrics' has no attribute {name!r}")

from .digits_classifier import (
    DIGITS_CLASSIFIER_PATH,
    DigitsClassifier,
    class_accuracy,
    load_digits_classifier,
)
from .features import (
    INCEPTION_FILENAME,
    INCEPTION_URL,
    FeatureExtractor,
    InceptionWeightsNotFoundError,
    image_files,
    load_images,
)
from .fid import frechet_distance, frechet_distance_from_moments, kernel_distance
from .flops import FlopCount, count_flops
from .quality import (
    FidKidResult,
    ReferenceStatistics,
    compute_fid_kid,
    load_reference_statistics,
    save_reference_statistics,
)
from .similarity import PSNR_CAP_DB, Similarity, image_similarity
from .throughput import Timing, round_speedups, time_interleaved

__all__ = [
    "FlopCount",
    "count_flops",
    "DIGITS_CLASSIFIER_PATH",
    "INCEPTION_FILENAME",
    "INCEPTION_URL",
    "PSNR_CAP_DB",
    "DigitsClassifier",
    "FeatureExtractor",
    "FidKidResult",
    "InceptionWeightsNotFoundError",
    "ReferenceStatistics",
    "Similarity",
    "Timing",
    "class_accuracy",
    "compute_fid_kid",
    "frechet_distance",
    "image_files",
    "image_similarity",
    "frechet_distance_from_moments",
    "kernel_distance",
    "load_digits_classifier",
    "load_images",
    "load_reference_statistics",
    "round_speedups",
    "save_reference_statistics",
    "time_interleaved",
]

from .digits_classifier import (
    DIGITS_CLASSIFIER_PATH,
    DigitsClassifier,
    class_accuracy,
    digits_features,
    load_digits_classifier,
)
from .fid import frechet_distance, kernel_distance
from .throughput import Timing, time_interleaved

__all__ = [
    "DIGITS_CLASSIFIER_PATH",
    "DigitsClassifier",
    "Timing",
    "class_accuracy",
    "digits_features",
    "frechet_distance",
    "kernel_distance",
    "load_digits_classifier",
    "time_interleaved",
]

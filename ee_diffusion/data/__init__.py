"""Data sets the shipped models are trained and scored on."""

from .digits import DIGITS_IMAGE_SIZE, DigitsSplit, load_digits_split

__all__ = ["DIGITS_IMAGE_SIZE", "DigitsSplit", "load_digits_split"]

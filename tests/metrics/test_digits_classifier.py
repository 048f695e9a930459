import pytest
import torch

from ee_diffusion.data import load_digits_split
from ee_diffusion.metrics import DigitsClassifier, FeatureExtractor, class_accuracy, load_digits_classifier


def test_shipped_classifier_scores_the_heldout_split_at_its_stated_accuracy():
    classifier = load_digits_classifier()
    heldout = load_digits_split("heldout")
    images = (heldout.images + 1) / 2
    accuracy = class_accuracy(images, heldout.labels, classifier)
    assert accuracy >= 358 / 359  # the card's and the README's 99.72%: at most one of the 359 images wrong
    card = (classifier_path() / "README.md").read_text()
    assert "Held-out accuracy (359 images never trained on): 99.72%" in card
    features = FeatureExtractor("digits").features(images[:10])
    assert features.shape == (10, 128) and (features >= 0).all()
    # Labels that are wrong on purpose score near zero.
    assert class_accuracy(images, (heldout.labels + 1) % 10, classifier) < 0.05


def classifier_path():
    from ee_diffusion.metrics import DIGITS_CLASSIFIER_PATH

    return DIGITS_CLASSIFIER_PATH


def test_classifier_checks_its_inputs(tmp_path):
    classifier = DigitsClassifier()
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        classifier.features(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        class_accuracy(torch.zeros(2, 1, 32, 32), torch.zeros(3), classifier)
    with pytest.raises(FileNotFoundError, match="ee-diffusion train --arch classifier"):
        load_digits_classifier(tmp_path)

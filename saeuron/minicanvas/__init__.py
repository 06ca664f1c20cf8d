"""MiniCanvas: an offline miniature UnlearnCanvas (procedural objects x styles, small judge classifiers)."""
from .classifiers import (SmallCNN, build_classifier, classify, evaluate, features, heldout_accuracy,
                          load_classifier, load_classifiers, save_classifier, train_classifier)
from .data import EVAL_TEMPLATES, OBJECTS, STYLE_LABELS, STYLES, TRAIN_TEMPLATES, UNSTYLED, caption, vocabulary
from .dataset import MiniCanvasDataset, sample_batch
from .rendering import render, render_batch

__all__ = ["OBJECTS", "STYLES", "STYLE_LABELS", "UNSTYLED", "TRAIN_TEMPLATES", "EVAL_TEMPLATES", "caption",
           "vocabulary", "render", "render_batch", "sample_batch", "MiniCanvasDataset", "SmallCNN",
           "build_classifier", "train_classifier", "evaluate", "heldout_accuracy", "classify", "features",
           "save_classifier", "load_classifier", "load_classifiers"]

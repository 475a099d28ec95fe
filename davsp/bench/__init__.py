"""Benchmarks: the project's training step and generation timed against a re-expression of the original
code (`reference`), on real models or random-weight architectures of real sizes (`models`)."""

from .reference import ORIGINAL_PAD, reference_loss_and_gradient, reference_padded_length, reference_step_loss
from .timing import bench_generate, bench_padding, bench_train, synthetic_records, train_setup

__all__ = ["ORIGINAL_PAD", "bench_generate", "bench_padding", "bench_train", "reference_loss_and_gradient",
           "reference_padded_length", "reference_step_loss", "synthetic_records", "train_setup"]

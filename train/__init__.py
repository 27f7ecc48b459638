"""Reproducing the BLSP adapter: data, continuation targets, stage-1 tuning, adapter training, evaluation."""

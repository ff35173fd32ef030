"""Training: the shared loop used by `train` and `qat`."""

"""Evaluation of the run's models: intrinsic (loss, bits per byte), and what issue 16 adds."""

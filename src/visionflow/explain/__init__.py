"""Understand the model and the data: class-activation maps (:mod:`.cam`), data quality
(label issues, near-duplicates, leakage, outliers: :mod:`.quality`) and active learning
(:mod:`.active`)."""

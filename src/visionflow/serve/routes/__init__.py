"""One router per resource: health, metrics, models (v1), inference (KServe v2), admin."""

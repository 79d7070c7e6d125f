"""Fine-tuning, calibration and evaluation data for dynamic models."""

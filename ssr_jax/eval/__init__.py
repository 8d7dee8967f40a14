"""Evaluation: metrics, multi-scale inference, dense CRF, label PNGs and visualisation."""

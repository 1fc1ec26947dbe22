"""Continual-learning metrics from result matrices: formulas, bootstrap intervals, plots, reports."""

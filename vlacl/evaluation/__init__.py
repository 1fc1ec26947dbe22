"""Evaluation results: the ``eval_results`` artifact's tables and how they are read."""

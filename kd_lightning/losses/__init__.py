"""Distillation losses: pure formulas in `functional`, trainable terms in `terms`."""

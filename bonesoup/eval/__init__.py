"""Evaluation: metrics (hypervolume, Pareto fronts, controllability, LMC) and the experiment."""

"""Embedded tasks and tiny models made in code (no download): the review task and tiny checkpoints."""

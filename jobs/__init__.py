"""Entry points users pass to `ray job submit` (or run locally): thin argument parsing only."""

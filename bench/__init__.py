"""Benchmarks and memory tooling (`jobs.benchmark`, `jobs.soak`): they measure `pipeline` and
`bpr_core` and are never imported by them."""

"""GPU checks: run on one CUDA GPU by bench/gpu_check.sh, skipped elsewhere."""

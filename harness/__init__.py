"""flashbench.harness: measures and judges (CLI, records, checks)."""

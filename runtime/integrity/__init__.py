"""Per-token integrity: epochs, fences, checksums, shadow recompute, anomalies, fault injection."""

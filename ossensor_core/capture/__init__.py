"""Capture and filters: packet batches, BPF compilation, the generated peer exclusion."""

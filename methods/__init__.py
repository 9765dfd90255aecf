"""Unlearning-method plugins, one per file, registered as ``fia_bench.methods`` entry points."""

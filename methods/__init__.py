"""Unlearning-method plugins, one per file; registered through the ``fia_bench.methods`` entry points."""

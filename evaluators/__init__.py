"""Evaluator plugins, one per file; registered through the ``fia_bench.evaluators`` entry points."""

"""Red-team attack plugins, registered as ``fia_bench.attacks`` entry points."""

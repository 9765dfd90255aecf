"""The mini world: a small SD-architecture text-to-image model, its judges and its data, trained
by ``python -m fia_bench.miniworld train`` and shipped with the package (see docs/mini_world.md)."""

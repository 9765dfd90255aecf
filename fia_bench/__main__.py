from fia_bench.cli import main

main()

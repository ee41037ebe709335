from fedge.malloc import pause_gc

pause_gc()  # before the imports: see fedge.malloc

from fedge.cli import main  # noqa: E402

main()

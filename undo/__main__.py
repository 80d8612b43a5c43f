from undo.cli import main

main()

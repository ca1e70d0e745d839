from diffinject.cli import main

main()

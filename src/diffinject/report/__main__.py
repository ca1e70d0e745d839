from diffinject.report.write import main

main()

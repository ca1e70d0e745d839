from diffinject.cli import entry

entry()

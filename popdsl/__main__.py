from popdsl.cli import entry

entry()

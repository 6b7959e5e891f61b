"""`python -m celslm`: the command line, as the `celslm` script runs it (the one way a process starts it)."""

from celslm.commands.main import run

if __name__ == "__main__":
    run()

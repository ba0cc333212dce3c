"""The `neuronsweep` command line, the edge of the program: it alone reads the environment and turns user
input into one SweepConfig that flows down. app.py holds the shared options; a module per group of commands."""

"""The contracts every stage agrees on: the config (config.py), the Arrow tables (tables.py) and the
run-directory paths (layout.py). Imports nothing else of the project; everything else imports it."""

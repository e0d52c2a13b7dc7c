"""The benchmark suite of pyexec-connector: `python -m bench --help`."""

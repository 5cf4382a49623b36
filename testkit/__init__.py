"""Support for the tests and benchmarks, not for users: not installed with `pipeline` (setuptools
finds only `pipeline*`). Tests import it through pytest's `pythonpath`, benchmarks by putting the
repository root on `sys.path`."""

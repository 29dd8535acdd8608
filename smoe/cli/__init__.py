"""The ``smoe`` command line (see :mod:`smoe.cli.main`)."""

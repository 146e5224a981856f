"""The ``kvbm`` command: one module per subcommand, wired together by :mod:`kvbm_core.cli.main`."""

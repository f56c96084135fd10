"""The task-specific bodies of ``mobileone`` subcommands (``demo``, and for detect / segment also
``eval``, ``export``, ``bench``): one module per task, each a function of the parsed arguments."""

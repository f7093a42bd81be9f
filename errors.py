"""The one exception type for bad user input: the CLI prints it as one line and exits 2."""


class SeptError(Exception):
    """Bad input or a refused operation. The message names the file, shard or key at fault."""

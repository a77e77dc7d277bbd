"""The one exception type for user errors: the CLI prints it as a single line, never a traceback."""


class SSLensError(Exception):
    """Bad input from the user (config, path, prompt, ...). The message says what to do."""


class ConfigError(SSLensError, ValueError):
    """A config that cannot describe a valid model. The message names the field."""

"""The exception types for user errors and interrupts: the CLI prints each as a single line, never a traceback."""


class SSLensError(Exception):
    """Bad input from the user (config, path, prompt, ...). The message says what to do."""

    prefix, exit_code = "error: ", 2  # how the CLI reports it: `sslens: error: ...`, exit status 2


class ConfigError(SSLensError, ValueError):
    """A config that cannot describe a valid model. The message names the field."""


class Interrupted(SSLensError):
    """Training stopped by SIGINT or SIGTERM; the exit status is the shell's for that signal (130, 143)."""

    prefix = ""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum

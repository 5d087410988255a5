"""What every command shares: the error boundary, `--debug`, and logging to stderr (each stage's
`commands.py` holds its own sub-commands; `quintet.cli` puts them together).

Every entry point (`quintet`, `python -m quintet`, `python -m quintet.train`, `python -m quintet.demo`)
runs its handler through `run_command`:

- an expected failure (a bad file or value, a missing, unreadable or unwritable path, a full disk, a
  corrupt safetensors file, a chat template the sandbox stops, an output folder another run holds) prints
  one line `PROG: error: ...` naming the file, field or value and what would be valid; exit code 2;
- anything else is a bug: one line with the exception's type and message and the hint to rerun with
  `--debug`; exit code 1;
- with `--debug` (or QUINTET_DEBUG=1) every exception keeps its Python traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

EXIT_BAD_INPUT = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130

# What an OSError's errno means for the user, and what to do about it.
_OS_HINTS = {
    errno.ENOSPC: "no space left on the device; free some space or write to another disk",
    errno.EDQUOT: "disk quota exceeded; free some space or write to another disk",
    errno.EROFS: "read-only file system; choose a folder on a writable disk",
    errno.EACCES: "permission denied; choose a folder you can write to, or change its permissions",
    errno.EPERM: "operation not permitted; choose a folder you can write to, or change its permissions",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "already exists",
    errno.EISDIR: "is a folder, expected a file",
    errno.ENOTDIR: "a part of the path is a file, expected a folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
}


def configure_logging() -> None:
    """INFO logs to stderr, unless the program configured logging itself."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """`--debug` on `parser` and on every sub-command below it, so it may stand before or after the
    sub-command (`quintet --debug train lm X` or `quintet train lm X --debug`)."""
    parser.add_argument(
        "--debug", action="store_true", default=False, help="show the Python traceback of any error"
    )
    _add_debug_below(parser)


def _add_debug_below(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                if not any("--debug" in a.option_strings for a in sub._actions):
                    # SUPPRESS: a sub-command without the flag keeps what the main parser parsed
                    sub.add_argument(
                        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
                    )
                _add_debug_below(sub)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each option's default (`(default: 4096)`), except where the help text already
    says it or there is none to show (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or any(
            action.default is nothing for nothing in (None, False, argparse.SUPPRESS)
        ):
            return text
        return super()._get_help_string(action)


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`HelpFormatter` for a parser whose description keeps its own line breaks."""


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """`HelpFormatter` on `parser` and every sub-command below it (a raw description stays raw)."""
    if issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter):
        parser.formatter_class = RawDescriptionHelpFormatter
    else:
        parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                show_defaults(sub)


def _os_error_message(err: OSError) -> str:
    """`path: what is wrong; what to do` for an OSError, or its own message when it was written by us."""
    if err.errno is None or len(err.args) < 2:  # raised with a message of ours: it names the path
        return str(err)
    where = err.filename if err.filename is not None else "standard output"
    if err.filename2 is not None:
        where = f"{err.filename} -> {err.filename2}"
    return f"{where}: {_OS_HINTS.get(err.errno, err.strerror)} ([Errno {err.errno}] {err.strerror})"


def expected_error_message(err: BaseException) -> str | None:
    """The one-line message of an expected failure, or None when `err` is a bug."""
    if isinstance(err, ValueError):  # ConfigError, CheckpointError, OutputLockedError, ...
        return str(err)
    if isinstance(err, OSError):
        return _os_error_message(err)
    kind = type(err)
    module = kind.__module__ or ""
    if module.startswith("safetensors") and kind.__name__ == "SafetensorError":
        return f"a safetensors file is corrupt or truncated ({err}); write it again or use another copy"
    if module.startswith("jinja2"):  # a template outside quintet.chat's checks
        return f"chat template: {kind.__name__}: {err}"
    if kind.__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA)
        first = str(err).splitlines()[0] if str(err) else ""
        return f"out of device memory ({first}); lower the batch size, the sequence length or the model size"
    if isinstance(err, MemoryError):
        return "out of memory; lower the batch size, the sequence length or the model size"
    return None


def _stdout_gone() -> None:
    """After stdout failed (a closed pipe, a full disk): point it at /dev/null, so the interpreter's
    final flush does not fail a second time."""
    if sys.stdout is not sys.__stdout__:  # replaced (a test capturing output): nothing to protect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run_command(args: argparse.Namespace, prog: str = "quintet") -> int:
    """Run a parsed command's handler (`args.func`) inside the error boundary (see the module docstring)."""
    from quintet.processes import children_die_with_this_process

    debug = getattr(args, "debug", False) or os.environ.get("QUINTET_DEBUG", "") not in ("", "0")
    children_die_with_this_process()  # a killed command leaves no worker behind
    try:
        code = args.func(args)
        sys.stdout.flush()  # a full disk or closed pipe behind stdout fails here, inside the boundary
        return code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _stdout_gone()  # `quintet ... | head`: the reader has what it wanted
        return EXIT_BUG
    except Exception as err:
        if debug:
            raise
        if isinstance(err, OSError) and err.filename is None and err.errno in (errno.ENOSPC, errno.EIO):
            _stdout_gone()  # most likely stdout itself
        message = expected_error_message(err)
        if message is not None:
            print(f"{prog}: error: {message}", file=sys.stderr)
            return EXIT_BAD_INPUT
        text = " ".join(str(err).split())
        print(
            f"{prog}: internal error (a bug in quintet): {type(err).__name__}: {text}; "
            "rerun with --debug for the traceback",
            file=sys.stderr,
        )
        return EXIT_BUG

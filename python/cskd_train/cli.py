"""Command-line parsing shared by cskd-train, cskd-eval and cskd-demo."""

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse with defaults in --help and bad flags reported in one line (no usage block), exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def format_help(self):
        # ArgumentDefaultsHelpFormatter adds the default only to flags with a help text: give every flag one.
        for action in self._actions:
            if action.help is None and action.default is not argparse.SUPPRESS:
                action.help = "(default: %(default)s)"
        return super().format_help()

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

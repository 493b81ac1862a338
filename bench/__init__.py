"""Benchmarks, run as python -m bench.<name> [--flag=value ...]; each module's docstring says what it measures."""
import sys


def exit_on_help(argv, doc):
    """Print the benchmark's docstring and exit 0 when argv asks for help (-h or --help)."""
    if '-h' in argv or '--help' in argv:
        print(doc.strip())
        sys.exit(0)

"""`python -m hf_relpos.cli`: the `hf-relpos` command, which lives in the top-level module `hf_relpos_cli` so that it
starts without importing this package (see that module)."""

import sys

from hf_relpos_cli import SUBCOMMANDS, build_parser, main, register_subcommand


__all__ = ["SUBCOMMANDS", "build_parser", "main", "register_subcommand"]

if __name__ == "__main__":
    sys.exit(main())

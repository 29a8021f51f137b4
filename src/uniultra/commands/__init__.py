"""The command line's sub-commands, one module per command (see uniultra.cli): the only package that
imports argparse. Each module parses options and calls into the library; nothing imports it but
uniultra.cli."""

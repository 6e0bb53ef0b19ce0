"""One module per ``mepd`` subcommand (see ``mepd.cli``)."""

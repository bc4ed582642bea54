"""One module per optimizer, each defining ``RECORDS`` (see tests/optim_table.py)."""

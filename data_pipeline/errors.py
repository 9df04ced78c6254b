"""The one exception type of the data pipeline: bad input, named precisely."""
from __future__ import annotations


class DataError(Exception):
    """Bad input data. The message names the file, and where known the column, the row (0-based
    data row, or 1-based line for text files) and the offending value. The CLI prints it as
    `error: <message>` and exits with status 2."""

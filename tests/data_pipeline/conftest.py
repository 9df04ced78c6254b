from __future__ import annotations

import pytest

from dp_inputs import write_udata


@pytest.fixture
def udata(tmp_path):
    """(directory with a 500-row u.data, its rows [user, item, rating, timestamp])."""
    rows = write_udata(tmp_path / "ml" / "u.data")
    return tmp_path / "ml", rows

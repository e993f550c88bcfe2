"""Output files on a read-only folder: the error names the file asked for (it named the
temporary file beside it, whose clean-up the read-only disk refused too)."""

from __future__ import annotations

import pytest

from n2g.client import write_file
from n2g_servers import read_only_dir


def test_write_file_on_a_read_only_folder_names_the_file_asked_for(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with read_only_dir(out):
        with pytest.raises(OSError) as e:
            write_file(out / "g.svg", "<svg/>")
    assert e.value.filename == str(out / "g.svg")
    assert list(out.iterdir()) == []

"""Found by stop 31's second review of 398daf4: "after a failed flush every later one raises" holds for
``flush``/``durable`` but not for ``Volume.sync_blocking``, the flush of a clean stop
(daemon.py: ``v.sync_blocking()`` then ``set_clean_flag(True)``). It calls ``os.fdatasync(fd)``
directly: on the descriptor whose earlier fdatasync already consumed the writeback error, Linux
returns 0, and the node marks itself stopped cleanly (the next start compares nothing from the
write-intent log) although writes since the failed flush may be lost."""

from __future__ import annotations

import pytest

from syncd.node.volume import Volume

from .test_datapath_cancel import SIZE


def test_the_shutdown_flush_after_a_failed_flush_does_not_count_as_durable(tmp_path):
    vol = Volume("vv1", str(tmp_path / "vv1.img"), size=SIZE)
    try:
        vol.flush_failed = True  # a flush failed earlier in this run
        vol.write_sync(0, b"\x01" * 4096)
        with pytest.raises(OSError):
            vol.sync_blocking()
    finally:
        vol.close()

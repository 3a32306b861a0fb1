"""Progress bars: drawn on a terminal, off when stderr goes to a log file or a pipe (nested bars redraw with
carriage returns and cursor-up escape codes, which a log keeps as garbage)."""

import io
import sys

from sdatc.inference import InferConfig, run


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _restore(lq_small_clip, out, monkeypatch, stderr) -> str:
    """infer.py's loop (clips bar, each clip's frames bar inside it) with the bicubic baseline."""
    monkeypatch.setattr(sys, "stderr", stderr)
    run(InferConfig(mode="bicubic", input=str(lq_small_clip), output=str(out)))
    return stderr.getvalue()


def test_nested_bars_leave_no_escape_codes_in_a_redirected_log(lq_small_clip, tmp_path, monkeypatch):
    log = _restore(lq_small_clip, tmp_path / "piped", monkeypatch, io.StringIO())  # not a TTY, as a pipe
    assert "\r" not in log and "\x1b[" not in log, repr(log[:300])
    assert (tmp_path / "piped" / "small.mp4").is_file()
    drawn = _restore(lq_small_clip, tmp_path / "tty", monkeypatch, _Terminal())
    assert "clips (rank 0)" in drawn and "\r" in drawn  # on a terminal the bars are still drawn

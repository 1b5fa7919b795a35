"""Progress: rate-limited plain lines off a terminal, nothing when disabled, amounts and ETA."""

import io
import re

from curvprune._progress import Progress

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def test_plain_lines_off_a_terminal_are_rate_limited_and_end_with_the_total():
    out = io.StringIO()
    with Progress(True, interval=3600, stream=out) as progress:
        advance = progress.task("train dense", 100)
        for _ in range(100):
            advance()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and LINE.match(lines[0])
    assert "train dense 100/100 (100 %)" in lines[0]


def test_every_interval_prints_a_line_with_the_time_left():
    out = io.StringIO()
    with Progress(True, interval=0.0, stream=out) as progress, \
            progress.bar("step 1 gradients", 8) as advance:
        advance(2)
        advance(6)
    lines = out.getvalue().splitlines()
    assert "2/8 (25 %)" in lines[0] and "s left" in lines[0]
    assert "8/8 (100 %)" in lines[1] and len(lines) == 2  # complete: no extra closing line


def test_a_bar_left_early_says_where_it_stopped():
    out = io.StringIO()
    with Progress(True, interval=3600, stream=out) as progress:
        try:
            with progress.bar("pruning steps", 4) as advance:
                advance()
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
    assert out.getvalue().splitlines()[-1].endswith("pruning steps 1/4 (25 %), 0 s, stopped")


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    with Progress(False, interval=0.0, stream=out) as progress:
        progress.task("x", 3)(3)
        with progress.spinner("y"):
            pass
    assert out.getvalue() == ""

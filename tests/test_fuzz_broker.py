"""A bounded fuzz run (bench/fuzz.py) against a real `zdepth serve` with auth on.

The long run is `python -m bench.fuzz --count 200000 --seconds 600`; this one sends a few
thousand malformed messages to the frontend, stream and backend sockets and checks what the
fuzzer checks: nothing crashes, every answerable message is answered exactly once, no
handler raises, every stream frame is counted, memory stays flat, and real requests still
succeed afterwards.
"""

from __future__ import annotations

import pytest

from bench.fuzz import Cases, png_bomb, run_fuzz
from tests.servers import Server
from zdepth import protocol as P

KEY = "zd-fuzz-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint_dir):
    # --backend-host: serve binds no TCP worker port unless asked, and the fake worker needs one
    srv = Server(
        tmp_path_factory.mktemp("fuzz"),
        checkpoint_dir,
        workers=1,
        extra=["--api-key", KEY, "--require-auth", "--max-request-mb", "1", "--backend-host", "127.0.0.1"],
    )
    yield srv
    srv.stop()


def test_fuzz_every_socket(server):
    report = run_fuzz(server.endpoint, count=4000, seconds=40, key=KEY, seed=7)
    print(report.summary())
    assert not report.problems, report.summary()
    assert report.total >= 3500, "the run was cut short: too few cases to mean anything"
    assert report.answerable == report.replies > 1500
    kinds = {kind.split(":")[0] for kind in report.cases}
    assert kinds == {"frontend", "stream", "backend"}
    assert report.outcomes[P.BAD_REQUEST] > 0 and report.outcomes[P.UNAUTHORIZED] > 0


def test_cases_are_reproducible():
    first, second = Cases(3, KEY).frontend(), Cases(3, KEY).frontend()
    assert [next(first) for _ in range(50)] == [next(second) for _ in range(50)]


def test_png_bomb_declares_huge_size():
    from zdepth.images import image_header

    assert image_header(png_bomb(10_000, 5_000)) == ("png", 10_000, 5_000)

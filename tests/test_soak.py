"""A short soak with faults (bench/soak.py): clients and a camera keep going while a worker is
SIGKILLed and the broker is SIGKILLed and restarted. No request may go unanswered."""

from __future__ import annotations

from bench.soak import SoakConfig, run_soak


def test_soak_with_a_worker_kill_and_a_broker_restart(checkpoint_dir):
    config = SoakConfig(
        seconds=20,
        clients=4,
        cameras=1,
        camera_fps=5,
        workers=2,
        kill_every_s=6,
        broker_every_s=12,
        checkpoint_dir=str(checkpoint_dir),
    )
    report = run_soak(config)
    print(report.summary())
    assert report.worker_kills >= 1 and report.broker_restarts == 1
    assert report.lost == 0, report.summary()
    assert report.sent == report.answered_ok + report.answered_with_errors + report.lost
    assert report.answered_ok > report.sent // 2, "most requests should succeed despite the faults"
    assert report.stream_results > 0
    assert 0 < report.broker_peak_kb < report.worker_peak_kb

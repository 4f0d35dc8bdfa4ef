"""Camera or video -> zdepth stream -> live depth view, or colour-mapped frames saved to a folder.

Two threads: one pushes frames with `CameraPublisher` (never blocking on the network), the
other shows the newest result from `DepthSubscriber`. When the model is slower than the camera
the broker drops old frames, so the view stays current instead of falling behind.

    python clients/examples/camera_loop.py --server tcp://gpu:5555 --source 0          # webcam 0
    python clients/examples/camera_loop.py --source walk.mp4 --fps 10 --save frames/   # no display
    python clients/examples/camera_loop.py --source images/ --jpeg-quality 85           # over Wi-Fi

Needs OpenCV for cameras, videos, the window and saving (`pip install opencv-python`).
Press q or Esc in the window to stop.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from clients import CameraPublisher, DepthSubscriber
from clients.stream import stream_endpoints
from zdepth.geometry import colorize


def has_display() -> bool:
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--server", default="tcp://127.0.0.1:5555", help="broker request endpoint; stream ports are +1 and +2"
    )
    parser.add_argument("--ingress", default=None, help="camera ingress endpoint (default: server port + 1)")
    parser.add_argument("--results", default=None, help="results endpoint (default: server port + 2)")
    parser.add_argument("--source", default="0", help="camera index, video file or folder of images")
    parser.add_argument("--stream", default="cam0")
    parser.add_argument("--key", default=os.environ.get("ZDEPTH_API_KEY"), help="API key (default: $ZDEPTH_API_KEY)")
    parser.add_argument("--method", default="metric_depth", choices=["metric_depth", "rel_depth"])
    parser.add_argument("--max-depth", type=float, default=None)
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--fps", type=float, default=None, help="send at most this many frames per second")
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--jpeg-quality", type=int, default=None, help="JPEG-encode frames before sending (slow links)")
    parser.add_argument(
        "--save", type=Path, default=None, help="write colour-mapped depth PNGs here instead of a window"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=10.0,
        help="when the source ends, wait up to this many seconds after the last result for the last frame's result",
    )
    args = parser.parse_args(argv)

    import cv2  # the window and the PNG writer

    ingress, results = args.ingress, args.results
    if ingress is None or results is None:
        derived = stream_endpoints(args.server)
        ingress, results = ingress or derived[0], results or derived[1]
    source = int(args.source) if args.source.isdigit() else args.source
    show = args.save is None and has_display()
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
    elif not show:
        print("no display: pass --save DIR to keep the frames; printing statistics only")

    publisher = CameraPublisher(
        ingress,
        stream=args.stream,
        key=args.key,
        method=args.method,
        max_depth=args.max_depth,
        encoder=args.encoder,
        input_size=args.input_size,
        jpeg_quality=args.jpeg_quality,
    )
    subscriber = DepthSubscriber(results, [args.stream])
    stop = threading.Event()
    camera = threading.Thread(
        target=publisher.run, args=(source,), kwargs={"fps": args.fps, "max_frames": args.max_frames, "stop": stop}
    )
    camera.start()

    shown, last_report, last_result = 0, time.monotonic(), time.monotonic()
    ended_at: Optional[float] = None  # when the source ran out
    try:
        while not stop.is_set():
            result = subscriber.latest(timeout=0.5)
            now = time.monotonic()
            if ended_at is None and not camera.is_alive():
                ended_at = now
            if result is None:
                # The broker always computes a stream's newest frame, so the last frame's result
                # comes; a frame dropped locally never does, hence the bound.
                if ended_at is not None and now - max(last_result, ended_at) > args.wait:
                    print(f"no result for {args.wait:g} s after the source ended; giving up on the rest")
                    break
                continue
            last_result = now
            # the last frame's result: the camera thread has offered every frame it will
            last = (
                not camera.is_alive()
                and result.seq is not None
                and result.seq >= publisher.sent + publisher.dropped_local - 1
            )
            if not result.ok:
                print(f"seq {result.seq}: {result.error}")
                if last:
                    break
                continue
            view = cv2.cvtColor(colorize(result.depth, invert=args.method == "metric_depth"), cv2.COLOR_RGB2BGR)
            if args.save is not None:
                cv2.imwrite(str(args.save / f"{args.stream}_{result.seq:06d}.png"), view)
            if show:
                cv2.imshow(f"zdepth {args.stream}", view)
                if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                    break
            shown += 1
            if last:
                break
            if now - last_report >= 1.0:
                print(
                    f"{shown / (now - last_report):5.1f} fps shown | seq {result.seq} | latency {_ms(result.latency_ms)} "
                    f"(age here {_ms(result.age_ms)}) | dropped by broker {result.dropped} | "
                    f"dropped at camera {publisher.dropped_local} of {publisher.sent + publisher.dropped_local}"
                )
                shown, last_report = 0, now
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        camera.join()
        publisher.close()
        subscriber.close()
        if show:
            cv2.destroyAllWindows()
    offered = publisher.sent + publisher.dropped_local
    print(f"done: {subscriber.received} results for {offered} frames ({publisher.dropped_local} dropped at the camera)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

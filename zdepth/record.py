"""`zdepth record`: a stream's results as ROS 2 messages in an MCAP file (the `ros` extra).

Topics, for `--topic-prefix P` (default `/zdepth/<stream>`), all stamped with the frame's
capture time (`t_capture`, the camera's clock) and `--frame-id` (default
`<stream>_optical_frame`; x right, y down, z forward); the MCAP log time is the same stamp:

    P/depth/image        sensor_msgs/msg/Image 32FC1, metres, NaN = invalid
    P/depth/image_raw    sensor_msgs/msg/Image 16UC1, millimetres, 0 = invalid (--depth-encoding 16UC1 or both)
    P/depth/camera_info  sensor_msgs/msg/CameraInfo of the depth image (with a camera)
    P/depth/points       sensor_msgs/msg/PointCloud2, organised H x W, x y z (+ rgb with colours) (with a camera)

The stream must publish depth (a `metric_depth` stream); error results are counted, not written.
"""

from __future__ import annotations

import argparse
import re
import sys

from .stream_tools import add_stream_options, bounded_results, intrinsics_from_args, require_extra

ENCODING_CHOICES = ("32FC1", "16UC1", "both")
TOPICS = {
    "32FC1": "depth/image",
    "16UC1": "depth/image_raw",
    "camera_info": "depth/camera_info",
    "points": "depth/points",
}
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_/]")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "record",
        help="record a stream as ROS 2 messages (depth image, point cloud, camera info) in an MCAP file",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--stream", required=True, help="the stream name")
    parser.add_argument("--mcap", required=True, metavar="FILE", help="the MCAP file to write (replaced if it exists)")
    parser.add_argument(
        "--depth-encoding",
        choices=ENCODING_CHOICES,
        default="32FC1",
        help="which depth image topics (default: %(default)s)",
    )
    parser.add_argument("--frame-id", help="default: <stream>_optical_frame")
    parser.add_argument("--topic-prefix", help="default: /zdepth/<stream>")
    add_stream_options(parser)
    parser.set_defaults(func=cmd_record)


def ros_name(stream: str) -> str:
    """A stream name as a ROS name part: characters outside [A-Za-z0-9_/] become _."""
    return _NAME_UNSAFE.sub("_", stream)


def cmd_record(args: argparse.Namespace) -> int:
    require_extra("ros", "rosbags", "mcap")
    from clients import DepthSubscriber

    from . import ros

    intrinsics_for = intrinsics_from_args(args)
    frame_id = args.frame_id or f"{ros_name(args.stream)}_optical_frame"
    prefix = (args.topic_prefix or f"/zdepth/{ros_name(args.stream)}").rstrip("/")
    encodings = ros.DEPTH_ENCODINGS if args.depth_encoding == "both" else (args.depth_encoding,)
    written = errors = dropped = missed = 0
    last_error, last_seq = None, None
    with DepthSubscriber(args.pub, [args.stream]) as subscriber, ros.McapWriter(args.mcap) as writer:
        for result in bounded_results(subscriber, args.frames, args.seconds):
            dropped += result.dropped
            if (
                last_seq is not None and result.seq is not None
            ):  # lost at the camera, or here when the SUB queue was full
                missed += max(0, result.seq - last_seq - 1 - result.dropped)
            last_seq = result.seq
            if not result.ok or result.depth is None:
                errors += 1
                last_error = result.error or "a result without depth (is it a metric_depth stream?)"
                continue
            depth, stamp = result.depth, result.t_capture
            log_time = ros.stamp_ns(stamp)
            for encoding in encodings:
                writer.write(
                    f"{prefix}/{TOPICS[encoding]}", ros.depth_image(depth, stamp, frame_id, encoding), log_time
                )
            intrinsics = intrinsics_for(*depth.shape)
            if intrinsics is not None:
                writer.write(
                    f"{prefix}/{TOPICS['camera_info']}",
                    ros.camera_info(intrinsics, *depth.shape, stamp, frame_id),
                    log_time,
                )
                writer.write(
                    f"{prefix}/{TOPICS['points']}",
                    ros.pointcloud2(depth, intrinsics, stamp, frame_id, result.colors),
                    log_time,
                )
            written += 1
    print(
        f"zdepth: recorded {written} frames ({writer.messages} messages) of {args.stream} to {args.mcap}; "
        f"{errors} errors or depth-less results, {dropped} frames dropped by the broker, {missed} other seq gaps (camera-side drops, or results this recorder was too slow for)"
        + (f"; last error: {last_error}" if last_error else ""),
        file=sys.stderr,
    )
    return 0

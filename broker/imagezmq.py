"""Unchanged imagezmq senders as zdepth cameras.

An imagezmq `ImageSender` sends [JSON {msg, dtype, shape}, raw array] or [JSON {msg}, JPEG]
on a REQ socket and waits for b"OK", or (REQ_REP=False) publishes the same on a PUB socket it
binds, which the broker subscribes to (`PubSenders`). It has no place for prediction fields or
a key, so the message text names the stream and the broker's `--imagezmq-fields` say what to
compute.
"""

from __future__ import annotations

import json
import time
from typing import Sequence

import zmq

from zdepth import protocol as P


def metadata(frames: Sequence) -> dict:
    """The JSON metadata of an imagezmq message, checked to be an object."""
    if len(frames) != 2 or len(frames[0]) > P.MAX_HEADER_BYTES:
        raise P.bad_request("imagezmq messages are [json, image]")
    try:
        meta = json.loads(frames[0].bytes)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than the stack
        raise P.bad_request("imagezmq metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise P.bad_request("imagezmq metadata must be a JSON object")
    return meta


def stream_name(meta: dict) -> str:
    """The sender's message text, made a valid stream name."""
    return P.STREAM_NAME_UNSAFE.sub("_", str(meta.get("msg") or "imagezmq"))[:64]


def stream_frame(meta: dict, frames: Sequence, name: str, seq: int, fields: dict) -> list:
    """[header, image frame]: the zdepth stream frame the message stands for."""
    if "shape" in meta:
        if meta.get("dtype") != "uint8":
            raise P.bad_request("imagezmq arrays must be uint8 BGR images")
        image = {"frame": 1, "format": "raw", "shape": meta["shape"]}
    else:
        image = {"frame": 1, "format": "png" if frames[1].bytes[:4] == b"\x89PNG" else "jpeg"}
    header = dict(fields, v=P.VERSION, stream=name, seq=seq, t_capture=time.time(), image=image)
    return [header, frames[1]]


# imagezmq PUB/SUB frames queued per sender: only the newest is ever used.
SUB_HWM = 2


class PubSenders:
    """SUB sockets connected to imagezmq PUB senders (`ImageSender(..., REQ_REP=False)` binds),
    one per sender, subscribed to everything (imagezmq sends no topic frame).

    Each holds at most SUB_HWM messages (libzmq drops newer ones beyond that; the stream slot
    keeps only the newest anyway), each at most `max_frame` bytes. A bigger message makes
    libzmq drop the connection as a protocol error and never reconnect it by itself, so a
    monitor per socket reports disconnections and `reconnect` connects again. No CURVE: an
    unchanged imagezmq sender cannot speak it.
    """

    def __init__(self, context: zmq.Context, endpoints: Sequence[str], max_frame: int):
        self._endpoints: dict[zmq.Socket, str] = {}
        self._monitors: dict[zmq.Socket, zmq.Socket] = {}  # monitor PAIR -> its SUB socket
        for endpoint in endpoints:
            sock = context.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, SUB_HWM)
            sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
            sock.setsockopt(zmq.IPV6, 1)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            self._endpoints[sock] = endpoint
            self._monitors[sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)] = sock
            sock.connect(endpoint)  # ZMQError for a malformed endpoint: the caller reports it

    def sockets(self) -> list:
        """Every socket to poll for input and to close: the SUB sockets and their monitors."""
        return [*self._endpoints, *self._monitors]

    def readable(self, events: dict) -> list:
        """The SUB sockets with messages waiting, given a poll's events."""
        return [sock for sock in self._endpoints if sock in events]

    def reconnect(self, events: dict) -> list:
        """Connect again every sender whose monitor reported a disconnection; returns their endpoints."""
        endpoints = []
        for monitor, sock in self._monitors.items():
            if monitor not in events:
                continue
            while monitor.poll(0):
                monitor.recv_multipart()  # [event, endpoint]: only "disconnected" is monitored
            endpoint = self._endpoints[sock]
            try:
                sock.disconnect(endpoint)  # after a normal disconnect libzmq would retry: one connection, not two
            except zmq.ZMQError:
                pass
            sock.connect(endpoint)
            endpoints.append(endpoint)
        return endpoints

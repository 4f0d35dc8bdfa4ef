"""zdepth: Depth Anything V2 served over ZeroMQ.

Importing this package (or `zdepth.protocol`) must never import torch: robots that only ask
for depth install pyzmq, msgpack, numpy, pyyaml and zstandard.
"""

__version__ = "0.1.0"

"""ringserve wire format: frame layouts, message kinds, error codes and the tensor codec.

This package depends on nothing else of ringserve's; every other role imports it.
See docs/protocol.md for the frame-by-frame description.
"""

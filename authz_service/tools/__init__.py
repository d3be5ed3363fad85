"""The policy authors' tools: validate and test (``policytool``), explain, audit, and the
simulator they share (``simulate``). They run requests through the serving core; the serving
path never imports them.
"""

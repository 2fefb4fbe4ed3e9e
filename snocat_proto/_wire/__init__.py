"""The wire layer: what snocat puts on the wire, and the QUIC engine under it.

Never imports :mod:`snocat_proto._service`.
"""

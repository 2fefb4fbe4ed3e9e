"""Coverage-guided fuzzing of everything in snocat_proto that bytes from the network reach.

Each harness takes one ``bytes`` input and checks the core's promise for it: a valid
result or a :class:`~snocat_proto.errors.ProtocolError` (the authenticators and the
server endpoint: no exception at all), the same outcome however the bytes are split
into reads, and the harness's own invariants (round trips, who may authenticate, what
an unauthenticated peer may hold, the anti-amplification bound).  Anything else that
escapes is a crash.

Harnesses live in :mod:`fuzz.harnesses` (parsers and state machines),
:mod:`fuzz.quic_harness` (datagrams into a :class:`~snocat_proto.endpoint.ServerEndpoint`,
raw and after a real in-memory handshake) and :mod:`fuzz.client_harness` (a client
after a real handshake with a hostile aggregator); seeds in ``fuzz/corpus/<harness>/``.

    python -m fuzz --minutes 10          # every harness under atheris, 10 minutes in all
    python -m fuzz run framing [ARGS]    # one harness; ARGS go to libFuzzer
    python -m fuzz replay [NAME ...]     # the committed corpus, without atheris
    python -m fuzz seeds                 # regenerate the committed seed corpus

Importing this package imports nothing of snocat: the runner must import the code
under test inside ``atheris.instrument_imports()``.
"""

"""What the splitter and the agent both read and write: record kinds, the local wire, the
journal's segment header and index, durable files, block-device calls.

Standard library only, Python 3.9 and later: the splitter and the view plugin import it
inside nbdkit's embedded system Python. Nothing here does network I/O or knows trio.
"""

"""Ferry's splitter (an nbdkit Python plugin) and the formats it shares with the agent.

Standard library only, and Python 3.9 compatible: nbdkit embeds the system Python.
"""

"""Simulation: many virtual clients on a few processes, talking to a real coordinator over the REST API.

- :mod:`.plan`: the clients' names, their parts of the data, and which host serves each (pure).
- :mod:`.polling`: the long polls of a host's idle clients on one event loop.
- :mod:`.host`: a client host, which trains its sampled clients one after another.
- :mod:`.hosting`: running a host in a process of the local pool or in a Ray task; ``python -m fedrest.simulation``.
- :mod:`.backends`: the local process pool and Ray.

``simulate.py`` is the program.
"""

"""fedrest: federated learning over REST. The parts that are not command-line programs.

Worker side (what ``worker.py``, the monitors and ``launch.py`` use): :mod:`.worker_node` (a worker's state
and main loop), :mod:`.client` (the HTTP client),
:mod:`.worker_policy` (what each answer of the coordinator means for a worker), :mod:`.data` and
:mod:`.partition` (datasets and how they are split), :mod:`.serialization` (state_dicts as bytes),
:mod:`.monitoring` (what both monitors share).

Coordinator side: :mod:`.server` (the Flask app, the federation's state and rules, durable storage),
:mod:`.aggregation` (strategies and rules), :mod:`.files` (the atomic writer), :mod:`.failpoints`.

The top-level modules ``config`` (typed settings), ``model`` (models and the training/evaluation loops) and
``utils`` (devices, logging, program start-up) are shared by both sides.
"""

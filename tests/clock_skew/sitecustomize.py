"""Put on PYTHONPATH of a worker process to run it with a wall clock one hour ahead (time.time only)."""

import time

_real_time = time.time
time.time = lambda: _real_time() + 3600.0

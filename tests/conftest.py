import os

import torch
from hypothesis import HealthCheck, settings

# "default" keeps the suite to a few minutes on a 2-core CPU; HYPOTHESIS_PROFILE=thorough digs deeper.
settings.register_profile("default", max_examples=100, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# The reference loops are tiny; extra intra-op threads only add scheduling noise on small CPUs. Under
# pytest-xdist (`-n auto`: one worker process per core) each worker keeps to one thread: the workers
# already fill the cores, and more threads per worker only contend with the other workers.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(torch.get_num_threads(), 2))

"""Suite-wide settings, applied before any test module imports torch.

OpenMP threads spin while they wait by default. On a 2-core machine, as soon as anything else
holds a core (a server subprocess a test started, the CLI under test), spinning threads turn a
70 ms forward into seconds. Passive waiting costs nothing measurable when the machine is quiet.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

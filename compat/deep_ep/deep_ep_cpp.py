"""``deep_ep_cpp`` compatibility shim: this module *is* ``portep.deep_ep_cpp``, the names of
DeepEP's compiled module (``Config``, ``EventHandle``, ``topk_idx_t``, ...) on portep.

Installed with the ``deep_ep`` shim, for code that imports ``deep_ep_cpp`` directly.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("portep.deep_ep_cpp")

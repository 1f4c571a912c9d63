"""``deep_ep`` compatibility shim: this module *is* portep.

Installed only on request (``pip install ./compat/deep_ep``), so that code written for DeepEP
(``import deep_ep; deep_ep.Buffer(...)``) runs on portep unchanged. Do not install it next to
the real DeepEP.
"""

import sys

import portep

sys.modules[__name__] = portep

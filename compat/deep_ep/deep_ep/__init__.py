"""``deep_ep`` compatibility shim: this module *is* portep.

Installed only on request (``pip install ./compat/deep_ep``), so that code written for DeepEP
(``import deep_ep; deep_ep.Buffer(...)``, ``from deep_ep.utils import EventOverlap``,
``from deep_ep_cpp import Config``) runs on portep unchanged. Do not install it next to the real
DeepEP.
"""

import sys

import portep

sys.modules[__name__] = portep
# Registers deep_ep.buffer, deep_ep.utils and deep_ep_cpp as the portep modules behind them.
portep.install_deep_ep_alias()

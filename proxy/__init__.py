"""The data plane's control side: the descriptor format, the process's proxies (one compiled proxy
thread per transport, shared by every Buffer: :mod:`portep.proxy.service`), and the control plane
(:mod:`portep.proxy.control`: rendezvous, heartbeats, failure notices, stats) with each process
group's session (:mod:`portep.proxy.session`). The per-byte and per-descriptor work is compiled
(``native/engine``)."""

"""The data plane's CPU side: descriptor format, descriptor rings and the per-NIC proxy loop."""

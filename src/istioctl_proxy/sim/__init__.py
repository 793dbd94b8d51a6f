"""Simulation, kept out of the production namespace: simulated istiod replicas (`simulator`), the
`simulate` / `demo` commands that run them beside a proxy (`simulate`), and the one throwaway test CA (`pki`).

Nothing in the proxy's data path imports this package; the cli imports it only for `simulate` and `demo`.
"""

__all__: list[str] = []  # its modules are the surface: import istioctl_proxy.sim.simulator etc.

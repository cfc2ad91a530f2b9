"""The engine simulator, workloads and the discrete-event simulator."""

"""Capacity planning: demand history -> forecast -> integer program -> capacity plan.

Sits above the simulator (it may import ``sim`` to validate a plan); nothing below imports
it. The core (``spec``, ``series``, ``forecast``, ``milp``, ``planner``) is pure: inputs in,
plan out. ``inputs``, ``report`` and ``cli`` are the I/O shells. See docs/planning.md.
"""

"""Seeded request generators: multi-turn chat, Tree-of-Thoughts, diurnal load, traces."""

from sim.workloads.base import Client, SimRequest, Workload
from sim.workloads.chat import ARENA, WILDCHAT, ChatProfile, chat_workload
from sim.workloads.diurnal import DiurnalShape, diurnal_workload
from sim.workloads.tot import MIXED_TREE_US, TOT, TreeProfile, tree_workload

__all__ = [
    "ARENA",
    "MIXED_TREE_US",
    "TOT",
    "WILDCHAT",
    "ChatProfile",
    "Client",
    "DiurnalShape",
    "SimRequest",
    "TreeProfile",
    "Workload",
    "chat_workload",
    "diurnal_workload",
    "tree_workload",
]

"""A ``kvmesh`` command stopped with SIGTERM ends like Ctrl-C (its cleanup runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def test_sigterm_raises_keyboard_interrupt_in_a_command() -> None:
    # In a child process: the command's own signal disposition must not leak into pytest's.
    code = textwrap.dedent("""
        import os, signal, sys, types
        import cli
        def probe(args):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except KeyboardInterrupt:
                print("interrupted: cleanup runs")
                return 3
            return 0
        mod = types.ModuleType("probe_cmd")
        mod.register = lambda p: p.set_defaults(func=probe)
        sys.modules["probe_cmd"] = mod
        cli.SUBCOMMANDS = {"probe": ("probe_cmd", "a probe")}
        sys.exit(cli.main(["probe"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 3, out.stderr
    assert "interrupted: cleanup runs" in out.stdout

"""Pure replicated data types for the mesh: no I/O, no clocks, no asyncio."""

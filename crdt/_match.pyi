from array import array
from collections.abc import Sequence

def runs(keys: Sequence[int], table_keys: array[int], table_slots: array[int],
         shared: dict[int, int], bits: list[int]) -> list[tuple[int, int]]: ...
def match64(keys: Sequence[int], table_keys: array[int], table_slots: array[int],
            shared: dict[int, int], names: list[str]) -> dict[str, int]: ...
